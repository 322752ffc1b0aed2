import json
import shlex
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Adapt a model (its card beside it) to a lab's labelled cells: K random cells per class of --data, "
        "method and hyper-parameters chosen by cross-validation on them; writes OUT.keras, OUT.json, OUT.ood.npz."
    )

    def add_arguments(self, parser):
        parser.add_argument("model", type=Path, help="the base .keras file (its .json card must be beside it)")
        parser.add_argument("--data", required=True, type=Path, help="the lab's folder, one sub-folder per class")
        parser.add_argument(
            "--train-per-class",
            type=int,
            default=20,
            help="labelled cells per class to adapt on (half of a class that has fewer than twice that); default 20",
        )
        parser.add_argument("--seed", type=int, default=0, help="which random cells are taken (default 0)")
        parser.add_argument("--out", required=True, type=Path, help="the adapted model's .keras path")
        parser.add_argument(
            "--method",
            choices=["auto", "bn", "head", "finetune"],
            default="auto",
            help="'auto' (default) tries all and keeps the best by cross-validation",
        )

    def handle(self, *args, **options):
        from wbc_ml import datasets
        from wbc_ml.adaptation import METHODS, AdaptationRefused, AdaptConfig, adapt_model, choose_cells
        from wbc_ml.evaluation import load_card

        base, data, out = options["model"], options["data"], options["out"]
        if not base.is_file():
            raise CommandError(f"{base} does not exist")
        if not data.is_dir():
            raise CommandError(f"--data {data} is not a folder")
        if out.suffix != ".keras":
            raise CommandError("--out must end with .keras")
        if out.resolve() == base.resolve():
            raise CommandError("--out must not overwrite the base model")
        try:
            card = load_card(base)
            samples = datasets.list_images(data, tuple(card["class_names"]))
            cells = choose_cells(samples, list(card["class_names"]), options["train_per_class"], options["seed"])
            methods = METHODS if options["method"] == "auto" else (options["method"],)
            result = adapt_model(
                base,
                cells,
                out,
                data,
                AdaptConfig(methods=methods, seed=options["seed"]),
                command=shlex.join(
                    [
                        "python",
                        "manage.py",
                        "adapt_model",
                        str(base),
                        "--data",
                        str(data),
                        "--train-per-class",
                        str(options["train_per_class"]),
                        "--seed",
                        str(options["seed"]),
                        "--out",
                        str(out),
                        "--method",
                        options["method"],
                    ]
                ),
                log=self.stdout.write,
            )
        except (FileNotFoundError, AdaptationRefused) as exc:
            raise CommandError(str(exc)) from exc
        adaptation = result["adaptation"]
        summary = {
            "method": adaptation["method"],
            "params": adaptation["params"],
            "cells_per_class": adaptation["cells_per_class"],
            "cross_validation": result["metrics"]["cross_validation"],
            "seconds": adaptation["seconds"],
        }
        self.stdout.write(json.dumps(summary, indent=2))
