import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wbcsite.settings")
application = get_asgi_application()

from wbcsite.thread_switching import apply_switch_interval  # noqa: E402 (needs the settings loaded above)

apply_switch_interval()
