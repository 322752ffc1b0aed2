import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wbcsite.settings")
application = get_wsgi_application()

from wbcsite.thread_switching import apply_switch_interval  # noqa: E402 (needs the settings loaded above)

apply_switch_interval()
