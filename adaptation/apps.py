from django.apps import AppConfig


class AdaptationConfig(AppConfig):
    name = "adaptation"
    verbose_name = "Adapting models to a laboratory"
