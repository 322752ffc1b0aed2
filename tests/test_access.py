import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from accounts.models import User
from accounts.scoping import scoped
from classifier.models import ClassifierModel, Prediction


@pytest.mark.parametrize("name", ["classifier:classify", "classifier:history"])
def test_anonymous_is_sent_to_log_in(client, db, name):
    response = client.get(reverse(name))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_anonymous_cannot_open_a_result_or_its_image(client, prediction):
    for url in (
        reverse("classifier:prediction", args=[prediction.uid]),
        reverse("classifier:prediction_image", args=[prediction.uid]),
        reverse("classifier:saliency", args=[prediction.uid, "gradcam"]),
    ):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_log_in_page_is_public(client, db):
    assert client.get(reverse("login")).status_code == 200


def test_other_lab_gets_404_for_everything(client, prediction, outsider):
    client.force_login(outsider)
    for url in (
        reverse("classifier:prediction", args=[prediction.uid]),
        reverse("classifier:prediction_image", args=[prediction.uid]),
        reverse("classifier:saliency", args=[prediction.uid, "gradcam"]),
    ):
        assert client.get(url).status_code == 404
    history = client.get(reverse("classifier:history"))
    assert prediction.original_filename not in history.text


def test_scoped_helper_shows_nothing_to_another_lab(prediction, outsider, technologist):
    assert list(scoped(Prediction, technologist)) == [prediction]
    assert list(scoped(Prediction, outsider)) == []


def test_lab_models_are_private_but_shared_models_are_visible(tiny_record, lab_a, outsider, technologist):
    private = ClassifierModel.objects.create(
        name="Lab A custom",
        version="1",
        architecture="x",
        file_name="x.keras",
        sha256="0" * 64,
        input_height=32,
        input_width=32,
        normalization={"method": "scale01"},
        class_names=[],
        laboratory=lab_a,
    )
    assert set(scoped(ClassifierModel, technologist)) == {tiny_record, private}
    assert set(scoped(ClassifierModel, outsider)) == {tiny_record}


def test_user_without_a_lab_sees_nothing(client, prediction, db):
    loner = User.objects.create_user("loner", password="x-long-password-1")
    loner.groups.add(Group.objects.get(name="Technologist"))
    client.force_login(loner)
    assert client.get(reverse("classifier:prediction", args=[prediction.uid])).status_code == 404
    assert "not assigned to a laboratory" in client.get(reverse("classifier:history")).text


def test_user_without_classify_permission_gets_403(client, lab_a, tiny_record):
    viewer = User.objects.create_user("viewer", password="x-long-password-1", laboratory=lab_a)
    client.force_login(viewer)
    assert client.get(reverse("classifier:classify")).status_code == 403


def test_roles_exist_with_their_permissions(db):
    technologist = set(Group.objects.get(name="Technologist").permissions.values_list("codename", flat=True))
    model_admin = set(Group.objects.get(name="Model admin").permissions.values_list("codename", flat=True))
    assert {"add_prediction", "view_prediction"} <= technologist
    assert "change_classifiermodel" not in technologist
    assert {"add_classifiermodel", "change_classifiermodel"} <= model_admin
    assert Group.objects.filter(name="Supervisor").exists()


def test_log_in_attempts_are_rate_limited(client, technologist, settings):
    url = reverse("login")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post(url, {"username": "tech_a", "password": "wrong"})
    locked = client.post(url, {"username": "tech_a", "password": "a-long-test-password"})
    assert locked.status_code == 429
    assert "Too many failed log-in attempts" in locked.text


def test_correct_log_in_works_and_log_out_is_post(client, technologist):
    response = client.post(reverse("login"), {"username": "tech_a", "password": "a-long-test-password"})
    assert response.status_code == 302
    assert client.get(reverse("classifier:history")).status_code == 200
    assert client.post(reverse("logout")).status_code == 302
    assert client.get(reverse("classifier:history")).status_code == 302


def test_password_change_page_works(tech_client):
    response = tech_client.post(
        reverse("password_change"),
        {
            "old_password": "a-long-test-password",
            "new_password1": "Another-long-pass-42",
            "new_password2": "Another-long-pass-42",
        },
    )
    assert response.status_code == 302 and response["Location"] == reverse("password_change_done")


def test_admin_shows_model_admins_only_their_lab(client, model_admin, prediction, outsider, tiny_record, lab_b):
    from classifier.services import UploadedImage, classify_image
    from tests.conftest import image_bytes

    theirs = classify_image(outsider, UploadedImage("lab-b-cell.png", image_bytes(color=(90, 90, 200))), tiny_record)
    their_model = ClassifierModel.objects.create(
        name="Lab B custom",
        architecture="custom (keras)",
        file_name="x.keras",
        sha256="0" * 64,
        input_height=32,
        input_width=32,
        normalization={"method": "scale01"},
        class_names=[],
        laboratory=lab_b,
    )
    model_admin.is_staff = True
    model_admin.save()
    client.force_login(model_admin)
    predictions = client.get(reverse("admin:classifier_prediction_changelist"))
    assert predictions.status_code == 200
    assert prediction.original_filename in predictions.text and "lab-b-cell.png" not in predictions.text
    models = client.get(reverse("admin:classifier_classifiermodel_changelist"))
    assert models.status_code == 200 and "Tiny CNN" in models.text and "Lab B custom" not in models.text
    assert client.get(reverse("admin:classifier_prediction_change", args=[theirs.pk])).status_code == 404
    assert client.get(reverse("admin:classifier_classifiermodel_change", args=[their_model.pk])).status_code == 404


def test_users_without_a_laboratory_are_in_no_labs_scope(technologist):
    from accounts.models import User

    homeless = User.objects.create_user("homeless", password="x-long-password-1")
    assert homeless not in scoped(User, technologist)
    assert technologist in scoped(User, technologist)
