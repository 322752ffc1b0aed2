import logging
import os
import threading
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import DatabaseError, InterfaceError, OperationalError, connection, connections
from django.utils import timezone
from django.utils.crypto import get_random_string
from django_tasks_db.management.commands.db_worker import Worker
from threadpoolctl import threadpool_limits

from reports.heartbeat import beat, forget_old_workers, stopped
from reports.wakeup import WORKER, listen
from reports.worker import recover_stale_chunks, stopping
from wbc_ml.inference import set_onnx_threads
from wbcsite.thread_switching import apply_switch_interval

logger = logging.getLogger(__name__)
MAX_BACKOFF_SECONDS = 10.0  # the longest pause between tries while the database is unreachable
CHUNK_QUEUE = "default"  # the batch chunks (reports.tasks)
SIDE_TASK_STOP_SECONDS = 30.0  # how long a stopping worker waits for a side-queue task to end its step


def lower_priority(niceness: int) -> int:
    """Raise the niceness of every thread of this process to ``niceness`` (never lower it); returns the niceness.

    On Linux niceness belongs to each thread and a new thread inherits its creator's, so every thread already
    running (e.g. a BLAS pool started at import) is set too, and those started later (ONNX Runtime's, the file
    pool's, housekeeping) follow. Elsewhere the process as a whole is set.
    """
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # the process (or, on Linux without /proc, this thread)
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError as exc:  # the thread ended meanwhile, or a platform without it: a slower web, not an error
            logger.debug("niceness of thread %s left as it is: %s", tid, exc)
    return os.getpriority(os.PRIO_PROCESS, 0)


AUTOGROUP = Path("/proc/self/autogroup")


def lower_session_priority(niceness: int) -> None:
    """Give this process's scheduling group the niceness ``niceness`` too, when the process leads its own session.

    Linux (with autogroup scheduling, the default) shares the CPU between sessions first and weighs a thread's
    niceness only against threads of its own session. A worker that leads its own session (started by a process
    supervisor, ``setsid`` or a load test) would take a full share beside the web processes' session, niceness or
    not: in ``benchmarks/load.py``'s stack the two workers took 1.0-1.9 s of the 2 cores' CPU during a 1.5-s burst
    of submissions. A worker that shares a session (started from a shell beside the web server) leaves the group
    as it is, since that would lower the web's priority as well. Never lowers the group's niceness.
    """
    if os.getsid(0) != os.getpid():
        return
    try:
        if int(AUTOGROUP.read_text().split()[-1]) < niceness:
            AUTOGROUP.write_text(str(niceness))
    except (OSError, ValueError, IndexError) as exc:  # another kernel, or no autogroup: nothing to set
        logger.debug("session niceness left as it is: %s", exc)


class Housekeeping(threading.Thread):
    """Beside the worker loop (so also while a chunk is being classified): the heartbeat every
    ``WBC_WORKER_HEARTBEAT_SECONDS``, and every ``WBC_WORKER_RECOVERY_SECONDS`` the chunks a dead worker left."""

    def __init__(self, worker_id: str, started_at) -> None:
        super().__init__(name="worker-housekeeping", daemon=True)
        self.worker_id, self.started_at = worker_id, started_at
        self.finished = threading.Event()

    def run(self) -> None:
        next_recovery = time.monotonic() + settings.WBC_WORKER_RECOVERY_SECONDS
        try:
            while not self.finished.wait(settings.WBC_WORKER_HEARTBEAT_SECONDS):
                try:
                    beat(self.worker_id, self.started_at)
                    if time.monotonic() >= next_recovery:
                        next_recovery = time.monotonic() + settings.WBC_WORKER_RECOVERY_SECONDS
                        recovered = recover_stale_chunks()
                        if recovered:
                            logger.warning("re-enqueued unfinished chunk(s) %s", recovered)
                except (DatabaseError, InterfaceError) as exc:  # a locked SQLite file, a database restart: try again
                    logger.warning("worker housekeeping: %s", exc)
                    connection.close()
        finally:
            connection.close()

    def stop(self) -> None:
        self.finished.set()
        self.join(timeout=10)


class ChunkWorker(Worker):
    """django-tasks-db's worker, whose first SIGTERM/SIGINT also asks the chunk in hand to stop.

    Its own handling stays: idle, the process exits at once (0); busy, the task is let finish and the loop ends.
    Our chunk task sees :data:`reports.worker.stopping`, stores the sub-batch in hand and releases the chunk, so the
    stop takes a fraction of a second and no chunk is left running with a live lease. A second signal exits at once
    (the chunk is then released on the way out, if the database answers).
    """

    def shutdown(self, signum, frame) -> None:
        stopping.set()
        super().shutdown(signum, frame)


def run_rounds(worker: Worker, ready_message: str = "") -> None:
    """Run every ready task, then sleep on the wake-up until a task is queued (or the idle timeout), while
    ``worker.running``. A database outage is waited out: the connections are closed, the pause grows (bounded),
    and work carries on when the database answers again. ``ready_message`` is printed after the first round."""
    pause = 0.5
    with listen(WORKER) as wakeup:
        first = True
        while worker.running:
            try:
                worker.run()
                pause = 0.5
            except (OperationalError, InterfaceError) as exc:
                logger.warning("database unavailable (%s); trying again in %.1f s", exc, pause)
                connections.close_all()
                wakeup.wait(pause)
                pause = min(pause * 2, MAX_BACKOFF_SECONDS)
                continue
            if first and ready_message:
                print(ready_message, flush=True)
            first = False
            if worker.running:
                wakeup.wait(settings.WBC_WORKER_IDLE_SECONDS)


def side_queues() -> list[str]:
    """The task queues other than the chunks' (``TASKS['default']['QUEUES']``): e.g. 'adaptation', jobs that train
    for minutes."""
    return [queue for queue in settings.TASKS["default"].get("QUEUES", [CHUNK_QUEUE]) if queue != CHUNK_QUEUE]


class SideQueueThread(threading.Thread):
    """The side queues, beside the chunk loop: a lab's batches never wait behind an adaptation job. A task there
    sees :data:`reports.worker.stopping` once the worker is asked to stop, and ends at its next step."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="worker-side-queues", daemon=True)
        self.worker = worker

    def run(self) -> None:
        try:
            run_rounds(self.worker)
        finally:
            connection.close()

    def stop(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for a running task to end its step; idle, the thread just ends with the process
        (a daemon thread)."""
        stopping.set()
        self.worker.running = False
        if self.worker.running_task:
            self.join(timeout=timeout)


def task_worker(worker_class: type[Worker], queues: list[str], worker_id: str) -> Worker:
    """django-tasks-db's worker on ``queues`` in batch mode: each ``run()`` runs every ready task and returns, and
    :func:`run_rounds` sleeps on the wake-up in between (LISTEN on PostgreSQL, a socket on SQLite), so a new task
    starts at once without polling the database many times a second."""
    return worker_class(
        queue_names=queues,
        interval=0.02,  # only used while the database is locked
        batch=True,
        backend_name="default",
        startup_delay=False,
        max_tasks=None,
        worker_id=worker_id,
        excluded_queue_names=[],
    )


class Command(BaseCommand):
    help = (
        "Start the background worker: it classifies queued chunks of batches (with any number of other workers, on "
        "any host sharing the database and storage), runs adaptation jobs in a thread beside them, hands the chunks "
        "a dead worker left to new tasks, and writes a heartbeat the pages and /readyz read. SIGTERM: the chunk in "
        "hand is released, a running adaptation job fails at its next step, then the worker exits."
    )

    def add_arguments(self, parser):
        parser.add_argument("--batch", action="store_true", help="process what is queued, then exit")

    def handle(self, *args, **options):
        # NumPy's BLAS (the non-WBC detectors) runs on one thread: the cores belong to ONNX Runtime and the
        # decoding pool, and two busy-waiting thread pools on the same cores slow both.
        threadpool_limits(1, user_api="blas")
        set_onnx_threads(settings.WBC_ONNX_THREADS)
        worker_id = get_random_string(32)
        started_at = timezone.now()
        beat(worker_id, started_at)
        forget_old_workers()
        recovered = recover_stale_chunks()
        if recovered:
            self.stdout.write(f"re-enqueued {len(recovered)} unfinished chunk(s): {recovered}")
        logging.getLogger("django_tasks_db").setLevel(logging.WARNING)  # not "starting worker" every round
        if options["batch"]:  # one round (tests, cron) of every queue: no background thread
            try:
                task_worker(ChunkWorker, [CHUNK_QUEUE, *side_queues()], worker_id).run()
            finally:
                stopped(worker_id)
            return
        # The long-running worker only (a --batch round may run inside another program, e.g. the tests), and before
        # it starts threads of its own: they inherit it.
        lower_priority(settings.WBC_WORKER_NICE)
        lower_session_priority(settings.WBC_WORKER_NICE)
        apply_switch_interval()
        housekeeping = Housekeeping(worker_id, started_at)
        housekeeping.start()
        side = SideQueueThread(task_worker(Worker, side_queues(), f"{worker_id}-side"))
        side.start()
        worker = task_worker(ChunkWorker, [CHUNK_QUEUE], worker_id)
        try:
            worker.configure_signals()
            run_rounds(worker, "worker ready: waiting for batches")
        finally:
            side.stop(timeout=SIDE_TASK_STOP_SECONDS)
            housekeeping.stop()
            try:
                stopped(worker_id)
            except (DatabaseError, InterfaceError) as exc:  # the heartbeat goes stale instead
                logger.warning("could not record the stop: %s", exc)
