"""The sandbox every child process that touches an uploaded model file runs in.

:func:`run_child` starts ``python -m <module>`` (a module of ``wbc_ml``, which imports no Django), sends it one
JSON request on stdin and reads one JSON line back from its stdout. Used by the vetting child
(:mod:`wbc_ml.vetting_child`) and the saliency child (:mod:`wbc_ml.saliency_child`), so an uploaded file is only
ever loaded by Keras in a process like this one:

* a scrubbed environment: only :data:`CHILD_ENV_NAMES` (``PATH``, ``PYTHONPATH``, ``LANG``, ``HOME`` and
  ``TMPDIR`` set to its own empty temporary working directory, thread caps, TensorFlow's log level);
  no secret, database URL or cloud credential of the web process reaches it;
* no network: it runs under ``unshare -n`` (``unshare -rn`` when not root), a network namespace with
  nothing but a downed loopback, when a probe run shows this host allows it (:func:`network_isolation`).
  Where it does not (no ``unshare``, no user namespaces, e.g. in some containers), the child runs
  without that isolation and a warning is logged once; the other limits still apply;
* its own session (process group), so a time-out kills the whole group;
* resource limits, set by the child itself first thing (:func:`apply_limits`): memory with ``RLIMIT_DATA``
  (``memory_limit_mb``) plus a looser ``RLIMIT_AS`` backstop, because TensorFlow reserves far more address
  space than it uses; CPU seconds, the size of any file it writes, open files, and no core dumps.

Only the standard library is imported here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
ADDRESS_SPACE_HEADROOM_MB = 4096  # RLIMIT_AS = memory_limit_mb + this (TensorFlow reserves a lot)
CHILD_THREADS = "2"  # a child runs one tiny job; keeps its thread (and stack) count low
CHILD_MAX_OPEN_FILES = 1024  # RLIMIT_NOFILE
CHILD_MAX_WRITTEN_MB = 2048  # RLIMIT_FSIZE: the largest file a child may write (an ONNX copy, a model copy)
REPO_ROOT = Path(__file__).resolve().parent.parent  # so the child can import wbc_ml (and nothing of Django)
CHILD_ENV_NAMES = frozenset(
    {
        "PATH",
        "PYTHONPATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "TF_CPP_MIN_LOG_LEVEL",
        "CUDA_VISIBLE_DEVICES",
        "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS",
        "OMP_NUM_THREADS",
        "MALLOC_ARENA_MAX",
        "KERAS_BACKEND",
    }
)


class SandboxError(RuntimeError):
    """The child gave no report; callers turn this into their own message for the user."""


class SandboxTimeout(SandboxError):
    """The child ran past its wall-clock time-out; its whole process group was killed."""

    def __init__(self, timeout_s: float):
        super().__init__(f"the child process took longer than {timeout_s:g} s")
        self.timeout_s = timeout_s


class SandboxCrashed(SandboxError):
    """The child exited without writing its JSON report; ``how`` says how it ended, in words."""

    def __init__(self, how: str):
        super().__init__(f"the child process ended ({how}) without a report")
        self.how = how


def child_environment(workdir: Path) -> dict[str, str]:
    """The child's whole environment: nothing of the web process's (secrets, database URL, cloud keys)."""
    return {
        "PATH": os.environ.get("PATH") or os.defpath,
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "-1",  # the children need no GPU; keep it away from the serving process's
        "TF_NUM_INTRAOP_THREADS": CHILD_THREADS,
        "TF_NUM_INTEROP_THREADS": CHILD_THREADS,
        "OMP_NUM_THREADS": CHILD_THREADS,
        "MALLOC_ARENA_MAX": "2",
        "KERAS_BACKEND": "tensorflow",
    }


@functools.cache
def network_isolation() -> tuple[str, ...] | None:
    """The ``unshare`` prefix that puts the child in an empty network namespace, if a probe run works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        logger.warning("no unshare on this host: uploaded model files are handled without network isolation")
        return None
    flag_sets = (("-n",), ("-rn",)) if os.geteuid() == 0 else (("-rn",),)
    for flags in flag_sets:
        prefix = (unshare, *flags, "--")
        try:
            probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix
    logger.warning(
        "unshare cannot create a network namespace here: uploaded model files are handled without network isolation"
    )
    return None


def run_child(module: str, request: dict, workdir: Path, *, timeout_s: float, memory_limit_mb: int) -> dict:
    """Run ``python -m module`` in ``workdir`` (an empty temporary folder the caller owns) and return its report.

    The request gets the limits the child applies to itself (see :func:`apply_limits`). Raises
    :class:`SandboxTimeout` (the process group is killed and reaped) or :class:`SandboxCrashed`.
    """
    request = {
        **request,
        "memory_limit_mb": memory_limit_mb,
        "cpu_limit_s": int(2 * timeout_s) + 10,  # a backstop if this process dies; the wall clock rules
        "max_open_files": CHILD_MAX_OPEN_FILES,
        "max_written_bytes": CHILD_MAX_WRITTEN_MB * MIB,
    }
    command = [*(network_isolation() or ()), sys.executable, "-s", "-m", module]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env=child_environment(workdir),
        start_new_session=True,  # its own process group, killed as a whole on time-out
    )
    try:
        stdout, stderr = process.communicate(json.dumps(request).encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.communicate()
        raise SandboxTimeout(timeout_s) from None
    except BaseException:
        _kill_group(process)
        process.communicate()
        raise
    return _read_report(module, process.returncode, stdout, stderr, time.monotonic() - started)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group; only while the child is not yet reaped (its pid,
    hence the group id, cannot have been reused)."""
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_report(module: str, returncode: int, stdout: bytes, stderr: bytes, elapsed: float) -> dict:
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    report = None
    if lines:
        try:
            report = json.loads(lines[-1])
        except ValueError:
            report = None
    if isinstance(report, dict):
        return report
    tail = stderr.decode("utf-8", "replace")[-2000:]
    logger.warning("%s exited with status %s after %.1f s; stderr tail:\n%s", module, returncode, elapsed, tail)
    if returncode is not None and returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit status {returncode}"
    raise SandboxCrashed(how)


# --- inside the child ---------------------------------------------------------------------------------


def apply_limits(request: dict) -> None:
    """Cap the calling (child) process: RLIMIT_DATA is the real memory cap, RLIMIT_AS a generous backstop;
    CPU seconds, written file size, open files, and no core dumps."""
    try:
        import resource
    except ImportError:  # not on POSIX: the time-out still applies
        return
    memory_limit_mb = int(request["memory_limit_mb"])
    limits = (
        ("RLIMIT_DATA", memory_limit_mb * MIB),
        ("RLIMIT_AS", (memory_limit_mb + ADDRESS_SPACE_HEADROOM_MB) * MIB),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NOFILE", int(request["max_open_files"])),
        ("RLIMIT_FSIZE", int(request["max_written_bytes"])),
        ("RLIMIT_CPU", int(request["cpu_limit_s"])),
    )
    for name, value in limits:
        which = getattr(resource, name, None)
        if which is None:
            continue
        _soft, hard = resource.getrlimit(which)
        cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (cap, cap))


def report_channel() -> int:
    """In the child: keep the original stdout for the one-line report and send everything else printed
    (TensorFlow, Keras) to stderr. Returns the file descriptor to give :func:`write_report`."""
    result_fd = os.dup(1)
    os.dup2(2, 1)
    return result_fd


def write_report(result_fd: int, report: dict) -> None:
    """In the child: the one JSON line the parent reads."""
    with os.fdopen(result_fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(report) + "\n")
