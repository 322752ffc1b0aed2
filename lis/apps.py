from django.apps import AppConfig


class LisConfig(AppConfig):
    name = "lis"
    verbose_name = "LIS reporting"
