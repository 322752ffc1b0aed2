"""A web process classifies an image and serves its Grad-CAM without ever importing TensorFlow or Keras.

The web process is a separate Python process (the test's own has TensorFlow loaded to register the models): Django
set up from the real settings on the test database, requests through Django's test client. It records every process
it starts (Python's ``subprocess.Popen`` audit event): Grad-CAM must come from the ONNX copy, not from the sandboxed
TensorFlow child, while the input-gradient map is made by that child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from classifier.registry import ensure_onnx, register_card
from tests.conftest import BUNDLED_MODELS, REPO, image_bytes, test_database_url

pytestmark = pytest.mark.django_db(transaction=True)

WEB_PROCESS = r"""
import json, sys

started = []
sys.addaudithook(lambda event, args: started.append(str(args[1])[:200]) if event == "subprocess.Popen" else None)

import django

django.setup()
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from accounts.models import User

username, model_id, image_path, methods = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
client = Client()
client.force_login(User.objects.get(username=username))
with open(image_path, "rb") as handle:
    upload = SimpleUploadedFile("cell.png", handle.read(), content_type="image/png")
classified = client.post("/api/v1/predictions/", {"file": upload, "model": model_id})
body = classified.json()
report = {"classify": classified.status_code, "predicted_class": body.get("predicted_class"), "maps": {}}
for method in methods:
    before = len(started)
    response = client.get(body["saliency"][method])
    content = b"".join(response.streaming_content) if response.status_code == 200 else response.content
    report["maps"][method] = {
        "status": response.status_code,
        "content_type": response.get("Content-Type"),
        "webp": content[:4] == b"RIFF" and content[8:12] == b"WEBP",
        "processes_started": len(started) - before,
    }
report["tensorflow"] = "tensorflow" in sys.modules
report["keras"] = "keras" in sys.modules
print("REPORT " + json.dumps(report))
"""


def _web_process(settings, tmp_path, username: str, model_id: int, methods: str) -> dict:
    image = tmp_path / "cell.png"
    image.write_bytes(image_bytes(size=(120, 110)))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": test_database_url(),
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "WBC_MODELS_DIR": str(settings.WBC_MODELS_DIR),
        "WBC_ONNX_DIR": str(settings.WBC_ONNX_DIR),
        "ALLOWED_HOSTS": "testserver",
        "SECURE_SSL_REDIRECT": "false",
    }
    command = [sys.executable, "-c", WEB_PROCESS, username, str(model_id), str(image), methods]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REPORT "))


def _assert_gradcam_from_onnx(report: dict) -> None:
    assert report["classify"] == 201, report
    gradcam = report["maps"]["gradcam"]
    assert gradcam == {"status": 200, "content_type": "image/webp", "webp": True, "processes_started": 0}
    assert report["tensorflow"] is False and report["keras"] is False


def test_the_web_process_serves_grad_cam_of_an_onnx_served_model_without_tensorflow(
    settings, tmp_path, technologist, tiny_record
):
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    ensure_onnx(tiny_record)
    _assert_gradcam_from_onnx(_web_process(settings, tmp_path, technologist.username, tiny_record.pk, "gradcam"))


@pytest.mark.slow
def test_the_web_process_serves_the_bundled_cnn_without_tensorflow_and_its_gradient_map_from_the_child(
    settings, tmp_path, technologist
):
    settings.WBC_MODELS_DIR = BUNDLED_MODELS
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    record, _ = register_card(BUNDLED_MODELS / "enhanced_cnn_v2.json")  # exports the ONNX copy (TensorFlow, here)
    assert record.onnx_file_name.endswith("-f3.onnx") and record.onnx_status.startswith("ONNX Runtime")
    report = _web_process(settings, tmp_path, technologist.username, record.pk, "gradcam,gradient")
    _assert_gradcam_from_onnx(report)
    gradient = report["maps"]["gradient"]
    assert gradient["status"] == 200 and gradient["webp"] and gradient["processes_started"] >= 1  # the child
