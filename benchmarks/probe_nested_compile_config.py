"""Adversarial probe (issue 13, defect 4): Keras deserialises a *nested* model's compile_config even with
``compile=False``, so a lambda hidden there reaches Keras; only ``safe_mode`` stopped it. The vetting now
refuses such a file before any loader starts.

    python benchmarks/probe_nested_compile_config.py

Prints what Keras does with the file (safe mode on and off; the lambda here is harmless) and the vetting's answer.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras

from tests.test_model_validation import nested_compiled_model, replace_nested_loss, serialised_lambda
from wbc_ml.vetting import ModelRejected, validate_model_file


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain, sneaky = Path(tmp) / "plain.keras", Path(tmp) / "sneaky.keras"
        nested_compiled_model(keras).save(plain)
        replace_nested_loss(plain, sneaky, serialised_lambda(keras))
        try:
            keras.models.load_model(sneaky, compile=False, safe_mode=True)
            print("safe_mode=True: loaded (unexpected)")
        except Exception as exc:
            print(f"safe_mode=True refuses: {type(exc).__name__}: {str(exc)[:100]}…")
        model = keras.models.load_model(sneaky, compile=False, safe_mode=False)
        loss = getattr(model.get_layer("backbone"), "loss", None)
        print(f"safe_mode=False, compile=False: the nested model's loss was deserialised: {loss!r}")
        try:
            validate_model_file(sneaky)
            print("vetting: accepted (a defect)")
        except ModelRejected as exc:
            print(f"vetting refuses before loading: {exc}")


if __name__ == "__main__":
    main()
