from django.apps import AppConfig
from django.db.models.signals import post_migrate


class ClassifierConfig(AppConfig):
    name = "classifier"
    verbose_name = "Cell classification"

    def ready(self) -> None:
        from .roles import ensure_roles

        post_migrate.connect(ensure_roles, sender=self)
