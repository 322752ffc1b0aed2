"""Label-free steps for another lab's images: do they help the bundled models *before* any adaptation?

    python benchmarks/bccd_label_free.py [--data ../shared/data]

BCCD (another lab, another microscope) is cut into a *choose* half and a *report* half by a hash of each file name.
Each bundled model classifies every BCCD cell, served as the platform serves it (calibrated, with its detectors),
after one label-free transform of the image:

- ``none``: the image as it is;
- ``pad xF``: the crop pasted on a canvas F times its size, filled with the median colour of its border, so the
  cell fills about as little of the frame as in PBC (CellaVision crops);
- ``reinhard rgb`` / ``reinhard lab``: each image's per-channel mean and standard deviation (in RGB, or in CIE Lab)
  moved to the average of 200 PBC images (Reinhard et al. 2001 colour transfer; PBC images are read, never labels).

A transform is worth keeping only if it wins on the choose half; the report half then says by how much. Prints a
table of accuracy and flagged share (confidence under 0.85 or the detectors) per model, transform and half.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wbc_ml.inference import ModelSpec, get_classifier  # noqa: E402

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
MODELS = ("enhanced_cnn_v2", "mobilenet_v2_finetuned", "mobilenet_v2_head")
PBC_REFERENCE_PER_CLASS = 40
SRGB, LAB = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
TO_LAB = ImageCms.buildTransformFromOpenProfiles(SRGB, LAB, "RGB", "LAB")
TO_RGB = ImageCms.buildTransformFromOpenProfiles(LAB, SRGB, "LAB", "RGB")


def half(path: Path) -> str:
    return "choose" if int(hashlib.sha256(f"fov-v1:{path.name}".encode()).hexdigest(), 16) % 2 == 0 else "report"


def channel_stats(image: Image.Image, space: str) -> np.ndarray:
    pixels = np.asarray(ImageCms.applyTransform(image, TO_LAB) if space == "lab" else image, np.float32).reshape(-1, 3)
    return np.concatenate([pixels.mean(axis=0), pixels.std(axis=0) + 1e-3])


def reinhard(image: Image.Image, space: str, target: np.ndarray) -> Image.Image:
    source = channel_stats(image, space)
    pixels = np.asarray(ImageCms.applyTransform(image, TO_LAB) if space == "lab" else image, np.float32)
    moved = np.clip((pixels - source[:3]) / source[3:] * target[3:] + target[:3], 0, 255).astype(np.uint8)
    return ImageCms.applyTransform(Image.fromarray(moved, "LAB"), TO_RGB) if space == "lab" else Image.fromarray(moved)


def padded(image: Image.Image, factor: float) -> Image.Image:
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    canvas = Image.new(
        "RGB", (int(image.width * factor), int(image.height * factor)), tuple(np.median(border, 0).astype(int))
    )
    canvas.paste(image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2))
    return canvas


def transforms(pbc: Path) -> dict:
    reference = [p for c in CLASSES for p in sorted((pbc / c).glob("*.jpg"))[:PBC_REFERENCE_PER_CLASS]]
    targets = {
        space: np.mean([channel_stats(Image.open(p).convert("RGB"), space) for p in reference], axis=0)
        for space in ("rgb", "lab")
    }
    return {
        "none": lambda image: image,
        "pad x1.5": lambda image: padded(image, 1.5),
        "pad x2": lambda image: padded(image, 2.0),
        "reinhard rgb": lambda image: reinhard(image, "rgb", targets["rgb"]),
        "reinhard lab": lambda image: reinhard(image, "lab", targets["lab"]),
    }


def served(arch: str, models: Path):
    card = json.loads((models / f"{arch}.json").read_text())
    spec = ModelSpec(
        path=models / card["file"],
        sha256=card["sha256"],
        input_size=tuple(card["input_size"]),
        normalization=card["normalization"],
        class_names=tuple(card["class_names"]),
        temperature=card["temperature"],
        ood_path=models / card["ood"]["file"],
        ood_sha256=card["ood"]["sha256"],
    )
    return get_classifier(spec), tuple(card["input_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models", help="where the three cards are")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated architectures")
    parser.add_argument("--transforms", default="", help="comma-separated subset of the transforms (default all)")
    args = parser.parse_args()
    cells = [(p, CLASSES.index(p.parent.name)) for p in sorted((args.data / "bccd").rglob("*.jpg"))]
    labels = np.array([label for _, label in cells])
    halves = np.array([half(p) for p, _ in cells])
    images = [Image.open(p).convert("RGB") for p, _ in cells]
    print(
        f"BCCD: {len(cells)} cells, choose half {np.sum(halves == 'choose')}, report half {np.sum(halves == 'report')}"
    )
    print(f"{'model':24} {'transform':14} {'choose acc':>10} {'report acc':>10} {'report flagged':>14}")
    for arch in args.models.split(","):
        classifier, size = served(arch, args.models_dir)
        for name, transform in transforms(args.data / "pbc").items():
            if args.transforms and name not in args.transforms.split(","):
                continue
            pixels = np.stack([np.asarray(transform(i).resize(size[::-1], Image.Resampling.BILINEAR)) for i in images])
            results = classifier.predict(pixels)
            correct = np.array([r.class_index for r in results]) == labels
            flagged = np.array([r.confidence < 0.85 or r.is_outlier for r in results])
            choose, report = halves == "choose", halves == "report"
            print(
                f"{arch:24} {name:14} {correct[choose].mean():>10.1%} {correct[report].mean():>10.1%} "
                f"{flagged[report].mean():>14.1%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
