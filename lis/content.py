"""What a result message says, gathered once from a signed report version (or, for an AI-only result, from the
slide as it stands) and read by both builders (HL7 v2 and FHIR), so the two never disagree."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.utils import timezone

from accounts.models import CellCategory, LabSettings
from reports.differential import build_differential, category_labels
from reports.models import Batch, ReportVersion

from .loinc import ObservationCode, code_for, panel
from .models import LisSettings, SlidePatient

OUT_OF_SCOPE_KEY = "warning"


@dataclass(frozen=True)
class Person:
    username: str
    family: str
    given: str

    @property
    def display(self) -> str:
        return f"{self.given} {self.family}".strip() or self.username


@dataclass(frozen=True)
class ResultLine:
    category: str
    code: ObservationCode
    value: float  # percent of WBC, or count per 100 WBC
    low: float | None
    high: float | None
    flag: str  # H / L / N, or "" without a range
    count: int

    @property
    def range_text(self) -> str:
        return f"{self.low:g}-{self.high:g}" if self.low is not None and self.high is not None else ""


@dataclass
class LabReport:
    """Everything both message formats carry."""

    control_id: str
    manual: bool  # technologist-verified (signed) vs AI-only
    status: str  # "F" final, "C" correction, "P" preliminary (AI-only)
    batch_uid: str
    accession: str
    slide_name: str
    laboratory: str
    patient_id: str
    patient_authority: str
    observed_at: datetime  # when the slide was made (OBR-7, effectiveDateTime)
    issued_at: datetime  # when it was signed (or countersigned) / built
    version: int | None
    amendment_reason: str
    signer: Person | None
    countersigner: Person | None
    model_name: str
    model_version: str
    model_sha256: str
    out_of_scope_warning: str
    lines: list[ResultLine] = field(default_factory=list)
    settings: LisSettings | None = None

    @property
    def panel(self) -> tuple[str, str]:
        return panel(self.manual)

    @property
    def is_correction(self) -> bool:
        return self.status == "C"

    @property
    def model_text(self) -> str:
        return f"{self.model_name} v{self.model_version} (sha256 {self.model_sha256 or 'unknown'})"


def person(user) -> Person | None:
    if user is None:
        return None
    return Person(user.get_username(), user.last_name, user.first_name)


def is_final(version: ReportVersion, lab_settings: LabSettings | None = None) -> bool:
    """Signed and, when the lab wants two people, countersigned."""
    if version.signed_at is None:
        return False
    lab_settings = lab_settings or LabSettings.for_lab(version.batch.laboratory_id)
    return version.countersigned_at is not None or not lab_settings.two_person_signoff


def control_id_for(version: ReportVersion | None, batch: Batch) -> str:
    """MSH-10 and the Bundle identifier: the same for every send of one report version (at most 20 characters)."""
    return f"WBC{version.pk}V{version.number}"[:20] if version is not None else f"WBCAI{batch.pk}"[:20]


def _lines(snapshot: dict, manual: bool, lis: LisSettings, labels: dict[str, str]) -> list[ResultLine]:
    lines = []
    for row in snapshot.get("differential") or []:
        name = row["class"]
        code = code_for(
            name, name.capitalize(), manual=manual, coding_system=lis.local_coding_system, overrides=lis.code_overrides
        )
        lines.append(
            ResultLine(
                name, code, float(row["percent"]), row.get("low"), row.get("high"), row.get("flag") or "", row["count"]
            )
        )
    for row in snapshot.get("non_wbc") or []:
        if row.get("per_100_wbc") is None:
            continue
        key = row["key"]
        label = row.get("label") or labels.get(key, key)
        code = code_for(key, label, manual=manual, coding_system=lis.local_coding_system, overrides=lis.code_overrides)
        lines.append(ResultLine(key, code, float(row["per_100_wbc"]), None, None, "", row["count"]))
    return lines


def _base(batch: Batch, lis: LisSettings) -> dict:
    patient = SlidePatient.objects.filter(batch=batch).first()
    return {
        "batch_uid": str(batch.uid),
        "accession": batch.external_id,
        "slide_name": batch.name,
        "laboratory": batch.laboratory.name,
        "patient_id": patient.patient_id if patient else "",
        "patient_authority": patient.assigning_authority if patient else "",
        "observed_at": batch.created_at,
        "model_name": batch.model.name,
        "model_version": batch.model.version,
        "model_sha256": batch.model.sha256,
        "settings": lis,
    }


def report_for_version(version: ReportVersion) -> LabReport:
    """The message content of a signed version, from its snapshot (the report exactly as signed)."""
    batch = Batch.objects.select_related("laboratory", "model").get(pk=version.batch_id)
    lis = LisSettings.for_lab(batch.laboratory_id)
    snapshot = version.snapshot or {}
    model = snapshot.get("model") or {}
    base = _base(batch, lis)
    base.update(
        model_name=model.get("name") or base["model_name"],
        model_version=model.get("version") or base["model_version"],
        model_sha256=model.get("sha256") or base["model_sha256"],
    )
    issued = max(t for t in (version.signed_at, version.countersigned_at) if t is not None)
    return LabReport(
        control_id=control_id_for(version, batch),
        manual=True,
        status="C" if version.number > 1 else "F",
        issued_at=issued,
        version=version.number,
        amendment_reason=version.amendment_reason,
        signer=person(version.signed_by),
        countersigner=person(version.countersigned_by),
        out_of_scope_warning=(snapshot.get("out_of_scope") or {}).get(OUT_OF_SCOPE_KEY) or "",
        lines=_lines(snapshot, True, lis, category_labels(batch.laboratory_id)),
        **base,
    )


def report_ai_only(batch: Batch) -> LabReport:
    """A preliminary, AI-only result of an unsigned slide (automated-differential codes; status P)."""
    from reports.review import differential_payload  # the same JSON shape as a signed snapshot

    lis = LisSettings.for_lab(batch.laboratory_id)
    CellCategory.for_lab(batch.laboratory_id)
    payload = differential_payload(build_differential(batch, batch.threshold))
    return LabReport(
        control_id=control_id_for(None, batch),
        manual=False,
        status="P",
        issued_at=batch.finished_at or timezone.now(),
        version=None,
        amendment_reason="",
        signer=None,
        countersigner=None,
        out_of_scope_warning=payload["out_of_scope"].get(OUT_OF_SCOPE_KEY) or "",
        lines=_lines(payload, False, lis, category_labels(batch.laboratory_id)),
        **_base(batch, lis),
    )
