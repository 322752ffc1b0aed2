from django.core.management import call_command
from django.core.management.base import BaseCommand
from threadpoolctl import threadpool_limits

from classifier.batches import recover_stale_batches


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
        extra = ["--batch"] if options["batch"] else []
        call_command("db_worker", "--no-startup-delay", "--interval", "0.05", *extra)
