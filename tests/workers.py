"""Helpers for tests that run the real worker process (``tests.conftest.start_worker``): wait for a batch, stop it."""

from __future__ import annotations

import subprocess
import time

import pytest

WAIT_S = 180.0


def stop_worker(worker: subprocess.Popen) -> str:
    """Stop the worker (SIGTERM, then SIGKILL after 20 s) and return the end of its output."""
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=20)
    return worker.stdout.read()[-3000:] if worker.stdout else ""


def wait_until_finished(batch, worker: subprocess.Popen, seconds: float = WAIT_S):
    """Poll the batch (bounded) until it is done or failed; fail with the worker's output if the worker dies."""
    from reports.models import Batch

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch.refresh_from_db()
        if batch.status in (Batch.Status.DONE, Batch.Status.FAILED):
            return batch
        if worker.poll() is not None:
            pytest.fail(f"the worker exited ({worker.returncode}):\n{stop_worker(worker)}")
        time.sleep(0.2)
    pytest.fail(f"batch still {batch.status} after {seconds:g} s:\n{stop_worker(worker)}")


def after_each_stored_part(monkeypatch, action):
    """Make the worker run ``action()`` right after it stores each sub-batch; returns the real store function."""
    from reports import worker

    real_store = worker._store_part

    def store_then_act(*args):
        stored = real_store(*args)
        action()
        return stored

    monkeypatch.setattr(worker, "_store_part", store_then_act)
    return real_store
