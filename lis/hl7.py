"""HL7 v2.5.1 ORU^R01 result messages, built and validated with hl7apy (no hand-built pipe strings).

MSH: sending application and facility from the lab's LIS settings; MSH-10 the control id, stable per report
version. PID-3: the patient identifier an LIS supplied with the slide, else the accession (type ACSN). ORC/OBR:
placer number = the accession, filler number = our slide id; OBR-4 the panel; OBR-7 the observation time; OBR-22
the report time; OBR-25 F, C for a correction (P for an AI-only preliminary result); OBR-32 the principal result
interpreter (the signer). One OBX per reported cell type: NM, code^text^LN, the value, %, the lab's range, H/L/N,
F/C, OBX-16 the responsible observer (the signer), OBX-17 the method (the model, its version and sha256). NTE lines
carry the out-of-scope warning, the amendment reason and the model.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from hl7apy import v2_5_1 as dt
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message

from .content import LabReport, Person

VERSION = "2.5.1"
MESSAGE_TYPE = ("ORU", "R01", "ORU_R01")
TIME_FORMAT = "%Y%m%d%H%M%S"


def _when(moment: datetime) -> dt.DTM:
    return dt.DTM(moment.astimezone(UTC).replace(tzinfo=None), out_format=TIME_FORMAT, offset="+0000")


def _put(parent, name: str, value: str) -> None:
    """Set a field or component with a value of its own HL7 datatype (ST, IS, ID, FT…): hl7apy escapes the
    separators when it writes the message."""
    datatype = getattr(parent, name).datatype
    value = value[:199] if datatype in ("ST", "IS", "ID") else value
    setattr(parent, name, getattr(dt, datatype)(value))


def _set_person(field, who: Person) -> None:
    """An XCN (OBX-16) or the CNN of an NDL (OBR-32): id^family^given."""
    prefix = field.datatype.lower()
    parts = [who.username, who.family, who.given]
    for index, value in enumerate(parts, start=1):
        if value:
            if prefix == "xcn" and index == 2:
                _put(field.xcn_2, "fn_1", value)  # XCN-2 is a family name (FN)
            else:
                _put(field, f"{prefix}_{index}", value)


def _set_code(field, code: str, text: str, system: str) -> None:
    _put(field, "ce_1", code)
    _put(field, "ce_2", text)
    _put(field, "ce_3", system)


def _note(group, set_id: int, text: str, comment_type: str = "") -> int:
    note = group.add_segment("NTE")
    note.nte_1 = str(set_id)
    _put(note, "nte_2", "L")  # source: ancillary (filler) department
    _put(note, "nte_3", text)
    if comment_type:
        _set_code(note.nte_4, comment_type, {"RE": "Remark"}.get(comment_type, comment_type), "HL70364")
    return set_id + 1


def build_oru(report: LabReport, *, created_at: datetime | None = None) -> str:
    """The ORU^R01 message of one report, as ER7 (segments separated by CR); validated before it is returned."""
    lis = report.settings
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = message.msh
    _put(msh.msh_3, "hd_1", lis.sending_application)
    _put(msh.msh_4, "hd_1", lis.facility)
    if lis.receiving_application:
        _put(msh.msh_5, "hd_1", lis.receiving_application)
    if lis.receiving_facility:
        _put(msh.msh_6, "hd_1", lis.receiving_facility)
    msh.msh_7 = _when(created_at or report.issued_at).to_er7()  # replaces the default hl7apy fills in
    for index, value in enumerate(MESSAGE_TYPE, start=1):
        _put(msh.msh_9, f"msg_{index}", value)
    _put(msh, "msh_10", report.control_id)
    _put(msh.msh_11, "pt_1", "P")
    _put(msh, "msh_15", "AL")  # accept acknowledgement: always (the original mode ACK is what we wait for)
    _put(msh, "msh_16", "NE")
    _put(msh, "msh_18", "UNICODE UTF-8")

    result = message.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    pid.pid_5 = ""  # required but unknown here: the LIS holds the patient's name (empty, not "" which would erase it)
    if report.patient_id:
        _put(pid.pid_3, "cx_1", report.patient_id)
        if report.patient_authority:
            _put(pid.pid_3.cx_4, "hd_1", report.patient_authority)
        _put(pid.pid_3, "cx_5", "MR")
    else:  # no patient from the LIS: the accession only
        _put(pid.pid_3, "cx_1", report.accession or report.batch_uid)
        _put(pid.pid_3.cx_4, "hd_1", lis.facility)
        _put(pid.pid_3, "cx_5", "ACSN")

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = order.orc
    _put(orc, "orc_1", "RE")  # observations to follow
    if report.accession:
        _put(orc.orc_2, "ei_1", report.accession)
    _put(orc.orc_3, "ei_1", report.batch_uid)
    _put(orc.orc_3, "ei_2", lis.sending_application)
    _put(orc, "orc_5", "CM")  # order is completed
    obr = order.obr
    obr.obr_1 = "1"
    if report.accession:
        _put(obr.obr_2, "ei_1", report.accession)
    _put(obr.obr_3, "ei_1", report.batch_uid)
    _put(obr.obr_3, "ei_2", lis.sending_application)
    panel_code, panel_text = report.panel
    _set_code(obr.obr_4, panel_code, panel_text, "LN")
    obr.obr_7.ts_1 = _when(report.observed_at)
    obr.obr_22.ts_1 = _when(report.issued_at)
    _put(obr, "obr_24", "HM")  # diagnostic service section: hematology
    _put(obr, "obr_25", report.status)
    if report.signer is not None:
        _set_person(obr.obr_32.ndl_1, report.signer)

    set_id = _note(order, 1, f"Slide {report.slide_name}; pre-classified by {report.model_text}.")
    if report.out_of_scope_warning:
        set_id = _note(order, set_id, report.out_of_scope_warning, "RE")
    if report.amendment_reason:
        set_id = _note(order, set_id, f"Corrected report (version {report.version}): {report.amendment_reason}", "RE")

    result_status = "C" if report.is_correction else ("P" if report.status == "P" else "F")
    for index, line in enumerate(report.lines, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(index)
        _put(obx, "obx_2", "NM")
        _set_code(obx.obx_3, line.code.code, line.code.text, line.code.system)
        obx.obx_5 = str(Decimal(str(line.value)))
        _put(obx.obx_6, "ce_1", line.code.unit)
        _put(obx.obx_6, "ce_3", "UCUM")
        if line.range_text:
            _put(obx, "obx_7", line.range_text)
        if line.flag:
            _put(obx, "obx_8", line.flag)
        _put(obx, "obx_11", result_status)
        obx.obx_14.ts_1 = _when(report.observed_at)
        if report.signer is not None:
            _set_person(obx.obx_16, report.signer)
        _set_code(obx.obx_17, "WBC-AI", report.model_text, lis.local_coding_system)
        obx.obx_19.ts_1 = _when(report.issued_at)
    message.validate()
    return message.to_er7()


def parse(er7: str):
    """An ER7 message parsed back with hl7apy (groups found), e.g. to read a field in a test or a resend."""
    return parse_message(er7.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True)
