"""Only verified artefacts are served: the model file, its ONNX copy and its detector file are checked against the
checksums recorded at registration; every prediction records which exact model file made it; uploads never
share files between labs."""

import shutil

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from accounts.models import User
from classifier.models import ClassifierModel, Prediction
from classifier.registry import ensure_onnx, register_card
from classifier.services import UploadedImage, classify_image
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from reports.worker import process_batch_now
from tests.conftest import BUNDLED_MODELS, build_tiny_model, image_bytes
from wbc_ml.checksums import file_sha256
from wbc_ml.inference import ModelUnavailable, OnnxBackend, get_classifier
from wbc_ml.ood import OodDetector

CARD = BUNDLED_MODELS / "enhanced_cnn_v2.json"


@pytest.fixture
def bundled_copy(tmp_path, settings):
    """The smallest bundled model, its card and its detector file, copied into a models folder of the test's own."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("enhanced_cnn_v2.json", "enhanced_cnn_v2.keras", "enhanced_cnn_v2.ood.npz"):
        shutil.copy(BUNDLED_MODELS / name, folder / name)
    settings.WBC_MODELS_DIR = folder
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    return folder


# --- the ONNX copy and the detector file ------------------------------------------------------------


@pytest.mark.django_db
def test_registering_a_card_records_the_checksums_of_the_detector_and_the_onnx_copy(bundled_copy, settings):
    record, _ = register_card(bundled_copy / CARD.name)
    assert record.ood_sha256 == file_sha256(bundled_copy / "enhanced_cnn_v2.ood.npz") == record.card["ood"]["sha256"]
    assert record.onnx_file_name, record.onnx_status
    assert record.onnx_sha256 == file_sha256(settings.WBC_ONNX_DIR / record.onnx_file_name)
    classifier = get_classifier(record.spec())
    assert isinstance(classifier.backend, OnnxBackend) and classifier.ood is not None


@pytest.mark.django_db
def test_a_card_whose_detector_file_was_altered_is_not_registered(bundled_copy):
    _retune_detector(bundled_copy / "enhanced_cnn_v2.ood.npz")
    with pytest.raises(Exception, match=r"enhanced_cnn_v2\.ood\.npz does not match the card's ood sha256"):
        register_card(bundled_copy / CARD.name, convert_onnx=False)
    assert not ClassifierModel.objects.exists()


def _retune_detector(path):
    """A real, loadable detector file that flags nothing any more: the tampering that matters clinically."""
    detector = OodDetector.load(path)
    detector.distance_threshold = 1e12
    detector.probability_threshold = 1.0
    detector.save(path)


@pytest.mark.django_db
def test_a_tampered_detector_file_is_refused_at_load(bundled_copy):
    record, _ = register_card(bundled_copy / CARD.name, convert_onnx=False)
    assert get_classifier(record.spec()).ood is not None  # the untouched file serves
    from wbc_ml.inference import clear_cache

    clear_cache()
    _retune_detector(bundled_copy / record.ood_file_name)
    with pytest.raises(ModelUnavailable) as caught:
        get_classifier(record.spec())
    assert "The detector file enhanced_cnn_v2.ood.npz does not match its registered checksum" in str(caught.value)
    (bundled_copy / record.ood_file_name).unlink()  # and a missing detector is refused, never silently dropped
    with pytest.raises(ModelUnavailable, match=r"The detector file enhanced_cnn_v2\.ood\.npz is missing"):
        get_classifier(record.spec())


def test_a_tampered_onnx_copy_is_refused_at_load_and_nothing_is_stored(tiny_record, settings, tmp_path, tech_client):
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    ensure_onnx(tiny_record)
    tiny_record.refresh_from_db()
    onnx = settings.WBC_ONNX_DIR / tiny_record.onnx_file_name
    assert tiny_record.onnx_sha256 == file_sha256(onnx)
    data = bytearray(onnx.read_bytes())
    data[-8] ^= 0xFF  # one altered byte
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailable) as caught:
        get_classifier(tiny_record.spec())
    assert f"The ONNX copy {onnx.name} does not match its registered checksum" in str(caught.value)
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    response = tech_client.post(reverse("classifier:classify"), {"image": upload, "model": tiny_record.pk})
    assert response.status_code == 503 and "does not match its registered checksum" in response.text
    assert not Prediction.objects.exists()


def test_an_onnx_copy_without_a_recorded_checksum_is_not_served(tiny_record, settings, tmp_path):
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    ensure_onnx(tiny_record)
    ClassifierModel.objects.filter(pk=tiny_record.pk).update(onnx_sha256="")  # a row from before checksums
    tiny_record.refresh_from_db()
    assert not isinstance(get_classifier(tiny_record.spec()).backend, OnnxBackend)
    ensure_onnx(tiny_record)  # register_models again: exported afresh, with its checksum
    tiny_record.refresh_from_db()
    assert tiny_record.onnx_sha256 == file_sha256(settings.WBC_ONNX_DIR / tiny_record.onnx_file_name)


# --- every prediction names the exact model file ----------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_model_sha256_is_stored_for_single_images_and_batch_items(technologist, tiny_record):
    single = classify_image(technologist, UploadedImage("cell.png", image_bytes()), tiny_record)
    assert single.model_sha256 == tiny_record.sha256 == file_sha256(tiny_record.path)
    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(40 * i, 100, 200))) for i in range(2)]
    batch = submit_batch(technologist, entries, tiny_record, name="Slide")
    process_batch_now(batch.pk)
    stored = Prediction.objects.filter(batch_item__batch=batch)
    assert stored.count() == 2
    assert set(stored.values_list("model_sha256", flat=True)) == {tiny_record.sha256}


# --- uploads of two labs never share files ----------------------------------------------------------


@pytest.fixture
def admin_clients(settings, tmp_path, lab_a, lab_b):
    from django.contrib.auth.models import Group

    settings.WBC_CUSTOM_MODELS_DIR = tmp_path / "custom"
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    clients = {}
    for lab in (lab_a, lab_b):
        user = User.objects.create_user(f"models_{lab.pk}", password="a-long-test-password", laboratory=lab)
        user.groups.add(Group.objects.get(name="Model admin"))
        clients[lab.name] = Client()
        clients[lab.name].force_login(user)
    return clients


def _upload(client, data: bytes, name="Lab CNN"):
    return client.post(
        reverse("classifier:model_upload"),
        {
            "name": name,
            "class_order": "basophil, eosinophil, lymphocyte, monocyte, neutrophil",
            "normalization": "scale01",
            "file": SimpleUploadedFile("model.keras", data),  # the same file name in both labs
        },
    )


def _classifies(client, record) -> bool:
    upload = SimpleUploadedFile("cell.png", image_bytes(), content_type="image/png")
    response = client.post(reverse("classifier:classify"), {"image": upload, "model": record.pk})
    return response.status_code == 302 and Prediction.objects.filter(model=record).exists()


def test_two_labs_uploading_the_same_named_model_get_their_own_files(admin_clients, tmp_path, lab_a, lab_b):
    path = tmp_path / "model.keras"
    build_tiny_model(path, seed=11)
    assert _upload(admin_clients["Lab A"], path.read_bytes()).status_code == 302
    assert _upload(admin_clients["Lab B"], path.read_bytes()).status_code == 302
    mine, theirs = ClassifierModel.objects.get(laboratory=lab_a), ClassifierModel.objects.get(laboratory=lab_b)
    assert mine.sha256 == theirs.sha256 == file_sha256(path)
    assert mine.file_name != theirs.file_name and mine.onnx_file_name != theirs.onnx_file_name
    assert mine.file_name.startswith(f"lab{lab_a.pk}/") and theirs.file_name.startswith(f"lab{lab_b.pk}/")
    for record in (mine, theirs):
        assert record.onnx_sha256, record.onnx_status  # exported by the vetting child, checksum recorded
        assert isinstance(get_classifier(record.spec()).backend, OnnxBackend)
    assert _classifies(admin_clients["Lab A"], mine) and _classifies(admin_clients["Lab B"], theirs)


def test_a_failed_registration_never_deletes_another_labs_file(admin_clients, tmp_path, lab_a, lab_b, settings):
    path = tmp_path / "model.keras"
    build_tiny_model(path, seed=12)
    assert _upload(admin_clients["Lab A"], path.read_bytes()).status_code == 302
    mine = ClassifierModel.objects.get(laboratory=lab_a)
    # Lab B once had "Lab CNN" versions 2 and 3 and deleted version 2: counting rows would give version 3 again
    ClassifierModel.objects.create(
        name="Lab CNN",
        version="3",
        architecture="custom (keras)",
        file_name=f"lab{lab_b.pk}/gone.keras",
        sha256="0" * 64,
        input_height=32,
        input_width=32,
        normalization={"method": "scale01"},
        class_names=mine.class_names,
        laboratory=lab_b,
    )
    response = _upload(admin_clients["Lab B"], path.read_bytes())  # the very same file, the same name
    assert response.status_code == 302, response.content[:800]
    assert ClassifierModel.objects.get(laboratory=lab_b, sha256=mine.sha256).version == "4"
    assert mine.path.is_file() and file_sha256(mine.path) == mine.sha256
    assert _classifies(admin_clients["Lab A"], mine)


def _stored_files(tmp_path) -> list:
    return sorted(p for folder in ("custom", "onnx") for p in (tmp_path / folder).rglob("*") if p.is_file())


def test_a_refused_upload_removes_only_its_own_files(admin_clients, tmp_path):
    good, wrong = tmp_path / "model.keras", tmp_path / "four-classes.keras"
    build_tiny_model(good, seed=13)
    build_tiny_model(wrong, seed=13, n_classes=4)  # loads, then fails the output check in the child
    assert _upload(admin_clients["Lab A"], good.read_bytes()).status_code == 302
    before = _stored_files(tmp_path)
    assert len(before) == 2  # the model and its ONNX copy
    refused = _upload(admin_clients["Lab B"], wrong.read_bytes())
    assert refused.status_code == 400 and "has 4 outputs per image" in refused.text
    assert _stored_files(tmp_path) == before


def test_uploaded_models_are_never_exported_in_the_web_process(admin_clients, tmp_path, lab_a):
    path = tmp_path / "model.keras"
    build_tiny_model(path, seed=14)
    assert _upload(admin_clients["Lab A"], path.read_bytes()).status_code == 302
    with pytest.raises(ValueError, match="made by the vetting child"):
        ensure_onnx(ClassifierModel.objects.get(laboratory=lab_a))
