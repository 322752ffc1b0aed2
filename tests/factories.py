"""factory_boy factories for the records tests build often: laboratories, users and registry entries."""

from __future__ import annotations

from pathlib import Path

import factory
from factory.django import DjangoModelFactory

from wbc_ml.checksums import file_sha256
from wbc_ml.datasets import WBC_CLASSES

TEST_PASSWORD = "a-long-test-password"


class LaboratoryFactory(DjangoModelFactory):
    class Meta:
        model = "accounts.Laboratory"
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"Lab {n}")


class UserFactory(DjangoModelFactory):
    class Meta:
        model = "accounts.User"
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    laboratory = factory.SubFactory(LaboratoryFactory)
    password = factory.django.Password(TEST_PASSWORD)


class ClassifierModelFactory(DjangoModelFactory):
    """A registry entry. Give ``model_file`` (a real .keras file) to fill the file name and its sha256."""

    class Meta:
        model = "classifier.ClassifierModel"
        exclude = ("model_file",)

    model_file: Path | None = None
    name = factory.Sequence(lambda n: f"Model {n}")
    version = "1"
    architecture = "tiny"
    file_name = factory.LazyAttribute(lambda o: o.model_file.name if o.model_file else "missing.keras")
    sha256 = factory.LazyAttribute(lambda o: file_sha256(o.model_file) if o.model_file else "0" * 64)
    input_height = 32
    input_width = 32
    normalization = factory.LazyFunction(lambda: {"method": "scale01"})
    class_names = factory.LazyFunction(lambda: list(WBC_CLASSES))
    temperature = 1.0
    is_bundled = True
