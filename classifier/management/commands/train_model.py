import shlex
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

ARCHITECTURES = ("enhanced_cnn_v2", "mobilenet_v2_head", "mobilenet_v2_finetuned")


class Command(BaseCommand):
    help = "Train one of the bundled architectures on an image folder and write the model and its card."

    def add_arguments(self, parser):
        parser.add_argument("--arch", required=True, choices=ARCHITECTURES)
        parser.add_argument("--data", required=True, type=Path, help="folder with one sub-folder per class")
        parser.add_argument("--out", type=Path, default=None, help="output folder (default: models/)")
        parser.add_argument("--epochs", type=int, default=40, help="maximum epochs (early stopping decides)")
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--patience", type=int, default=6)
        parser.add_argument("--seed", type=int, default=1234)
        parser.add_argument(
            "--imagenet-weights",
            default=None,
            help="MobileNetV2 ImageNet weights: 'imagenet' (download), the path of the no-top .h5 file, or 'none' "
            "(random initialisation, for smoke tests)",
        )
        parser.add_argument("--augment-copies", type=int, default=4, help="MobileNetV2: augmented copies cached")
        parser.add_argument(
            "--augmentation",
            choices=("mild", "travel"),
            default="mild",
            help="mild (default, the bundled models): flips, quarter turns, colour jitter; travel: also stain (HED), "
            "gamma, blur, scale and JPEG quality",
        )
        parser.add_argument("--finetune-epochs", type=int, default=10, help="MobileNetV2 fine-tuned: phase-2 epochs")
        parser.add_argument("--cache-dir", type=Path, default=None, help="MobileNetV2: keep the activation cache here")
        parser.add_argument("--max-per-class", type=int, default=None, help="subsample for a quick smoke run")

    OPTIONS = (
        "arch",
        "data",
        "out",
        "epochs",
        "batch_size",
        "patience",
        "seed",
        "imagenet_weights",
        "augment_copies",
        "augmentation",
        "finetune_epochs",
        "cache_dir",
        "max_per_class",
    )

    def command_line(self, options) -> str:
        """The command as it ran (recorded in the card), whichever way it was called."""
        parts = ["python", "manage.py", "train_model"]
        for name in self.OPTIONS:
            if options.get(name) is not None:
                parts += ["--" + name.replace("_", "-"), str(options[name])]
        return shlex.join(parts)

    def handle(self, *args, **options):
        from wbc_ml.training import TrainConfig, train  # TensorFlow loads only when training

        if not options["data"].is_dir():
            raise CommandError(f"--data {options['data']} is not a folder")
        config = TrainConfig(
            arch=options["arch"],
            data_dir=options["data"],
            out_dir=options["out"] or settings.WBC_MODELS_DIR,
            epochs=options["epochs"],
            batch_size=options["batch_size"],
            imagenet_weights=options["imagenet_weights"],
            patience=options["patience"],
            seed=options["seed"],
            augment_copies=options["augment_copies"],
            augmentation=options["augmentation"],
            finetune_epochs=options["finetune_epochs"],
            max_per_class=options["max_per_class"],
            cache_dir=options["cache_dir"],
            command=self.command_line(options),
        )

        def log(message: str) -> None:
            self.stdout.write(message)
            self.stdout.flush()

        card = train(config, log=log)
        self.stdout.write(self.style.SUCCESS(f"wrote {config.out_dir / card['file']} (sha256 {card['sha256'][:12]}…)"))
