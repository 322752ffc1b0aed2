"""The one table of observation codes the LIS messages use, per cell type, and the per-lab overrides.

Technologist-verified (signed) slides are a manual differential, LOINC panel 24318-8 "Manual Differential panel -
Blood", with its method-less "/100 leukocytes" members. An AI-only result (unsigned; only when a lab turns that on)
is an automated differential, panel 57023-4 "Auto Differential panel - Blood", with the "by Automated count" codes.

The codes were checked against the panels' member lists (LOINC's 24318-8 and 57023-4 panel definitions, as
reproduced in the CIMI archetype generated from details.loinc.org/LOINC/24318-8 and in the NMDP CIBMTR reporting
IG value sets). Of the non-WBC categories only smudge cells have a member of 24318-8 (34992-8); immature
granulocytes, nucleated red cells (erythroblasts), platelets, artefacts and "other" have none, so they get a local
code in the lab's own coding system, never a guessed LOINC.
"""

from __future__ import annotations

from dataclasses import dataclass

LOINC = "LN"  # HL7 v2 table 0396 name of LOINC
LOINC_URI = "http://loinc.org"

MANUAL_PANEL = ("24318-8", "Manual Differential panel - Blood")
AUTOMATED_PANEL = ("57023-4", "Auto Differential panel - Blood")

# category -> (code, display, unit): LOINC when the panel has a member for it, None -> a local code
MANUAL_CODES: dict[str, tuple[str, str, str] | None] = {
    "neutrophil": ("26511-6", "Neutrophils/100 leukocytes in Blood", "%"),
    "lymphocyte": ("26478-8", "Lymphocytes/100 leukocytes in Blood", "%"),
    "monocyte": ("26485-3", "Monocytes/100 leukocytes in Blood", "%"),
    "eosinophil": ("26450-7", "Eosinophils/100 leukocytes in Blood", "%"),
    "basophil": ("30180-4", "Basophils/100 leukocytes in Blood", "%"),
    "smudge": ("34992-8", "Smudge cells/100 leukocytes in Blood", "%"),
    "immature_granulocyte": None,
    "erythroblast": None,
    "platelet": None,
    "artefact": None,
    "other": None,
}
AUTOMATED_CODES: dict[str, tuple[str, str, str] | None] = {
    "neutrophil": ("770-8", "Neutrophils/100 leukocytes in Blood by Automated count", "%"),
    "lymphocyte": ("736-9", "Lymphocytes/100 leukocytes in Blood by Automated count", "%"),
    "monocyte": ("5905-5", "Monocytes/100 leukocytes in Blood by Automated count", "%"),
    "eosinophil": ("713-8", "Eosinophils/100 leukocytes in Blood by Automated count", "%"),
    "basophil": ("706-2", "Basophils/100 leukocytes in Blood by Automated count", "%"),
}
LOCAL_UNIT = "/100{WBCs}"  # UCUM: count per 100 white cells (non-WBC categories)


@dataclass(frozen=True)
class ObservationCode:
    code: str
    text: str
    system: str  # "LN" or the lab's local coding-system name
    unit: str

    @property
    def is_loinc(self) -> bool:
        return self.system == LOINC

    @property
    def fhir_system(self) -> str:
        return LOINC_URI if self.is_loinc else f"urn:wbc-platform:codes:{self.system}"


def local_code(category: str, label: str, coding_system: str) -> ObservationCode:
    return ObservationCode(
        f"WBC-{category.upper().replace('_', '-')}"[:20], f"{label} /100 WBC", coding_system, LOCAL_UNIT
    )


def code_for(
    category: str, label: str, *, manual: bool, coding_system: str, overrides: dict | None = None
) -> ObservationCode:
    """The code of one reported category: the lab's override, else the table, else a local code."""
    override = (overrides or {}).get(category)
    if override and override.get("code"):
        system = override.get("system") or coding_system
        entry = MANUAL_CODES.get(category)
        unit = override.get("unit") or (entry[2] if entry else LOCAL_UNIT)
        return ObservationCode(override["code"], override.get("text") or label, system, unit)
    table = MANUAL_CODES if manual else AUTOMATED_CODES
    entry = table.get(category)
    if entry is None:
        return local_code(category, label, coding_system)
    code, text, unit = entry
    return ObservationCode(code, text, LOINC, unit)


def panel(manual: bool) -> tuple[str, str]:
    return MANUAL_PANEL if manual else AUTOMATED_PANEL


def mapping_rows(labels: dict[str, str], coding_system: str, overrides: dict | None = None) -> list[dict]:
    """The table as the settings page shows it: every category, its manual and automated code, and overrides."""
    rows = []
    for category, label in labels.items():
        manual = code_for(category, label, manual=True, coding_system=coding_system, overrides=overrides)
        automated = code_for(category, label, manual=False, coding_system=coding_system, overrides=overrides)
        rows.append(
            {
                "category": category,
                "label": label,
                "manual": manual,
                "automated": automated,
                "overridden": bool((overrides or {}).get(category, {}).get("code")),
            }
        )
    return rows
