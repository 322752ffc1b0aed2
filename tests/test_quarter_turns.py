"""A lab's adapted model served as the average of an image's four quarter turns (wbc_ml.turns): in the web app's
serving, in evaluate_model, and chosen (or not) by the adaptation's cross-validation."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY_SIZE, build_tiny_model
from wbc_ml.checksums import file_sha256
from wbc_ml.datasets import WBC_CLASSES

TEMPERATURE = 1.7


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.keras"
    build_tiny_model(path, seed=4)
    pixels = np.random.default_rng(5).integers(0, 256, size=(6, *TINY_SIZE, 3), dtype=np.uint8)
    return path, pixels


def served(path, turns: int):
    from wbc_ml.inference import ModelSpec, get_classifier

    spec = ModelSpec(
        path, file_sha256(path), TINY_SIZE, {"method": "scale01"}, tuple(WBC_CLASSES), TEMPERATURE, quarter_turns=turns
    )
    return get_classifier(spec)


def test_the_views_are_the_turns_and_mirror_images_of_a_square_image():
    from wbc_ml.turns import quarter_turns, symmetries, turn_views

    x = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    views = symmetries(x)
    assert len(views) == 8 and len({v.tobytes() for v in views}) == 8
    for k in range(4):
        assert np.array_equal(views[2 * k], np.rot90(x, k, axes=(1, 2)))
        assert np.array_equal(views[2 * k + 1], np.rot90(x, k, axes=(1, 2))[:, :, ::-1])
    assert turn_views(4) == [0, 2, 4, 6] and turn_views(1) == [0]
    assert quarter_turns(x, 1)[0] is x
    with pytest.raises(ValueError, match="square"):
        quarter_turns(np.zeros((1, 4, 6, 3)), 4)


def test_serving_with_quarter_turns_averages_the_probabilities_before_the_temperature(tiny):
    from wbc_ml.metrics import apply_temperature

    path, pixels = tiny
    plain, turned = served(path, 1), served(path, 4)
    raw = [plain.backend.run(plain.prepare(np.rot90(pixels, k, axes=(1, 2))))[0] for k in range(4)]
    expected = apply_temperature(np.mean(raw, axis=0), TEMPERATURE)

    got = np.stack([r.probabilities for r in turned.predict(pixels)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    alone = np.stack([r.probabilities for r in plain.predict(pixels)])
    np.testing.assert_allclose(alone, apply_temperature(raw[0], TEMPERATURE), atol=1e-6)
    assert np.abs(got - alone).max() > 1e-4  # the tiny network is not rotation-invariant: the turns matter


def test_evaluate_model_counts_the_turns_as_the_web_app_does(tiny):
    import keras

    from wbc_ml.evaluation import review_predictions
    from wbc_ml.preprocessing import Normalization

    path, pixels = tiny
    model = keras.models.load_model(path, compile=False)
    probs, outliers = review_predictions(model, pixels, Normalization.from_dict({"method": "scale01"}), TEMPERATURE,
                                         None, quarter_turns=4)  # fmt: skip
    web = np.stack([r.probabilities for r in served(path, 4).predict(pixels)])
    np.testing.assert_allclose(probs, web, atol=1e-5)
    assert not outliers.any()


def test_a_registered_model_is_served_with_its_cards_quarter_turns():
    from classifier.models import ClassifierModel

    common = {"file_name": "x.keras", "sha256": "0" * 64, "input_height": 32, "input_width": 32, "is_bundled": True,
              "normalization": {"method": "scale01"}, "class_names": list(WBC_CLASSES)}  # fmt: skip
    assert ClassifierModel(**common, card={"quarter_turns": 4}).spec().quarter_turns == 4
    assert ClassifierModel(**common, card={}).spec().quarter_turns == 1


def test_the_cross_validation_chooses_whether_a_new_head_is_served_with_quarter_turns(tmp_path):
    from tests.test_adaptation import make_base_model, make_lab_folder
    from wbc_ml import datasets
    from wbc_ml.adaptation import AdaptConfig, adapt_model, choose_cells

    base, folder = make_base_model(tmp_path), make_lab_folder(tmp_path / "lab", 10)
    cells = choose_cells(datasets.list_images(folder), list(WBC_CLASSES), per_class=5, seed=1)
    lines: list[str] = []
    config = AdaptConfig(methods=("head",), c_grid=(1.0,), folds=3)
    card = adapt_model(base, cells, tmp_path / "lab.keras", folder, config, log=lines.append)

    tried = [line for line in lines if line.lstrip().startswith("head {")]
    assert len(tried) == 2  # one C, served on the image alone and averaged over its four turns
    assert any("'quarter_turns': 1" in line for line in tried) and any("'quarter_turns': 4" in line for line in tried)
    assert card["quarter_turns"] == card["adaptation"]["params"]["quarter_turns"] in (1, 4)
    assert card["adaptation"]["config"]["views"] == 8
