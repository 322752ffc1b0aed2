"""The ONNX copy serves the same detector features as TensorFlow, not only the same probabilities, on real cells.

The review flag depends on the features (Mahalanobis distance and the non-WBC network), so a conversion that kept
the probabilities but shifted the features would silently change which cells go to review.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import BUNDLED_MODELS, require_shared_data


@pytest.mark.parametrize("arch", ["enhanced_cnn_v2"])
def test_onnx_and_tensorflow_give_the_same_detector_features_and_flags_on_real_images(arch, tmp_path):
    import json

    from wbc_ml import datasets
    from wbc_ml.inference import KerasBackend, OnnxBackend, load_keras_model
    from wbc_ml.onnx_export import export_onnx
    from wbc_ml.ood import OodDetector
    from wbc_ml.preprocessing import Normalization

    pbc = require_shared_data()
    model_path = BUNDLED_MODELS / f"{arch}.keras"
    card = json.loads(model_path.with_suffix(".json").read_text())
    size = tuple(card["input_size"])
    samples = datasets.list_images(pbc)[::450]  # about 20 cells spread over the five classes
    x, _ = datasets.load_arrays(samples, size)
    batch = Normalization.from_dict(card["normalization"]).apply(x)

    onnx_path = tmp_path / "model.onnx"
    export_onnx(model_path, onnx_path, size, card["normalization"])
    onnx_probs, onnx_features = OnnxBackend(onnx_path).run(batch)
    tf_probs, tf_features = KerasBackend(load_keras_model(model_path), with_features=True).run(batch)

    assert onnx_features is not None and onnx_features.shape == tf_features.shape
    scale = np.abs(tf_features).max()
    assert np.abs(onnx_features - tf_features).max() <= 1e-4 * max(scale, 1.0)
    assert np.abs(onnx_probs - tf_probs).max() <= 1e-4
    detector = OodDetector.load(model_path.parent / card["ood"]["file"])
    onnx_scores, onnx_flags = detector.assess(onnx_features)
    tf_scores, tf_flags = detector.assess(tf_features)
    np.testing.assert_allclose(onnx_scores, tf_scores, atol=1e-4)
    assert (onnx_flags == tf_flags).all()
