import logging
import threading
import time

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import DatabaseError, connection
from django.utils import timezone
from django.utils.crypto import get_random_string
from django_tasks_db.management.commands.db_worker import Worker
from threadpoolctl import threadpool_limits

from reports.heartbeat import beat, forget_old_workers, stopped
from reports.wakeup import WakeupSocket
from reports.worker import recover_stale_batches

logger = logging.getLogger(__name__)


class Housekeeping(threading.Thread):
    """Beside the worker loop (so also while a long batch is being classified): the heartbeat every
    ``WBC_WORKER_HEARTBEAT_SECONDS``, and every ``WBC_WORKER_RECOVERY_SECONDS`` the batches a dead worker left."""

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
                        recovered = recover_stale_batches()
                        if recovered:
                            logger.warning("re-enqueued unfinished batch(es) %s", recovered)
                except DatabaseError as exc:  # e.g. a locked SQLite file: the next round tries again
                    logger.warning("worker housekeeping: %s", exc)
        finally:
            connection.close()

    def stop(self) -> None:
        self.finished.set()
        self.join(timeout=10)


class Command(BaseCommand):
    help = (
        "Start the background worker: it first hands unfinished batches of a dead worker to new tasks, and keeps "
        "doing so periodically; it writes a heartbeat the pages and /readyz read."
    )

    def add_arguments(self, parser):
        parser.add_argument("--batch", action="store_true", help="process what is queued, then exit")

    def handle(self, *args, **options):
        # NumPy's BLAS (the non-WBC detectors) runs on one thread: the cores belong to ONNX Runtime and the
        # decoding pool, and two busy-waiting thread pools on the same cores slow both.
        threadpool_limits(1, user_api="blas")
        worker_id = get_random_string(32)
        started_at = timezone.now()
        beat(worker_id, started_at)
        forget_old_workers()
        recovered = recover_stale_batches()
        if recovered:
            self.stdout.write(f"re-enqueued {len(recovered)} unfinished batch(es): {recovered}")
        # django-tasks-db's worker in batch mode runs every ready task and returns; between rounds this
        # process sleeps on its wake-up socket, so a new batch starts at once without polling the database
        # many times a second.
        logging.getLogger("django_tasks_db").setLevel(logging.WARNING)  # not "starting worker" every round
        worker = Worker(
            queue_names=["default"],
            interval=0.02,  # only used while the database is locked
            batch=True,
            backend_name="default",
            startup_delay=False,
            max_tasks=None,
            worker_id=worker_id,
            excluded_queue_names=[],
        )
        if options["batch"]:  # one round (tests, cron): no background thread
            try:
                worker.run()
            finally:
                stopped(worker_id)
            return
        housekeeping = Housekeeping(worker_id, started_at)
        housekeeping.start()
        try:
            worker.configure_signals()
            with WakeupSocket() as wakeup:
                worker.run()
                self.stdout.write("worker ready: waiting for batches")
                self.stdout.flush()
                while worker.running:
                    wakeup.wait(settings.WBC_WORKER_IDLE_SECONDS)
                    worker.run()
        finally:
            housekeeping.stop()
            stopped(worker_id)
