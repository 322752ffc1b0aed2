"""FHIR R4 result messages, built from fhir.resources' R4B models (validated by pydantic as they are made).

A transaction Bundle: one Observation per reported cell type (valueQuantity in UCUM %, the lab's referenceRange, a
v3 ObservationInterpretation H/L/N, the method = the model with its version and sha256) and a DiagnosticReport
(category LAB, the panel code, subject, effectiveDateTime, issued, performer = the lab, resultsInterpreter = the
signer, status final / corrected, preliminary for an AI-only result). Every entry is a conditional update on a
stable identifier (the slide id, plus the cell type for an Observation), so a resend never makes a duplicate and
a correction replaces the earlier version in place.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation, ObservationReferenceRange
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference

from .content import LabReport, Person, ResultLine
from .loinc import LOINC_URI

UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
INTERPRETATION_TEXT = {"H": "High", "L": "Low", "N": "Normal"}
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
USER_SYSTEM = "urn:wbc-platform:user"
STATUS = {"F": "final", "C": "corrected", "P": "preliminary"}


def _entry_id(report: LabReport, part: str) -> str:
    """A fullUrl that is the same for every send of one report version (a resend is byte-identical)."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{report.control_id}/{part}')}"


def _quantity(value: float, unit: str) -> Quantity:
    return Quantity(value=value, unit=unit, system=UCUM, code=unit)


def _practitioner(who: Person) -> Reference:
    return Reference(
        type="Practitioner", identifier=Identifier(system=USER_SYSTEM, value=who.username), display=who.display
    )


def _subject(report: LabReport) -> Reference:
    lis = report.settings
    if report.patient_id:
        return Reference(type="Patient", identifier=Identifier(system=lis.patient_id_system, value=report.patient_id))
    return Reference(type="Patient", display=f"Patient of accession {report.accession or report.batch_uid}")


def _observation(report: LabReport, line: ResultLine, subject: Reference) -> Observation:
    lis = report.settings
    observation = Observation(
        identifier=[Identifier(system=lis.identifier_system, value=f"{report.batch_uid}-{line.category}")],
        status=STATUS[report.status],
        category=[CodeableConcept(coding=[Coding(system=OBSERVATION_CATEGORY, code="laboratory")])],
        code=CodeableConcept(
            coding=[Coding(system=line.code.fhir_system, code=line.code.code, display=line.code.text)],
            text=line.code.text,
        ),
        subject=subject,
        effectiveDateTime=report.observed_at.astimezone(UTC),
        issued=report.issued_at.astimezone(UTC),
        valueQuantity=_quantity(line.value, line.code.unit),
        method=CodeableConcept(text=f"Pre-classified by {report.model_text}"),
    )
    if report.signer is not None:
        observation.performer = [_practitioner(report.signer)]
    if line.low is not None and line.high is not None:
        observation.referenceRange = [
            ObservationReferenceRange(
                low=_quantity(line.low, line.code.unit), high=_quantity(line.high, line.code.unit)
            )
        ]
    if line.flag:
        observation.interpretation = [
            CodeableConcept(
                coding=[Coding(system=INTERPRETATION, code=line.flag, display=INTERPRETATION_TEXT[line.flag])]
            )
        ]
    return observation


def _conditional(resource_type: str, identifier: Identifier) -> str:
    return f"{resource_type}?identifier={quote(identifier.system, safe=':/')}|{quote(identifier.value, safe='')}"


def build_bundle(report: LabReport) -> Bundle:
    lis = report.settings
    subject = _subject(report)
    entries, results = [], []
    for line in report.lines:
        observation = _observation(report, line, subject)
        full_url = _entry_id(report, line.category)
        results.append(Reference(reference=full_url, display=line.code.text))
        entries.append(
            BundleEntry(
                fullUrl=full_url,
                resource=observation,
                request=BundleEntryRequest(method="PUT", url=_conditional("Observation", observation.identifier[0])),
            )
        )
    panel_code, panel_text = report.panel
    identifiers = [Identifier(system=lis.identifier_system, value=report.batch_uid)]
    if report.accession:
        identifiers.append(
            Identifier(
                type=CodeableConcept(coding=[Coding(system=V2_0203, code="ACSN", display="Accession ID")]),
                system=f"{lis.identifier_system}:accession",
                value=report.accession,
            )
        )
    conclusion = [f"Pre-classified by {report.model_text}."]
    if report.out_of_scope_warning:
        conclusion.append(report.out_of_scope_warning)
    if report.amendment_reason:
        conclusion.append(f"Corrected report (version {report.version}): {report.amendment_reason}")
    diagnostic = DiagnosticReport(
        identifier=identifiers,
        status=STATUS[report.status],
        category=[CodeableConcept(coding=[Coding(system=V2_0074, code="LAB", display="Laboratory")])],
        code=CodeableConcept(coding=[Coding(system=LOINC_URI, code=panel_code, display=panel_text)], text=panel_text),
        subject=subject,
        effectiveDateTime=report.observed_at.astimezone(UTC),
        issued=report.issued_at.astimezone(UTC),
        performer=[Reference(type="Organization", display=report.laboratory)],
        result=results,
        conclusion=" ".join(conclusion),
    )
    if report.signer is not None:
        diagnostic.resultsInterpreter = [_practitioner(report.signer)]
    entries.append(
        BundleEntry(
            fullUrl=_entry_id(report, "report"),
            resource=diagnostic,
            request=BundleEntryRequest(method="PUT", url=_conditional("DiagnosticReport", identifiers[0])),
        )
    )
    return Bundle(
        identifier=Identifier(system=f"{lis.identifier_system}:message", value=report.control_id),
        type="transaction",
        timestamp=report.issued_at.astimezone(UTC),
        entry=entries,
    )


def build_bundle_json(report: LabReport) -> str:
    return build_bundle(report).model_dump_json(exclude_none=True)


def parse_bundle(text: str) -> Bundle:
    """A Bundle read back and validated by fhir.resources (raises pydantic's ValidationError when invalid)."""
    return Bundle.model_validate_json(text)
