"""The worker runs at a lower CPU priority (WBC_WORKER_NICE) than web processes, every thread of it included.

Niceness cannot be taken back by an unprivileged process, so it is only ever changed in child processes here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from reports.models import Batch
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from tests.conftest import REPO, image_bytes, start_worker, unavailable
from tests.workers import stop_worker, wait_until_finished


def thread_niceness(pid: int) -> dict[int, int]:
    """The niceness of each thread of ``pid`` (Linux /proc)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        unavailable("reading each thread's niceness needs Linux /proc")
    found = {}
    for task in tasks.iterdir():
        try:
            found[int(task.name)] = os.getpriority(os.PRIO_PROCESS, int(task.name))
        except OSError:  # the thread ended meanwhile
            continue
    return found


CHILD = """
import os, threading
import django
django.setup()
from reports.management.commands.run_worker import lower_priority
started, done = threading.Event(), threading.Event()
helper = threading.Thread(target=lambda: (started.set(), done.wait()))
helper.start()
started.wait()
print(os.getpriority(os.PRIO_PROCESS, 0))
os.nice(5)  # as if started with systemd's Nice= 5 higher (this thread only, as Linux does it)
print(lower_priority(0), os.getpriority(os.PRIO_PROCESS, helper.native_id))
print(lower_priority(19), os.getpriority(os.PRIO_PROCESS, helper.native_id))
done.set()
"""


def test_lower_priority_sets_every_running_thread_and_never_raises_the_priority():
    if not Path("/proc/self/task").is_dir():
        unavailable("per-thread niceness is checked through Linux /proc")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "wbcsite.settings"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    lines = done.stdout.strip().splitlines()[-3:]
    start = int(lines[0])
    first, second = ([int(n) for n in line.split()] for line in lines[1:])
    # Asked for 0: nothing is lowered, the main thread stays 5 above where it started, the other thread where it was.
    assert first == [min(19, start + 5), start]
    # Asked for 19: every thread of the process, also one that was already running, now runs at 19.
    assert second == [19, 19]


@pytest.mark.django_db(transaction=True)
def test_the_running_worker_and_all_its_threads_run_at_the_configured_niceness(
    settings, technologist, tiny_record, models_dir
):
    wanted = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)  # above this test's own (a worker never goes below it)
    worker = start_worker(settings, models_dir, WBC_WORKER_NICE=str(wanted))
    try:
        lines = iter(worker.stdout.readline, "")
        assert any(line.strip() == "worker ready: waiting for batches" for line in lines)
        entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(40 * i, 90, 160))) for i in range(3)]
        batch = wait_until_finished(submit_batch(technologist, entries, tiny_record, name="Nice"), worker)
        assert batch.status == Batch.Status.DONE
        niceness = thread_niceness(worker.pid)  # with the threads made for the batch (ONNX Runtime, file pool)
        assert len(niceness) > 2
        assert set(niceness.values()) == {wanted}, niceness
    finally:
        stop_worker(worker)


def session_niceness(pid: int) -> int | None:
    """The niceness of the scheduling group (Linux autogroup) of ``pid``'s session; None for the kernel's root group,
    whose file is empty (a process whose ancestors never started a session of their own, e.g. one run straight from
    a VM's or container's init, as CI may run the tests)."""
    group = Path(f"/proc/{pid}/autogroup")
    if not group.is_file():
        unavailable("scheduling groups are read through Linux /proc/<pid>/autogroup")
    words = group.read_text().split()
    return int(words[-1]) if words else None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("own_session", [True, False], ids=["own session", "shared session"])
def test_a_worker_leading_its_own_session_lowers_the_session_too_and_never_a_shared_one(
    settings, models_dir, own_session
):
    ours = session_niceness(os.getpid())
    wanted = min(19, (ours or 0) + 7)
    worker = start_worker(settings, models_dir, own_session=own_session, WBC_WORKER_NICE=str(wanted))
    try:
        lines = iter(worker.stdout.readline, "")
        assert any(line.strip() == "worker ready: waiting for batches" for line in lines)
        assert session_niceness(worker.pid) == (wanted if own_session else ours)
        assert session_niceness(os.getpid()) == ours  # this test's own session (and so any web beside it) untouched
    finally:
        stop_worker(worker)


@pytest.mark.django_db(transaction=True)
def test_a_batch_round_run_inside_another_program_leaves_its_priority_alone(technologist, tiny_record):
    before = os.getpriority(os.PRIO_PROCESS, 0)
    batch = submit_batch(technologist, [NamedBytes("cell.png", image_bytes())], tiny_record, name="In process")
    call_command("run_worker", "--batch")  # e.g. the tests, or a program of the lab's own
    batch.refresh_from_db()
    assert batch.status == Batch.Status.DONE
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_the_setting_is_a_niceness_between_0_and_19():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "wbcsite.settings"}
    code = "import django; django.setup(); from django.conf import settings; print(settings.WBC_WORKER_NICE)"
    values = {}
    for raw in ("", "-3", "12", "40"):
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**env, "WBC_WORKER_NICE": raw},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        values[raw] = int(done.stdout.split()[-1])
    assert values == {"": 10, "-3": 0, "12": 12, "40": 19}
