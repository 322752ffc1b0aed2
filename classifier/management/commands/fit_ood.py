import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Fit a trained model's 'not one of the five WBC classes' detectors again and update its card, under a new "
        "version (register_models then offers the new version and retires the old one)."
    )

    def add_arguments(self, parser):
        parser.add_argument("model", type=Path, help="path of the .keras file (its .json card must be beside it)")
        parser.add_argument("--data", required=True, type=Path, help="the pbc/ folder; pbc-non-wbc/ must be beside it")

    def handle(self, *args, **options):
        from wbc_ml.evaluation import refit_ood

        if not options["model"].is_file() or not options["data"].is_dir():
            raise CommandError("give an existing model file and data folder")
        ood = refit_ood(options["model"], options["data"], log=self.stdout.write)
        self.stdout.write(json.dumps({k: v for k, v in ood.items() if k != "method"}, indent=2))
        self.stdout.write("Run 'python manage.py register_models' to update the registry's copy of the card.")
