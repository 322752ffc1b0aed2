"""Shared fixtures: named personas, a tiny real Keras model, generated images."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from PIL import Image

from tests.s3 import s3_media, s3_server  # noqa: F401  (fixtures: S3 on loopback, see tests/s3.py)
from wbc_ml.datasets import WBC_CLASSES

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODELS = REPO / "models"
SHARED_DATA = Path(os.environ.get("WBC_DATA_DIR", REPO.parent / "shared" / "data"))
TINY_SIZE = (32, 32)


def unavailable(reason: str) -> NoReturn:
    """Something a test needs (data, a service, a host feature) is missing: a failure in CI (CI=true), never a silent
    pass; a skip with the reason on a developer's machine."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def python_output(code: str, env: dict[str, str], timeout: float = 180) -> str:
    """What a fresh Python process running ``code`` in the repository prints (it must exit with 0)."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def require_shared_data(folder: str = "pbc") -> Path:
    """A folder of the real shared images (``pbc``, ``bccd``…); see :func:`unavailable` when it is missing."""
    path = SHARED_DATA / folder
    if not path.is_dir():
        unavailable(f"real images not found at {path} (set WBC_DATA_DIR to the shared data folder)")
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``postgresql`` check what only PostgreSQL enforces (the audit trail's trigger): they run in the
    PostgreSQL pass of scripts/test (which CI requires), and are left out of the SQLite pass rather than skipped."""
    from django.db import connection

    if connection.vendor == "postgresql":
        return
    kept = [item for item in items if item.get_closest_marker("postgresql") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def image_bytes(
    size: tuple[int, int] = (64, 60), fmt: str = "PNG", color=(200, 120, 160), mode: str = "RGB", **save
) -> bytes:
    """A small synthetic 'cell': a coloured disc with some texture on a light background."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    disc = ((xx - width / 2) ** 2 + (yy - height / 2) ** 2) < (min(size) / 3) ** 2
    pixels = np.full((height, width, 3), 235, np.uint8)
    pixels[disc] = color
    pixels[::7, ::5] = (90, 60, 140)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def build_tiny_model(
    path: Path, input_size=TINY_SIZE, n_classes: int = 5, seed: int = 0, favour: int | None = None
) -> None:
    """A real (untrained, seeded) Keras CNN, shaped like ours: Conv2D ... 'gap' -> softmax.

    ``favour`` gives one class a large output bias, so the model is confidently that class (~0.97).
    """
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(*input_size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_last")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    bias = (
        "zeros"
        if favour is None
        else keras.initializers.Constant([5.0 if i == favour else 0.0 for i in range(n_classes)])
    )
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probabilities", bias_initializer=bias)(x)
    keras.Model(inputs, outputs).save(path)


def test_database_url() -> str:
    """The test database as a DATABASE_URL for another process: the file-backed SQLite one, or PostgreSQL's."""
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{db['USER']}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


test_database_url.__test__ = False  # a helper, not a test


def start_worker(settings, models_dir: Path, *, own_session: bool = False, **env: str) -> subprocess.Popen:
    """The real background worker (``manage.py run_worker``) as a separate process on the test database; with
    ``own_session`` it leads a session of its own, as under a process supervisor."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "wbcsite.settings",
        "DATABASE_URL": test_database_url(),
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "WBC_MODELS_DIR": str(models_dir),
        "WBC_WORKER_WAKEUP_DIR": str(settings.WBC_WORKER_WAKEUP_DIR),
        "WBC_WORKER_NICE": "0",  # beside the other test process, not a tenth of its CPU share (short leases)
        **env,
    }
    command = [sys.executable, "manage.py", "run_worker"]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=own_session,
    )


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    path = folder / "tiny.keras"
    build_tiny_model(path)
    return path


@pytest.fixture
def models_dir(tmp_path, settings, tiny_model_file) -> Path:
    """An isolated models folder holding the tiny model; settings point at it."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_model_file, folder / "tiny.keras")
    settings.WBC_MODELS_DIR = folder
    return folder


@pytest.fixture
def tiny_record(db, models_dir):
    from tests.factories import ClassifierModelFactory

    return ClassifierModelFactory(name="Tiny CNN", model_file=models_dir / "tiny.keras")


@pytest.fixture
def lab_a(db):
    from accounts.models import Laboratory

    return Laboratory.objects.create(name="Lab A")


@pytest.fixture
def lab_b(db):
    from accounts.models import Laboratory

    return Laboratory.objects.create(name="Lab B")


def _user(username, lab, role):
    from django.contrib.auth.models import Group

    from accounts.models import User

    user = User.objects.create_user(username=username, password="a-long-test-password", laboratory=lab)
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def technologist(lab_a):
    return _user("tech_a", lab_a, "Technologist")


@pytest.fixture
def model_admin(lab_a):
    return _user("admin_a", lab_a, "Model admin")


@pytest.fixture
def outsider(lab_b):
    """A technologist in another lab, who must see nothing of lab A."""
    return _user("tech_b", lab_b, "Technologist")


@pytest.fixture
def tech_client(client, technologist):
    client.force_login(technologist)
    return client


@pytest.fixture
def prediction(technologist, tiny_record):
    from classifier.services import UploadedImage, classify_image

    return classify_image(technologist, UploadedImage("cell.png", image_bytes()), tiny_record)


@pytest.fixture(autouse=True)
def _fresh_media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture(autouse=True)
def _fresh_classifier_cache():
    from wbc_ml.inference import clear_cache

    clear_cache()
    yield


def make_known_batch(user, record, rows, *, name="Known slide", failed_error="damaged"):
    """A finished batch with known predictions (no model run): rows of (file name, class index, confidence,
    is_outlier); confidence goes to the class, the rest is shared equally. Plus one failed file."""
    from classifier.models import Prediction
    from reports.models import Batch, BatchItem

    batch = Batch.objects.create(
        laboratory=user.laboratory, user=user, name=name, model=record, status=Batch.Status.DONE, threshold=0.85
    )
    for position, (file_name, index, confidence, outlier) in enumerate(rows):
        probabilities = [round((1 - confidence) / 4, 6)] * 5
        probabilities[index] = confidence
        prediction = Prediction.objects.create(
            laboratory=batch.laboratory,
            user=user,
            model=record,
            model_version="1",
            model_sha256=record.sha256,
            image="cells/x.png",
            original_filename=file_name,
            width=10,
            height=10,
            predicted_class=WBC_CLASSES[index],
            confidence=confidence,
            probabilities=probabilities,
            is_outlier=outlier,
            processing_ms=10.0 + position,
        )
        BatchItem.objects.create(
            batch=batch,
            position=position,
            original_filename=file_name,
            prediction=prediction,
            status=BatchItem.Status.DONE,
        )
    BatchItem.objects.create(
        batch=batch,
        position=len(rows) + 3,
        original_filename="broken.jpg",
        status=BatchItem.Status.FAILED,
        error=failed_error,
    )
    return batch


SERVED_PNG = image_bytes(size=(80, 80))


class ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/cell.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(SERVED_PNG)))
            self.end_headers()
            self.wfile.write(SERVED_PNG)
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not an image</html>")

    def log_message(self, *args):
        pass


@pytest.fixture
def server(settings):
    """A real local image server; 'localhost' is allowed to resolve privately (as a lab's own server would be)."""
    settings.WBC_URL_ALLOWED_PRIVATE_HOSTS = {"localhost"}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


class HeldImageHandler(BaseHTTPRequestHandler):
    """Serves ``SERVED_PNG``, but holds the first request until ``release`` is set: a worker downloading a batch's
    URL then waits inside its batch (or chunk) for as long as a test needs."""

    arrived = threading.Event()
    release = threading.Event()
    lock = threading.Lock()
    taken = False

    def do_GET(self):
        with self.lock:
            first, HeldImageHandler.taken = not HeldImageHandler.taken, True
        if first:
            self.arrived.set()
            self.release.wait(90)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(SERVED_PNG)))
        self.end_headers()
        self.wfile.write(SERVED_PNG)

    def log_message(self, *args):
        pass


@pytest.fixture
def held_server(settings):
    """A :class:`HeldImageHandler` server on loopback: its base URL (``localhost`` may resolve privately)."""
    settings.WBC_URL_ALLOWED_PRIVATE_HOSTS = {"localhost"}
    HeldImageHandler.arrived.clear()
    HeldImageHandler.release.clear()
    HeldImageHandler.taken = False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HeldImageHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://localhost:{httpd.server_address[1]}"
    HeldImageHandler.release.set()
    httpd.shutdown()
    httpd.server_close()
