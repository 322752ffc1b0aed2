"""Test settings: the real settings, made fast and isolated."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from wbcsite.settings import *  # noqa: F403


def _own_temp_dir(prefix: str) -> Path:
    """A fresh folder for this test process, removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
MEDIA_ROOT = _own_temp_dir("wbc-test-media-")
_FOLDER = "classifier.model_files.SettingFolderStorage"
STORAGES = {  # local folders whatever the environment says; tests/s3.py points a test at S3 on loopback
    "default": LOCAL_MEDIA,  # noqa: F405
    "models": {"BACKEND": _FOLDER, "OPTIONS": {"setting": "WBC_CUSTOM_MODELS_DIR"}},
    "onnx": {"BACKEND": _FOLDER, "OPTIONS": {"setting": "WBC_ONNX_DIR"}},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WBC_MODEL_CACHE_DIR = _own_temp_dir("wbc-test-model-cache-")
SECURE_SSL_REDIRECT = False
STATIC_ROOT = _own_temp_dir("wbc-test-static-")
WHITENOISE_USE_FINDERS = True

# A file-backed test database, so a real worker process can share it with the test (browser tests).
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(Path(tempfile.gettempdir()) / f"wbc-test-{os.getpid()}.sqlite3")}  # noqa: F405
WBC_WORKER_WAKEUP_DIR = _own_temp_dir("wbc-test-wakeup-")
# In-process worker rounds retry a failed chunk at once (a test that wants the back-off sets it); worker processes
# started by the tests read the environment, so they back off as in production.
WBC_BATCH_RETRY_SECONDS = 0
