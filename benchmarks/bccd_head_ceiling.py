"""How far a new linear head can take the bundled models on BCCD: feature variants at k = 20, and the ceiling.

    nice python benchmarks/bccd_head_ceiling.py --data ../shared/data/bccd [--cache /tmp/bccd-features.npz]

The product's head (method 'head' of ``adapt_model``) is a class-balanced logistic regression on a model's pooled
features, C chosen by cross-validation on the adaptation cells, served as the average over the four quarter turns.
This script keeps that head and varies its input on BCCD:

* the features of other layers and models, alone and concatenated;
* colour histograms of the cell (eosinophils and neutrophils, the confusion that dominates on BCCD, differ by
  the colour of their granules);
* the lab's class prior applied to the balanced head's probabilities (the true BCCD shares, as an upper bound).

Two protocols: (a) k = 20 cells per class as in ``benchmarks/adaptation_bccd.py`` (same draws, seeds 0..4), measured
on every other cell; (b) the ceiling: 3-fold cross-validation over all 351 cells, so each head learns from about
234 cells (every basophil and monocyte the set has), C fixed per row. Views: the 8 flips and quarter turns of each
cell (no colour jitter). Prints a markdown table and writes it to --markdown.

``--transforms pad x1.5,reinhard lab,...`` instead keeps the product's head input (the fine-tuned MobileNetV2's
'gap') and applies one label-free transform of ``benchmarks/bccd_label_free.py`` to every cell before its features
are read: does a step that moves the other lab's images towards PBC help *after* adaptation too? ('none' is the
product.) Its table goes to bccd_head_transforms.md unless --markdown says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from functools import cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LAYERS = {  # the pooled layers read from each bundled model ('gap': the features the product's head uses)
    "mobilenet_v2_finetuned": ("gap", "block_16_project_BN", "block_15_add"),
    "mobilenet_v2_head": ("gap",),
    "enhanced_cnn_v2": ("gap",),
}
FT = "mobilenet_v2_finetuned"
VARIANTS = (  # (row label, feature keys joined by '+', prior)
    ("MobileNetV2 fine-tuned, 'gap' (the product's head)", f"{FT}/gap", None),
    ("MobileNetV2 head model, 'gap' (ImageNet trunk)", "mobilenet_v2_head/gap", None),
    ("Enhanced CNNv2, 'gap'", "enhanced_cnn_v2/gap", None),
    ("MobileNetV2 fine-tuned, block_16 projection", f"{FT}/block_16_project_BN", None),
    ("MobileNetV2 fine-tuned, block_15 (ImageNet, as in both MobileNetV2 models)", f"{FT}/block_15_add", None),
    ("fine-tuned 'gap' + head model 'gap'", f"{FT}/gap+mobilenet_v2_head/gap", None),
    ("fine-tuned 'gap' + CNN 'gap'", f"{FT}/gap+enhanced_cnn_v2/gap", None),
    ("all three models' 'gap'", f"{FT}/gap+mobilenet_v2_head/gap+enhanced_cnn_v2/gap", None),
    ("colour histogram (6x6x6 RGB) alone", "colour/hist", None),
    ("fine-tuned 'gap' + colour histogram", f"{FT}/gap+colour/hist", None),
    ("fine-tuned 'gap', BCCD's true class prior applied", f"{FT}/gap", "true"),
)
C_GRID = (0.01, 0.1, 1.0)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "bccd")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/wbc-bccd-head-features.npz"))
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--transforms", default="", help="comma-separated transforms of bccd_label_free.py")
    parser.add_argument("--pbc", type=Path, default=REPO.parent / "shared" / "data" / "pbc", help="Reinhard's target")
    args = parser.parse_args()
    default_markdown = "bccd_head_transforms.md" if args.transforms else "bccd_head_ceiling.md"
    args.markdown = args.markdown or REPO / "benchmarks" / default_markdown
    return args


@cache
def _limit_threads(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)  # once, before TensorFlow starts


def input_size(args, arch: str) -> tuple[int, int]:
    from wbc_ml.evaluation import load_card

    return tuple(load_card(args.models_dir / f"{arch}.keras")["input_size"])


def pooled_views(args, arch: str, layers: tuple[str, ...], x: np.ndarray) -> dict[str, np.ndarray]:
    """One bundled model's pooled features of the images ``x`` (at its input size) in each of the 8 views, per
    layer: (cells, views, features)."""
    import keras

    from wbc_ml.adaptation.network import predict
    from wbc_ml.evaluation import load_card
    from wbc_ml.inference import load_keras_model
    from wbc_ml.preprocessing import Normalization
    from wbc_ml.turns import symmetries

    _limit_threads(args.threads)
    card = load_card(args.models_dir / f"{arch}.keras")
    model = load_keras_model(args.models_dir / f"{arch}.keras")
    pooled = [
        model.get_layer(name).output if name == "gap" else keras.layers.GlobalAveragePooling2D()(
            model.get_layer(name).output
        )
        for name in layers
    ]  # fmt: skip
    reader = keras.Model(model.input, pooled)
    views = [predict(reader, view, Normalization.from_dict(card["normalization"])) for view in symmetries(x)]
    return {name: np.stack([v[i] if len(layers) > 1 else v for v in views], axis=1) for i, name in enumerate(layers)}


def extract(args, samples) -> dict[str, np.ndarray]:
    """Pooled features of every cell and view, per '<model>/<layer>', and the colour histogram ('colour/hist')."""
    from wbc_ml import datasets

    features: dict[str, np.ndarray] = {}
    for arch, layers in LAYERS.items():
        x, _ = datasets.load_arrays(samples, input_size(args, arch))
        for name, values in pooled_views(args, arch, layers, x).items():
            features[f"{arch}/{name}"] = values
        print(f"{arch}: features of {len(x)} cells x {values.shape[1]} views", flush=True)
    x, _ = datasets.load_arrays(samples, (96, 96))
    bins = np.clip((x.astype(np.float64) / 256 * 6).astype(int), 0, 5)
    index = (bins[..., 0] * 36 + bins[..., 1] * 6 + bins[..., 2]).reshape(len(x), -1)
    counts = np.stack([np.bincount(row, minlength=216) for row in index]).astype(np.float64)
    hist = np.sqrt(counts / counts.sum(axis=1, keepdims=True))  # a colour histogram does not change with the view
    features["colour/hist"] = np.repeat(hist[:, None], 8, axis=1)
    return features


def transformed_gap(args, samples, transform) -> np.ndarray:
    """The fine-tuned MobileNetV2's 'gap' features of every cell and view, each image transformed first."""
    from PIL import Image

    from wbc_ml.preprocessing import resize

    size = input_size(args, FT)
    x = np.stack([resize(transform(Image.open(s.path).convert("RGB")), size) for s in samples])
    return pooled_views(args, FT, ("gap",), x)["gap"]


def served(head, pooled: np.ndarray) -> np.ndarray:
    from wbc_ml.turns import turn_views

    return np.mean([head.predict_proba(pooled[:, v]) for v in turn_views(4)], axis=0)


def with_prior(probs: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    if prior is None:
        return probs
    weighted = probs * prior
    return weighted / weighted.sum(axis=1, keepdims=True)


def k_per_class(x, y, samples, class_names, args, prior) -> list[float]:
    """Accuracy on the unseen cells of each draw (C by 4-fold cross-validation on the draw's cells)."""
    from wbc_ml.adaptation.cells import choose_cells
    from wbc_ml.adaptation.cv import folds
    from wbc_ml.adaptation.heads import LinearHead

    accuracies = []
    for seed in range(args.seeds):
        chosen = {s.path for s in choose_cells(samples, class_names, args.k, seed)}
        train = np.array([i for i, s in enumerate(samples) if s.path in chosen])
        test = np.array([i for i, s in enumerate(samples) if s.path not in chosen])

        def cv_accuracy(c, train=train, seed=seed):
            oof = np.zeros((len(train), len(class_names)))
            for fit, val in folds(y[train], seed):
                head = LinearHead(c, len(class_names)).fit(x[train][fit], y[train][fit])
                oof[val] = served(head, x[train][val])
            return (with_prior(oof, prior).argmax(axis=1) == y[train]).mean()

        c = max(C_GRID, key=cv_accuracy)
        head = LinearHead(c, len(class_names)).fit(x[train], y[train])
        accuracies.append(float((with_prior(served(head, x[test]), prior).argmax(axis=1) == y[test]).mean()))
    return accuracies


def ceiling(x, y, class_names, prior) -> dict[float, float]:
    """Accuracy of 3-fold cross-validation over every cell, for each C."""
    from sklearn.model_selection import StratifiedKFold

    from wbc_ml.adaptation.heads import LinearHead

    out = {}
    for c in C_GRID:
        probs = np.zeros((len(y), len(class_names)))
        for fit, val in StratifiedKFold(3, shuffle=True, random_state=0).split(y, y):
            probs[val] = served(LinearHead(c, len(class_names)).fit(x[fit], y[fit]), x[val])
        out[c] = float((with_prior(probs, prior).argmax(axis=1) == y).mean())
    return out


def row(label: str, x, y, samples, class_names, args, prior=None) -> str:
    """A table row: accuracy over the k-per-class draws, and the ceiling for each C."""
    draws = np.array(k_per_class(x, y, samples, class_names, args, prior)) * 100
    top = ceiling(x, y, class_names, prior)
    line = f"| {label} | {draws.mean():.1f} ± {draws.std(ddof=1):.1f}% | " + " / ".join(
        f"{100 * top[c]:.1f}%" for c in C_GRID
    )
    print(line + " |", flush=True)
    return line + " |"


def variant_rows(args, samples, y, class_names) -> list[str]:
    if args.cache.exists():
        features = dict(np.load(args.cache))
    else:
        features = extract(args, samples)
        np.savez(args.cache, **features)
    true_prior = np.bincount(y, minlength=len(class_names)) / len(y)
    rows = []
    for label, spec, prior_name in VARIANTS:
        x = np.concatenate([features[key].astype(np.float64) for key in spec.split("+")], axis=-1)
        rows.append(row(label, x, y, samples, class_names, args, true_prior if prior_name == "true" else None))
    return rows


def transform_rows(args, samples, y, class_names) -> list[str]:
    from bccd_label_free import transforms

    chosen = transforms(args.pbc)
    rows = []
    for name in args.transforms.split(","):
        x = transformed_gap(args, samples, chosen[name]).astype(np.float64)
        rows.append(row(f"MobileNetV2 fine-tuned, 'gap', after '{name}'", x, y, samples, class_names, args))
    return rows


def main() -> None:
    args = parse()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=UserWarning)
    from wbc_ml import datasets
    from wbc_ml.datasets import WBC_CLASSES

    class_names = list(WBC_CLASSES)
    samples = datasets.list_images(args.data, tuple(class_names))
    y = np.array([s.label for s in samples])
    header = [
        f"| head input | k = {args.k}: accuracy, mean ± sd of {args.seeds} draws | ceiling (~234 cells): C = "
        + " / ".join(f"{c:g}" for c in C_GRID)
        + " |",
        "|---|---|---|",
    ]
    rows = (
        transform_rows(args, samples, y, class_names)
        if args.transforms
        else variant_rows(args, samples, y, class_names)
    )
    table = "\n".join(header + rows)
    print(table)
    title = "after a label-free transform" if args.transforms else "feature variants"
    args.markdown.write_text(
        f"# A new head on BCCD: {title}, and the ceiling\n\n"
        "Made by `python benchmarks/bccd_head_ceiling.py` (its docstring says how). BCCD is a development set: "
        "these rows chose nothing in the product; they show where a linear head on the bundled models' features "
        "stops.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
