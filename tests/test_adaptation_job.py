"""The web adaptation job: a lab's Model admin adapts a model to the lab's labelled cells, the real worker trains it,
the lab compares base and adapted on held-back cells, then promotes or discards it; another lab never sees it.

Tiny real Keras models, generated cell images stored like a slide's, real signed slides and evaluation runs.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from adaptation.cells import HELD_BACK, TRAIN, LabelledCell, split_cells
from adaptation.models import AdaptationJob
from adaptation.runner import INTERRUPTED
from classifier.models import ClassifierModel
from reports.models import Batch, BatchItem, CellVerification, EvaluationRun, ReportVersion
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from tests.conftest import REPO, image_bytes, make_known_batch, start_worker
from tests.test_adaptation import COLOURS as WBC_COLOURS
from wbc_ml.datasets import WBC_CLASSES

COLOURS = {**WBC_COLOURS, "platelet": (150, 150, 150)}  # one look per class, platelets too
FAST = {"methods": ["head"], "views": 2, "c_grid": [1.0], "folds": 3}
DEADLINE_SECONDS = 240


def cell_png(class_name: str, rng: np.random.Generator) -> bytes:
    jitter = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[class_name])
    return image_bytes(size=(int(rng.integers(40, 64)), int(rng.integers(40, 64))), color=jitter)


def slide_items(user, record, per_class: dict[str, int], name: str, seed: int) -> list[tuple[BatchItem, str]]:
    """A finished slide whose items hold stored generated cells; returns (item, true class) pairs."""
    rng = np.random.default_rng(seed)
    batch = Batch.objects.create(
        laboratory=user.laboratory, user=user, name=name, model=record, status=Batch.Status.DONE
    )
    pairs = []
    for class_name, count in per_class.items():
        for i in range(count):
            stored = default_storage.save(
                f"batches/test/{name}-{class_name}-{i}.png", ContentFile(cell_png(class_name, rng))
            )
            item = BatchItem.objects.create(
                batch=batch, position=len(pairs), original_filename=f"{class_name}_{i:02d}.png", image=stored,
                status=BatchItem.Status.DONE,
            )  # fmt: skip
            pairs.append((item, class_name))
    return pairs


def signed_slide(user, record, per_class: dict[str, int], name: str = "Signed slide", seed: int = 1) -> Batch:
    """A slide whose cells a technologist verified and signed."""
    pairs = slide_items(user, record, per_class, name, seed)
    now = timezone.now()
    for item, class_name in pairs:
        CellVerification.objects.create(item=item, verified_class=class_name, verified_by=user, verified_at=now)
    batch = pairs[0][0].batch
    ReportVersion.objects.create(batch=batch, number=1, opened_by=user, opened_at=now, signed_by=user, signed_at=now)
    return batch


def labelled_run(user, record, per_class: dict[str, int], seed: int = 2) -> EvaluationRun:
    """An evaluation run of a slide with the true class of each of its images."""
    pairs = slide_items(user, record, per_class, "Evaluated slide", seed)
    return EvaluationRun.objects.create(
        laboratory=user.laboratory, batch=pairs[0][0].batch, model=record, model_version="1", threshold=0.85,
        user=user, labels_sha256="0" * 64, labels_filename="labels.csv", n_labelled=len(pairs),
        labels={str(item.pk): class_name for item, class_name in pairs},
    )  # fmt: skip


def zip_of(entries: dict[str, bytes], name: str = "cells.zip") -> SimpleUploadedFile:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in entries.items():
            archive.writestr(path, data)
    return SimpleUploadedFile(name, buffer.getvalue(), content_type="application/zip")


@pytest.fixture
def lab_dirs(settings, tmp_path):
    settings.WBC_CUSTOM_MODELS_DIR = tmp_path / "custom"
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    settings.WBC_ADAPT_CONFIG = FAST
    return settings


@pytest.fixture
def admin_client(client, model_admin, lab_dirs):
    client.force_login(model_admin)
    return client


def start(client, record, **extra):
    data = {"base_model": record.pk, "sources": ["verified", "evaluation"], "seed": 0, **extra}
    return client.post(reverse("adaptation:page"), data)


def lab_worker(lab_dirs, models_dir):
    """The real worker, writing adapted models where the test's settings keep them."""
    return start_worker(
        lab_dirs,
        models_dir,
        WBC_CUSTOM_MODELS_DIR=str(lab_dirs.WBC_CUSTOM_MODELS_DIR),
        WBC_ONNX_DIR=str(lab_dirs.WBC_ONNX_DIR),
    )


def wait_until_finished(job: AdaptationJob, worker=None) -> AdaptationJob:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if not job.is_active:
            return job
        if worker is not None and worker.poll() is not None:
            pytest.fail(f"the worker stopped: {worker.stdout.read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"the job is still {job.status} ({job.stage}) after {DEADLINE_SECONDS} s")


def wait_for_stage(job: AdaptationJob, words: str, seconds: float = 120) -> AdaptationJob:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if words in job.stage:
            return job
        time.sleep(0.2)
    pytest.fail(f"the job never reached {words!r}: {job.status} ({job.stage}) {job.error}")


@pytest.mark.timeout(400)
@pytest.mark.django_db(transaction=True)
def test_a_lab_adapts_a_model_with_the_real_worker_compares_it_promotes_then_discards_it(
    admin_client, model_admin, outsider, tiny_record, models_dir, lab_dirs, lab_a
):
    signed_slide(model_admin, tiny_record, {**dict.fromkeys(WBC_CLASSES, 6), "platelet": 4})
    labelled_run(model_admin, tiny_record, dict.fromkeys(WBC_CLASSES, 2))
    page = admin_client.get(reverse("adaptation:page"))
    assert page.status_code == 200 and b"Start the adaptation" in page.content
    assert [row["total"] for row in page.context["count_rows"]] == [8] * 5

    response = start(admin_client, tiny_record)
    assert response.status_code == 302, response.content.decode()[-2000:]
    job = AdaptationJob.objects.get()
    assert response.url == reverse("adaptation:job", args=[job.pk])
    assert job.counts(TRAIN) == dict.fromkeys(WBC_CLASSES, 6) and job.counts(HELD_BACK) == dict.fromkeys(WBC_CLASSES, 2)

    worker = lab_worker(lab_dirs, models_dir)
    try:
        job = wait_until_finished(job, worker)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert job.status == AdaptationJob.Status.READY, job.error
    assert job.progress == 1.0 and job.started_at and job.finished_at and job.remaining_seconds() is None

    # A lab-scoped model, registered like an upload (ONNX copy, detectors), available but not the lab's default.
    record = job.result_model
    assert record.laboratory_id == lab_a.pk and not record.is_bundled and record.is_active
    assert record.onnx_sha256 and record.ood_sha256 and record.spec().ood_path.is_file()
    lab_a.refresh_from_db()
    assert lab_a.default_model_id is None

    # The card: base model and sha256, the cells used per class by file name, the method, CV metrics with intervals.
    card = record.card
    adaptation = card["adaptation"]
    assert adaptation["base_model"]["sha256"] == tiny_record.sha256
    assert adaptation["started_by"] == model_admin.username and adaptation["method"] == "head"
    trained = {f"{name}/{file}" for name, files in adaptation["cells"].items() for file in files}
    assert trained == {f"{c['class']}/{c['name']}" for c in job.cells_with_role(TRAIN)}
    cv = card["metrics"]["cross_validation"]
    assert cv["n"] == 30 and cv["accuracy_95ci"][0] <= cv["accuracy"] <= cv["accuracy_95ci"][1]
    # Cross-validation and adaptation never saw the held-back cells: the two file lists are disjoint.
    held = set(job.evaluation["files"])
    assert held == {f"{c['class']}/{c['name']}" for c in job.cells_with_role(HELD_BACK)} and len(held) == 10
    assert not held & trained
    for side in ("base", "adapted"):
        result = job.evaluation[side]
        assert result["n"] == 10 and 0 <= result["flagged_share"] <= 1 and result["metrics"]["flagged_counts_detectors"]
        assert set(result["metrics"]["per_class"]) == set(WBC_CLASSES)
        assert np.asarray(result["metrics"]["confusion_matrix"]).sum() == 10
    assert card["ood"]["non_wbc_images"] == 4  # the lab's verified platelets taught the detector network

    detail = admin_client.get(reverse("adaptation:job", args=[job.pk]))
    assert detail.status_code == 200 and b'id="comparison"' in detail.content and b"Promote" in detail.content
    assert b'id="quarter-turns">as it is' in detail.content  # 2 views: no quarter turns to average
    assert record.spec().quarter_turns == card["quarter_turns"] == 1
    assert admin_client.get(reverse("adaptation:job_card", args=[job.pk])).json()["sha256"] == record.sha256

    # Served like any lab model (ONNX, the refitted detectors): a cell classified with it gets a detector score.
    from classifier.services import UploadedImage, classify_image

    prediction = classify_image(
        model_admin, UploadedImage("cell.png", cell_png("eosinophil", np.random.default_rng(9))), record
    )
    assert prediction.model_sha256 == record.sha256 and prediction.ood_score is not None

    # Another lab: a 404 on every page, the model in no list, not in the admin.
    client = Client()
    client.force_login(outsider)
    for name in ("job", "job_status", "job_card"):
        assert client.get(reverse(f"adaptation:{name}", args=[job.pk])).status_code == 404
    assert client.post(reverse("adaptation:job_promote", args=[job.pk])).status_code == 404
    listed = client.get("/api/v1/models/").json()
    assert record.pk not in [m["id"] for m in (listed["results"] if isinstance(listed, dict) else listed)]
    assert tiny_record.pk in [m["id"] for m in (listed["results"] if isinstance(listed, dict) else listed)]
    outsider.is_staff = True
    outsider.save()
    assert client.get(reverse("admin:classifier_classifiermodel_change", args=[record.pk])).status_code == 404
    assert client.get(reverse("admin:adaptation_adaptationjob_change", args=[job.pk])).status_code == 404

    # Promote, then discard: both audited; the lab's default goes back to what it was.
    assert admin_client.post(reverse("adaptation:job_promote", args=[job.pk])).status_code == 302
    lab_a.refresh_from_db()
    job.refresh_from_db()
    assert lab_a.default_model_id == record.pk and job.status == AdaptationJob.Status.PROMOTED
    assert admin_client.post(reverse("adaptation:job_discard", args=[job.pk])).status_code == 302
    lab_a.refresh_from_db()
    job.refresh_from_db()
    record.refresh_from_db()
    assert job.status == AdaptationJob.Status.DISCARDED and job.decided_by == model_admin
    assert lab_a.default_model_id is None and not record.is_active
    reasons = list(job.history.order_by("history_id").values_list("history_change_reason", flat=True))
    assert reasons[0].startswith("adaptation of") and reasons[-2:] == [
        "adapted model promoted to the lab's default",
        "adapted model discarded",
    ]
    assert set(job.history.values_list("history_user_id", flat=True)) >= {model_admin.pk}
    assert lab_a.history.filter(history_change_reason__contains="adaptation promoted").exists()


@pytest.mark.django_db
def test_below_five_cells_of_a_class_the_adaptation_is_refused_and_says_which(admin_client, model_admin, tiny_record):
    signed_slide(model_admin, tiny_record, {**dict.fromkeys(WBC_CLASSES, 6), "basophil": 3, "monocyte": 4})
    page = admin_client.get(reverse("adaptation:page"))
    assert b"too few" in page.content and page.context["short"] == {"basophil": 3, "monocyte": 4}

    response = start(admin_client, tiny_record)
    assert response.status_code == 400
    message = response.context["form"].non_field_errors()[0]
    assert "at least 5" in message and "basophil 3, monocyte 4" in message and "eosinophil" not in message
    assert not AdaptationJob.objects.exists()


@pytest.mark.django_db
def test_a_bad_zip_is_refused_whole_and_a_good_one_adds_its_cells(admin_client, model_admin, tiny_record, settings):
    signed_slide(model_admin, tiny_record, {**dict.fromkeys(WBC_CLASSES, 6), "basophil": 2})
    rng = np.random.default_rng(5)
    good = {f"lab/basophil/b{i}.png": cell_png("basophil", rng) for i in range(4)}

    bad = zip_of(
        {**good, "lab/basophil/fake.png": b"<html>not an image</html>", "lab/blasts/x.png": good["lab/basophil/b0.png"]}
    )
    response = start(admin_client, tiny_record, archive=bad)
    message = response.context["form"].non_field_errors()[0]
    assert response.status_code == 400 and "nothing was stored" in message
    assert "fake.png" in message and "blasts/x.png: not in a folder named after a class" in message
    assert not AdaptationJob.objects.exists()
    assert not (Path(settings.MEDIA_ROOT) / "adaptation").exists()

    response = start(admin_client, tiny_record, archive=zip_of(good))
    assert response.status_code == 302
    job = AdaptationJob.objects.get()
    assert job.sources == ["evaluation", "upload", "verified"]
    assert job.counts(TRAIN)["basophil"] + job.counts(HELD_BACK)["basophil"] == 6
    assert all(default_storage.exists(c["image"]) for c in job.cells if c["source"] == "upload")

    # A second job while one is queued is refused; a queued job is cancelled at once.
    assert start(admin_client, tiny_record).status_code == 400
    assert admin_client.post(reverse("adaptation:job_cancel", args=[job.pk])).status_code == 302
    job.refresh_from_db()
    assert job.status == AdaptationJob.Status.CANCELLED


def test_every_class_is_split_the_same_seeded_way_with_held_back_cells_apart():
    cells = [LabelledCell(f"img/{c}/{i}.png", c, "verified", f"{c}{i}.png") for c in WBC_CLASSES for i in range(9)]
    split = split_cells(cells, list(WBC_CLASSES), seed=3, held_back_share=0.25, max_train=5, max_held=100)
    held = [c["image"] for c in split if c["role"] == HELD_BACK]
    train = [c["image"] for c in split if c["role"] == TRAIN]
    assert len(held) == 10 and len(train) == 25 and not set(held) & set(train)  # 2 held back, 5 (capped) trained
    again = split_cells(
        list(reversed(cells)), list(WBC_CLASSES), seed=3, held_back_share=0.25, max_train=5, max_held=100
    )
    assert again == split
    other = split_cells(cells, list(WBC_CLASSES), seed=4, held_back_share=0.25, max_train=5, max_held=100)
    assert {c["image"] for c in other if c["role"] == HELD_BACK} != set(held)


@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_cancel_stops_a_running_job_between_epochs_and_registers_nothing(
    admin_client, model_admin, tiny_record, lab_dirs
):
    from adaptation.runner import run_job

    lab_dirs.WBC_ADAPT_CONFIG = {"methods": ["finetune"], "views": 2, "c_grid": [1.0], "folds": 3, "epochs": 2000}
    signed_slide(model_admin, tiny_record, dict.fromkeys(WBC_CLASSES, 8))
    assert start(admin_client, tiny_record).status_code == 302
    job = AdaptationJob.objects.get()
    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(run_job(job.pk)), daemon=True)
    runner.start()
    wait_for_stage(job, "fine-tuning")
    assert 0 < job.progress < 0.5, (job.status, job.stage, job.error)
    status = admin_client.get(reverse("adaptation:job_status", args=[job.pk])).json()
    assert status["status"] == "running" and status["elapsed_seconds"] > 0

    assert admin_client.post(reverse("adaptation:job_cancel", args=[job.pk])).status_code == 302
    runner.join(timeout=120)
    assert outcome == ["cancelled"]
    job.refresh_from_db()
    assert job.status == AdaptationJob.Status.CANCELLED and job.result_model is None
    assert not ClassifierModel.objects.filter(laboratory=model_admin.laboratory).exists()
    custom = lab_dirs.WBC_CUSTOM_MODELS_DIR
    assert not custom.exists() or not [p for p in custom.rglob("*") if p.is_file()]
    assert "cancel requested" in job.history.values_list("history_change_reason", flat=True)


@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_batches_go_on_while_an_adaptation_trains_and_a_stopped_worker_fails_the_job_cleanly(
    admin_client, model_admin, tiny_record, models_dir, lab_dirs
):
    lab_dirs.WBC_ADAPT_CONFIG = {"methods": ["finetune"], "views": 2, "c_grid": [1.0], "folds": 3, "epochs": 2000}
    signed_slide(model_admin, tiny_record, dict.fromkeys(WBC_CLASSES, 8))
    assert start(admin_client, tiny_record).status_code == 302
    job = AdaptationJob.objects.get()
    worker = lab_worker(lab_dirs, models_dir)
    try:
        wait_for_stage(job, "fine-tuning")
        # The one worker process classifies a new batch while the job trains (before, the batch waited behind it).
        entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(40 * i, 90, 160))) for i in range(3)]
        batch = submit_batch(model_admin, entries, tiny_record, name="During the adaptation")
        deadline = time.monotonic() + 60
        while not batch.is_finished and time.monotonic() < deadline:
            time.sleep(0.2)
            batch.refresh_from_db()
        assert batch.status == Batch.Status.DONE and batch.items.filter(prediction__isnull=False).count() == 3
        job.refresh_from_db()
        assert job.status == AdaptationJob.Status.RUNNING, job.stage

        # SIGTERM: the job ends at its next step, failed with the reason, and nothing is registered.
        worker.terminate()
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    job.refresh_from_db()
    assert job.status == AdaptationJob.Status.FAILED and job.error == INTERRUPTED and job.result_model is None
    assert not ClassifierModel.objects.filter(laboratory=model_admin.laboratory).exists()


@pytest.mark.django_db
def test_only_model_admins_start_cancel_promote_or_discard(
    tech_client, technologist, model_admin, tiny_record, lab_dirs
):
    from adaptation import services

    signed_slide(model_admin, tiny_record, dict.fromkeys(WBC_CLASSES, 6))
    page = tech_client.get(reverse("adaptation:page"))
    assert page.status_code == 200 and b'id="ask-model-admin"' in page.content and b"adapt-form" not in page.content
    assert start(tech_client, tiny_record).status_code == 403
    assert not AdaptationJob.objects.exists()
    job = services.start_job(model_admin, tiny_record, ["verified"])
    for action in ("job_cancel", "job_promote", "job_discard"):
        assert tech_client.post(reverse(f"adaptation:{action}", args=[job.pk])).status_code == 403
    job.refresh_from_db()
    assert job.status == AdaptationJob.Status.QUEUED and not job.cancel_requested
    assert tech_client.get(reverse("adaptation:job", args=[job.pk])).status_code == 200  # the lab may look


@pytest.mark.django_db
def test_a_slide_that_looks_out_of_scope_points_to_the_adaptation_page(tech_client, technologist, tiny_record):
    rows = [(f"cell{i}.png", i % 5, 0.4, False) for i in range(10)]  # every cell flagged: out of scope
    batch = make_known_batch(technologist, tiny_record, rows)
    page = tech_client.get(reverse("reports:batch", args=[batch.uid]))
    assert b'id="out-of-scope"' in page.content
    assert b'id="adapt-link"' in page.content and reverse("adaptation:page").encode() in page.content


@pytest.mark.django_db
def test_an_evaluation_run_keeps_its_labels_and_they_count_as_labelled_cells(model_admin, tiny_record):
    from adaptation.cells import EVALUATION, lab_cells
    from reports.services import create_evaluation

    rows = [(f"cell{i}.png", i % 5, 0.9, False) for i in range(10)]
    batch = make_known_batch(model_admin, tiny_record, rows)
    rng = np.random.default_rng(3)
    for item in batch.items.exclude(prediction=None):
        item.image = default_storage.save(
            f"batches/test/{item.original_filename}", ContentFile(cell_png("basophil", rng))
        )
        item.save(update_fields=["image"])
    csv = "filename,class\n" + "".join(f"cell{i}.png,{WBC_CLASSES[(i + 1) % 5]}\n" for i in range(10))
    run = create_evaluation(model_admin, batch, csv.encode(), "labels.csv")
    assert sorted(run.labels.values()) == sorted(WBC_CLASSES[(i + 1) % 5] for i in range(10))
    found = lab_cells(model_admin, list(WBC_CLASSES), [EVALUATION])
    assert found.counts() == dict.fromkeys(WBC_CLASSES, 2) and found.per_source[EVALUATION]["basophil"] == 2


def test_the_web_process_serves_the_adaptation_pages_without_loading_tensorflow():
    """Only the worker runs the adaptation: importing the pages and the task must not load TensorFlow."""
    code = (
        "import os, sys, django; os.environ['DJANGO_SETTINGS_MODULE'] = 'wbcsite.settings'; django.setup(); "
        "import wbcsite.urls, adaptation.views, adaptation.tasks, wbc_ml.adaptation as a; a.MIN_CELLS_PER_CLASS; "
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
