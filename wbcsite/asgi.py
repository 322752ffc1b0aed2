import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wbcsite.settings")
application = get_asgi_application()

from wbcsite.web_process import prepare_web_process  # noqa: E402 (needs the settings loaded above)

prepare_web_process()
