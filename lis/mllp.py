"""Send one HL7 v2 message over MLLP (optionally TLS) and read its acknowledgement, with python-hl7's asyncio
streams (MLLP framing) and parser. The caller decides what the outcome means for the outbox."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection

ENCODING = "utf-8"  # MSH-18 says UNICODE UTF-8
ACCEPTED = {"AA", "CA"}
REFUSED = {"AE", "AR", "CE", "CR"}


@dataclass(frozen=True)
class AckResult:
    code: str  # MSA-1
    control_id: str  # MSA-2: the control id it acknowledges
    text: str  # MSA-3 and any ERR segments, for the person who reads the delivery list

    @property
    def accepted(self) -> bool:
        return self.code in ACCEPTED


class TransportError(OSError):
    """No acknowledgement: refused, timed out, dropped, or not an HL7 acknowledgement. Retried later."""


def _ack_text(ack: hl7.Message) -> str:
    parts = []
    msa = ack.segment("MSA")
    if len(msa) > 3 and str(msa[3]):
        parts.append(ack.unescape(str(msa[3])))
    try:
        errors = ack.segments("ERR")
    except KeyError:
        errors = []
    for err in errors:
        detail = [ack.unescape(str(err[i])) for i in (3, 7, 8) if len(err) > i and str(err[i])]
        if detail:
            parts.append(" / ".join(detail))
    return "; ".join(parts)


def read_ack(ack: hl7.Message) -> AckResult:
    try:
        msa = ack.segment("MSA")
    except KeyError as exc:
        raise TransportError("The reply has no MSA segment; it is not an HL7 acknowledgement.") from exc
    return AckResult(str(msa[1]).strip(), str(msa[2]).strip(), _ack_text(ack))


async def _exchange(host: str, port: int, er7: str, timeout: float, tls: ssl.SSLContext | None) -> AckResult:
    kwargs = {"ssl": tls, "server_hostname": host} if tls is not None else {}
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, encoding=ENCODING, **kwargs), timeout)
    try:
        writer.writemessage(hl7.parse(er7, encoding=ENCODING))
        await asyncio.wait_for(writer.drain(), timeout)
        ack = await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
    return read_ack(ack)


def send(
    host: str, port: int, er7: str, *, timeout: float, use_tls: bool = False, cafile: str | None = None
) -> AckResult:
    """Send ``er7`` and wait (at most ``timeout`` seconds per step) for its ACK. Raises TransportError when no
    acknowledgement came back (the message may or may not have arrived: the outbox sends it again)."""
    tls = ssl.create_default_context(cafile=cafile) if use_tls else None
    try:
        return asyncio.run(_exchange(host, port, er7, timeout, tls))
    except TransportError:
        raise
    except TimeoutError as exc:
        raise TransportError(f"No acknowledgement within {timeout:g} s.") from exc
    except asyncio.IncompleteReadError as exc:
        raise TransportError("The connection was closed before an acknowledgement came.") from exc
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"Connection failed: {exc.strerror or exc}") from exc
    except (ValueError, IndexError, InvalidBlockError, hl7.HL7Exception) as exc:
        raise TransportError(f"The reply could not be read as HL7: {exc}") from exc
