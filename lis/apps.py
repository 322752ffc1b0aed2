from django.apps import AppConfig


class LisConfig(AppConfig):
    name = "lis"
    verbose_name = "LIS reporting"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (connects the sign-off hook)
