"""The training pipeline's parts, and the real train/evaluate commands on a tiny generated data set."""

import json
import zipfile

import h5py
import numpy as np
import pytest
from django.core.management import call_command

from tests.conftest import image_bytes
from wbc_ml import datasets
from wbc_ml.metrics import apply_temperature, classification_report, expected_calibration_error, fit_temperature
from wbc_ml.ood import fit_ood, split_non_wbc

CLASS_COLOURS = {
    "basophil": (80, 40, 140),
    "eosinophil": (220, 90, 60),
    "lymphocyte": (60, 60, 200),
    "monocyte": (150, 120, 190),
    "neutrophil": (200, 150, 200),
}


def saved_without_optimizer(path) -> bool:
    """True when a .keras archive carries no optimizer state (nothing to resume from by accident)."""
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as handle, h5py.File(handle) as weights:
        return "optimizer" not in weights and not json.loads(archive.read("config.json")).get("compile_config")


@pytest.fixture
def tiny_dataset(tmp_path):
    root = tmp_path / "pbc"
    for name, colour in CLASS_COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(8):
            shade = tuple(min(255, c + 3 * i) for c in colour)
            (folder / f"{name[:2].upper()}_{i}.jpg").write_bytes(image_bytes(size=(48, 48), fmt="JPEG", color=shade))
    other = tmp_path / "pbc-non-wbc" / "platelet"
    other.mkdir(parents=True)
    for i in range(4):
        (other / f"PLATELET_{i}.jpg").write_bytes(image_bytes(size=(48, 48), fmt="JPEG", color=(240, 240, 90)))
    return root


def test_split_is_deterministic_stratified_and_disjoint(tiny_dataset):
    samples = datasets.list_images(tiny_dataset)
    first, second = datasets.split_samples(samples), datasets.split_samples(list(reversed(samples)))
    for part in ("train", "val", "test"):
        assert sorted(s.name for s in first[part]) == sorted(s.name for s in second[part])
        assert {s.label for s in first[part]} == set(range(5))  # every class in every part
    names = [s.name for part in first.values() for s in part]
    assert len(names) == len(set(names)) == 40
    assert [len(first[p]) for p in ("train", "val", "test")] == [30, 5, 5]


def test_missing_class_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="basophil"):
        datasets.list_images(tmp_path)


def test_augmentation_keeps_shape_and_range():
    from wbc_ml.training import augment_batch

    images = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    out = augment_batch(images, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert not np.allclose(out, images)


def test_travel_augmentation_changes_stain_focus_and_scale_but_not_shape():
    from wbc_ml.training.augmentation import HED_FROM_RGB, RGB_FROM_HED, travel_batch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    out = travel_batch(images, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert all(not np.allclose(a, b, atol=2) for a, b in zip(out, images, strict=True))
    # The stain matrices invert each other: a zero jitter leaves the optical densities as they were.
    np.testing.assert_allclose(HED_FROM_RGB @ RGB_FROM_HED, np.eye(3), atol=1e-12)


def test_rescale_keeps_the_cell_centred_at_the_same_size():
    from PIL import Image

    from wbc_ml.training.augmentation import rescale

    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[15:25, 15:25] = 255  # a 10-pixel "cell" in the centre
    for factor, side in ((0.6, 6), (1.4, 14)):
        out = np.asarray(rescale(Image.fromarray(pixels), factor))
        assert out.shape == pixels.shape
        rows = np.flatnonzero(out[:, 20, 0] > 127)
        assert abs(len(rows) - side) <= 1 and abs(rows.mean() - 19.5) <= 1


def test_class_weights_favour_rare_classes():
    from wbc_ml.training import class_weights

    weights = class_weights(np.array([0] * 10 + [1] * 30), 2)
    np.testing.assert_allclose(weights, [2.0, 2 / 3])


def test_metrics_match_hand_computed_values():
    labels = np.array([0, 0, 1, 1, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]])
    report = classification_report(labels, probs, ["a", "b", "c"], threshold=0.85)
    assert report["accuracy"] == pytest.approx(0.8)
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["b"]["recall"] == 1.0
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)
    assert report["flagged_share"] == pytest.approx(0.8)  # only 0.9 is at or above 0.85
    assert report["roc_auc_ovr"]["c"] == 1.0


def test_ece_of_a_perfectly_calibrated_toy_is_zero_and_overconfidence_is_not():
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0]] * 2), labels) == 0.0
    overconfident = np.array([[0.99, 0.01], [0.99, 0.01], [0.99, 0.01], [0.01, 0.99]])
    assert expected_calibration_error(overconfident, labels) == pytest.approx(0.24)  # |0.75 - 0.99|


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 5))
    true_probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in true_probs])
    overconfident = apply_temperature(true_probs, 0.5)  # what an overconfident network would output
    assert fit_temperature(overconfident, labels) == pytest.approx(2.0, rel=0.1)


def test_ood_detector_flags_a_separate_cluster_and_few_inliers():
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(c * 4, 1, size=(300, 8)) for c in range(3)])
    labels = np.repeat(np.arange(3), 300)
    val = np.concatenate([rng.normal(c * 4, 1, size=(100, 8)) for c in range(3)])
    strangers = rng.normal(-8, 1, size=(60, 8))
    detector = fit_ood(train, labels, val, np.ones(len(val)), strangers[:30])
    assert detector.is_outlier(strangers[30:]).mean() > 0.9
    assert detector.is_outlier(val).mean() <= 0.03


def test_mahalanobis_distance_matches_the_textbook_formula():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(400, 12))
    detector = fit_ood(train, np.repeat(np.arange(4), 100), train[:50], np.ones(50))
    x = rng.normal(size=(7, 12))
    pooled = x[:, :6]  # the distance uses the average-pooled half of the features
    naive = [np.sqrt(min((row - m) @ detector.precision @ (row - m) for m in detector.means)) for row in pooled]
    assert detector.distance(x) == pytest.approx(naive, rel=1e-9)


def test_detector_threshold_keeps_validation_flags_within_the_budget_and_survives_saving(tmp_path):
    from wbc_ml.ood import VAL_FLAGGED_BUDGET, OodDetector

    rng = np.random.default_rng(2)
    train = rng.normal(0, 1, size=(600, 8))
    val = rng.normal(0, 1, size=(400, 8))
    confidence = np.where(np.arange(400) < 4, 0.5, 0.99)  # 1% already flagged by low confidence
    strangers = rng.normal(1.5, 1, size=(80, 8))  # overlaps the WBC cloud: the budget must bind
    detector = fit_ood(train, np.zeros(600, int), val, confidence, strangers)
    flagged = (confidence < 0.85) | detector.is_outlier(val)
    assert 0.01 < flagged.mean() <= VAL_FLAGGED_BUDGET
    detector.save(tmp_path / "d.npz")
    again = OodDetector.load(tmp_path / "d.npz")
    assert again.non_wbc_probability(strangers) == pytest.approx(detector.non_wbc_probability(strangers), abs=1e-5)
    assert (again.is_outlier(val) == detector.is_outlier(val)).mean() > 0.99


def test_non_wbc_split_into_fit_choose_report_thirds_is_disjoint_and_stable_as_files_are_added(tmp_path):
    paths = [tmp_path / kind / f"{kind}_{i}.jpg" for kind in ("ig", "platelet") for i in range(60)]
    parts = split_non_wbc(paths)
    assert sorted(parts.fit + parts.choose + parts.report) == sorted(paths)
    assert not set(parts.fit) & set(parts.choose) and not set(parts.choose) & set(parts.report)
    assert all(25 <= len(part) <= 55 for part in parts)  # about a third of 120 each
    grown = split_non_wbc([*paths, *(tmp_path / "ig" / f"new_{i}.jpg" for i in range(40))])
    for before, after in zip(parts, grown, strict=True):
        assert set(before) <= set(after)  # no file changes part when files are added


def test_train_and_evaluate_commands_write_an_honest_card(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    call_command(
        "train_model", "--arch", "enhanced_cnn_v2", "--data", str(tiny_dataset), "--epochs", "2", "--out", str(out)
    )
    card = json.loads((out / "enhanced_cnn_v2.json").read_text())
    for key in (
        "name",
        "architecture",
        "file",
        "sha256",
        "input_size",
        "normalization",
        "class_names",
        "temperature",
        "metrics",
        "data",
        "trained_with",
        "calibration",
        "ood",
        "limits",
    ):
        assert key in card
    assert card["class_names"] == list(datasets.WBC_CLASSES)
    assert card["input_size"] == [96, 96] and card["normalization"]["method"] == "zscore"
    assert card["data"]["split_sizes"] == {"train": 30, "val": 5, "test": 5}
    assert card["metrics"]["test"]["n"] == 5
    assert card["trained_with"]["command"].startswith("python manage.py train_model")
    assert card["ood"]["evaluated_on"].startswith("2 images of the report third")
    low, high = card["ood"]["non_wbc_flagged_share_95ci"]
    assert low <= card["ood"]["non_wbc_flagged_share"] <= high and high - low > 0.3  # two images: a wide interval
    assert len(card["ood"]["detector_choice"]["candidates"]) == 3  # chosen on the choose third, not the report third
    assert card["training"]["outlier_exposure"].startswith("1 images (the fit third of pbc-non-wbc/) x4")
    assert card["ood"]["method"].startswith("The classifier itself was trained with outlier exposure")
    from wbc_ml.checksums import file_sha256

    assert file_sha256(out / "enhanced_cnn_v2.keras") == card["sha256"]
    assert saved_without_optimizer(out / "enhanced_cnn_v2.keras")
    capsys.readouterr()
    call_command(
        "evaluate_model",
        str(out / "enhanced_cnn_v2.keras"),
        "--data",
        str(tiny_dataset),
        "--split",
        "test",
        "--json",
        str(tmp_path / "m.json"),
    )
    printed = capsys.readouterr().out
    assert "accuracy=" in printed and "confusion matrix" in printed
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["metrics"]["accuracy"] == pytest.approx(card["metrics"]["test"]["accuracy"])

    (out / "enhanced_cnn_v2.ood.npz").unlink()
    call_command("fit_ood", str(out / "enhanced_cnn_v2.keras"), "--data", str(tiny_dataset))
    refitted = json.loads((out / "enhanced_cnn_v2.json").read_text())["ood"]
    assert file_sha256(out / "enhanced_cnn_v2.ood.npz") == refitted["sha256"]
    assert refitted["method"] == card["ood"]["method"]  # still says how the classifier was trained


def test_outlier_exposure_adds_only_the_fit_third_of_non_wbc_with_uniform_targets(tiny_dataset, tmp_path):
    from wbc_ml.training import OUTLIER_REPEATS, OUTLIER_WEIGHT, TrainConfig, class_weights, with_outlier_exposure

    platelets = sorted((tmp_path / "pbc-non-wbc" / "platelet").glob("*.jpg"))
    for i, path in enumerate(platelets):  # four different looks, so the thirds can be told apart
        path.write_bytes(image_bytes(size=(48, 48), fmt="JPEG", color=(240, 60 * i, 90)))
    fit_half = split_non_wbc(platelets).fit
    config = TrainConfig("enhanced_cnn_v2", tiny_dataset, tmp_path / "out", input_size=(16, 16))
    x, y = datasets.load_arrays(datasets.split_samples(datasets.list_images(tiny_dataset))["train"], (16, 16))

    images, targets, weights = with_outlier_exposure(config, x, y, class_weights(y, 5), log=lambda _: None)

    wbc, outliers = slice(0, len(x)), slice(len(x), None)
    assert len(images) == len(x) + len(fit_half) * OUTLIER_REPEATS
    np.testing.assert_array_equal(images[wbc], x)
    np.testing.assert_array_equal(targets[wbc].argmax(axis=1), y)
    expected, _ = datasets.load_arrays([datasets.Sample(p, -1) for p in fit_half], (16, 16))
    np.testing.assert_array_equal(images[outliers], np.concatenate([expected] * OUTLIER_REPEATS))
    np.testing.assert_allclose(targets[outliers], 0.2)
    assert weights[outliers].sum() == pytest.approx(OUTLIER_WEIGHT * weights[wbc].sum())


def test_without_non_wbc_images_training_data_is_the_wbc_split_alone(tmp_path):
    from wbc_ml.training import TrainConfig, with_outlier_exposure

    config = TrainConfig("enhanced_cnn_v2", tmp_path / "pbc", tmp_path / "out", input_size=(16, 16))
    x, y = np.zeros((3, 16, 16, 3), np.uint8), np.array([0, 1, 4])
    images, targets, weights = with_outlier_exposure(config, x, y, np.ones(5), log=lambda _: None)
    assert images is x and targets.shape == (3, 5) and weights.tolist() == [1.0, 1.0, 1.0]
    assert "outlier_exposure" not in config.extra


def test_the_fine_tuned_mobilenet_trains_end_to_end_and_serves_its_card(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    call_command(
        "train_model",
        *("--arch", "mobilenet_v2_finetuned", "--data", str(tiny_dataset), "--out", str(out)),
        *("--imagenet-weights", "none", "--epochs", "1", "--finetune-epochs", "1", "--augment-copies", "2"),
    )
    card = json.loads((out / "mobilenet_v2_finetuned.json").read_text())
    assert card["input_size"] == [224, 224] and card["normalization"]["mean"] == [127.5] * 3
    assert card["training"]["unfrozen_layers"][0].startswith("block_16_")
    assert card["training"]["finetune_epochs_run"] == 1 and card["training"]["epochs_run"] == 2
    assert card["metrics"]["test"]["n"] == 5 and card["ood"]["evaluated_on"].startswith("2 images of the report third")
    assert saved_without_optimizer(out / "mobilenet_v2_finetuned.keras")
    from wbc_ml.checksums import file_sha256
    from wbc_ml.inference import ModelSpec, get_classifier

    spec = ModelSpec(
        path=out / "mobilenet_v2_finetuned.keras",
        sha256=file_sha256(out / "mobilenet_v2_finetuned.keras"),
        input_size=(224, 224),
        normalization=card["normalization"],
        class_names=tuple(card["class_names"]),
        temperature=card["temperature"],
        ood_path=out / "mobilenet_v2_finetuned.ood.npz",
        ood_sha256=file_sha256(out / "mobilenet_v2_finetuned.ood.npz"),  # a detector is served only verified
    )
    results = get_classifier(spec).predict(np.zeros((2, 224, 224, 3), np.uint8))
    assert len(results) == 2 and all(r.ood_score is not None for r in results)


def test_batchnorm_recalibration_sets_the_exact_population_statistics():
    import keras

    from wbc_ml.training import recalibrate_batchnorm

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(inputs))
    data = np.random.default_rng(0).normal(loc=[1, 2, 3, 4], scale=[1, 2, 3, 4], size=(640, 4)).astype("float32")
    recalibrate_batchnorm(model, data, batch_size=64, batches=10)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean), data.mean(axis=0), rtol=1e-4, atol=1e-4)
    assert bn.momentum == 0.99  # restored afterwards
