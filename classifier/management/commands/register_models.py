from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from classifier.registry import CardError, bundled_cards, register_card


class Command(BaseCommand):
    help = "Register (or update) every model described by a model card in the models folder."

    def add_arguments(self, parser):
        parser.add_argument("--models-dir", type=Path, default=None)

    def handle(self, *args, **options):
        models_dir = options["models_dir"] or Path(settings.WBC_MODELS_DIR)
        cards = bundled_cards(models_dir)
        if not cards:
            raise CommandError(f"no model cards (*.json) in {models_dir}")
        failures = 0
        for card_path in cards:
            try:
                record, created = register_card(card_path)
            except CardError as exc:
                failures += 1
                self.stderr.write(self.style.ERROR(str(exc)))
                continue
            verb = "registered" if created else "updated"
            self.stdout.write(f"{verb} {record} ({record.file_name}, test accuracy {record.test_accuracy})")
            self.stdout.write(f"  serving: {record.onnx_status}")
        if failures:
            raise CommandError(f"{failures} model card(s) could not be registered")
