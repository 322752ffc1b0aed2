import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from wbc_ml.review_flag import DEFAULT_THRESHOLD


class Command(BaseCommand):
    help = "Evaluate a saved model (its card beside it) on an image folder: a table, and JSON if asked."

    def add_arguments(self, parser):
        parser.add_argument("model", type=Path, help="path of the .keras file (its .json card must be beside it)")
        parser.add_argument("--data", required=True, type=Path, help="folder with one sub-folder per class")
        parser.add_argument(
            "--split",
            default="test",
            choices=["train", "val", "test", "all", "unseen"],
            help=(
                "which part of the deterministic split to use; 'all' for a lab's own folder; 'unseen' for the images "
                "an adapted model's card does not list as adaptation cells (default: test)"
            ),
        )
        parser.add_argument(
            "--threshold", type=float, default=DEFAULT_THRESHOLD, help="review threshold for the flagged share"
        )
        parser.add_argument("--json", type=Path, default=None, help="also write the metrics here")

    def handle(self, *args, **options):
        from wbc_ml.evaluation import evaluate_saved_model
        from wbc_ml.metrics import format_report

        if not options["model"].is_file():
            raise CommandError(f"{options['model']} does not exist")
        if not options["data"].is_dir():
            raise CommandError(f"--data {options['data']} is not a folder")
        try:
            result = evaluate_saved_model(options["model"], options["data"], options["split"], options["threshold"])
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        class_names = list(result["metrics"]["per_class"])
        self.stdout.write(f"{result['model']} on {result['data']} ({result['split']} split)")
        self.stdout.write(format_report(result["metrics"], class_names))
        self.stdout.write(
            f"flagged for review at {result['threshold']:.2f} counting the detectors: {result['flagged_share']:.2%} "
            f"(confidence alone {result['metrics']['flagged_share_confidence_only']:.2%})"
        )
        if options["json"]:
            options["json"].write_text(json.dumps(result, indent=2) + "\n")
            self.stdout.write(f"wrote {options['json']}")
