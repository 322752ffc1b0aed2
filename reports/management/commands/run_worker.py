import logging

from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils.crypto import get_random_string
from django_tasks_db.management.commands.db_worker import Worker
from threadpoolctl import threadpool_limits

from reports.wakeup import WakeupSocket
from reports.worker import recover_stale_batches


class Command(BaseCommand):
    help = "Start the background worker, first handing unfinished batches of a dead worker to new tasks."

    def add_arguments(self, parser):
        parser.add_argument("--batch", action="store_true", help="process what is queued, then exit")

    def handle(self, *args, **options):
        # NumPy's BLAS (the non-WBC detectors) runs on one thread: the cores belong to ONNX Runtime and the
        # decoding pool, and two busy-waiting thread pools on the same cores slow both.
        threadpool_limits(1, user_api="blas")
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
            worker_id=get_random_string(32),
            excluded_queue_names=[],
        )
        if options["batch"]:
            worker.run()
            return
        worker.configure_signals()
        with WakeupSocket() as wakeup:
            worker.run()
            self.stdout.write("worker ready: waiting for batches")
            self.stdout.flush()
            while worker.running:
                wakeup.wait(settings.WBC_WORKER_IDLE_SECONDS)
                worker.run()
