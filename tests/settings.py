"""Test settings: the real settings, made fast and isolated."""

import os
import tempfile
from pathlib import Path

from wbcsite.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
MEDIA_ROOT = Path(tempfile.mkdtemp(prefix="wbc-test-media-"))
_FOLDER = "classifier.model_files.SettingFolderStorage"
STORAGES = {  # local folders whatever the environment says; tests/s3.py points a test at S3 on loopback
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "models": {"BACKEND": _FOLDER, "OPTIONS": {"setting": "WBC_CUSTOM_MODELS_DIR"}},
    "onnx": {"BACKEND": _FOLDER, "OPTIONS": {"setting": "WBC_ONNX_DIR"}},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WBC_MODEL_CACHE_DIR = Path(tempfile.mkdtemp(prefix="wbc-test-model-cache-"))
SECURE_SSL_REDIRECT = False
STATIC_ROOT = Path(tempfile.mkdtemp(prefix="wbc-test-static-"))
WHITENOISE_USE_FINDERS = True

# A file-backed test database, so a real worker process can share it with the test (browser tests).
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(Path(tempfile.gettempdir()) / f"wbc-test-{os.getpid()}.sqlite3")}  # noqa: F405
WBC_WORKER_WAKEUP_DIR = Path(tempfile.mkdtemp(prefix="wbc-test-wakeup-"))
