"""Settings for the WBC platform, all from environment variables with safe defaults.

Defaults give a working single-machine install (SQLite, local media, bundled models). Production
sets ``WBC_ENV=production`` plus ``DATABASE_URL``, ``ALLOWED_HOSTS`` and optionally S3 media.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no)")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_networks(name: str, default: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """A comma-separated list of addresses or networks (``10.0.0.0/8``); a bad entry stops the start-up."""
    try:
        return [ipaddress.ip_network(item, strict=False) for item in env_list(name, default)]
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from exc


def _secret_key(production: bool) -> str:
    """SECRET_KEY from the environment; in development, else generated once into a file outside git.

    Production refuses to start without it: a key made up on each host would give every host different token
    digests, sessions and signed values.
    """
    key = os.environ.get("SECRET_KEY")
    if key:
        return key
    if production:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when WBC_ENV=production (the same long random value on every host), "
            'e.g. python -c "import secrets; print(secrets.token_urlsafe(64))".'
        )
    key_file = Path(env_str("SECRET_KEY_FILE", str(BASE_DIR / "var" / "secret_key")))
    if key_file.exists():
        return key_file.read_text().strip()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(64)
    key_file.write_text(key)
    key_file.chmod(0o600)
    return key


PRODUCTION = env_str("WBC_ENV", "development") == "production"
DEBUG = env_bool("DEBUG", False)
SECRET_KEY = _secret_key(PRODUCTION)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "django_tasks_db",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "accounts",
    "classifier",
    "reports",
    "simple_history",
    "audit",
    "lis",
    "adaptation",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "wbcsite.urls"
WSGI_APPLICATION = "wbcsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "wbcsite.context_processors.review_threshold",
                "wbcsite.context_processors.navigation",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'var' / 'db.sqlite3'}"), conn_max_age=60
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the worker write while the web process reads; a busy timeout rides out short locks. Connections are
    # kept between requests (CONN_MAX_AGE above) as on PostgreSQL: opening one and running these pragmas took
    # ~1.5 ms of every API request.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "classifier:classify"
LOGOUT_REDIRECT_URL = "login"

# Log-in rate limiting (django-axes): 5 failures lock the username+address pair for 15 minutes, and 20 failures
# from one address across usernames (password spraying) lock that address (accounts.login_lockout).
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5)
WBC_LOGIN_ADDRESS_FAILURE_LIMIT = env_int("WBC_LOGIN_ADDRESS_FAILURE_LIMIT", 20)
AXES_COOLOFF_TIME = 0.25
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_HANDLER = "accounts.login_lockout.AddressLimitHandler"
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_ENABLED = env_bool("AXES_ENABLED", True)

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
MEDIA_URL = "media/"
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(BASE_DIR / "var" / "media")))

# Files go through STORAGES: media (uploads, thumbnails, saliency maps, figures) in "default"; uploaded model files in
# "models" and every ONNX copy in "onnx" (classifier.model_files; bundled models stay in WBC_MODELS_DIR). Folders on
# this machine by default; set AWS_STORAGE_BUCKET_NAME and all three are in one S3 bucket (django-storages), shared
# by every host: media at the bucket's root, model files under WBC_S3_MODELS_PREFIX ("models/"). Credentials come
# the standard AWS way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, a profile, an instance role),
# never from this file. Each host keeps model files fetched from S3 in WBC_MODEL_CACHE_DIR, checked by sha256.
WBC_MODEL_CACHE_DIR = Path(env_str("WBC_MODEL_CACHE_DIR", str(BASE_DIR / "var" / "model-cache")))


def s3_client_config():
    """botocore's client settings: a short S3 outage is retried (standard mode, with back-off) within timeouts."""
    from botocore.config import Config

    return Config(
        retries={"mode": "standard", "max_attempts": env_int("WBC_S3_MAX_ATTEMPTS", 10)},
        connect_timeout=env_int("WBC_S3_CONNECT_TIMEOUT", 5),
        read_timeout=env_int("WBC_S3_READ_TIMEOUT", 60),
        signature_version="s3v4",
        s3={"addressing_style": env_str("AWS_S3_ADDRESSING_STYLE", "auto")},  # "path" for MinIO and the like
    )


def _s3_storage(location: str, **options) -> dict:
    return {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env_str("AWS_STORAGE_BUCKET_NAME"),
            "region_name": env_str("AWS_S3_REGION_NAME") or None,
            "endpoint_url": env_str("AWS_S3_ENDPOINT_URL") or None,
            "location": location,
            "default_acl": None,  # private objects: files are served only through the app's own views
            "querystring_auth": True,
            "file_overwrite": False,
            "client_config": s3_client_config(),
            **options,
        },
    }


# Every media name the app writes carries a uuid (cells, batch images and their thumbnails, evaluation figures,
# adaptation uploads, health probes), so a media file is written under the name given, with no search for a free one:
# in a folder, no existence check per file (~8% of a batch submission's CPU) and no folder check or lock either
# (wbcsite/media_storage.py); on S3, one PutObject and no HEAD first.
LOCAL_MEDIA = {"BACKEND": "wbcsite.media_storage.MediaFolderStorage", "OPTIONS": {"allow_overwrite": True}}


def _folder_storage(setting: str) -> dict:
    return {"BACKEND": "classifier.model_files.SettingFolderStorage", "OPTIONS": {"setting": setting}}


def storages_config() -> dict:
    """STORAGES from the environment (also used by tests to point a process at S3 the way a host would be)."""
    static = {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if env_bool("STATIC_MANIFEST", PRODUCTION)
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    }
    if not env_str("AWS_STORAGE_BUCKET_NAME"):
        return {
            "default": LOCAL_MEDIA,
            "models": _folder_storage("WBC_CUSTOM_MODELS_DIR"),
            "onnx": _folder_storage("WBC_ONNX_DIR"),
            "staticfiles": static,
        }
    prefix = env_str("WBC_S3_MODELS_PREFIX", "models")
    prefix = prefix.strip("/") or "models"
    spill = {"max_memory_size": 16 * 1024 * 1024}  # a model file read from S3 spills to disk, not all in memory
    media = {"file_overwrite": True, "use_threads": False}  # and no transfer thread pool per upload
    return {
        "default": _s3_storage("", **media),
        "models": _s3_storage(f"{prefix}/uploads", **spill),
        "onnx": _s3_storage(f"{prefix}/onnx", **spill),
        "staticfiles": static,
    }


STORAGES = storages_config()

# Uploads: Django keeps small files in memory; classification enforces its own per-image limits.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 5 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = env_int("FILE_UPLOAD_MAX_MEMORY_SIZE", 5 * 1024 * 1024)
WBC_MAX_IMAGE_BYTES = env_int("WBC_MAX_IMAGE_BYTES", 20 * 1024 * 1024)
WBC_MAX_IMAGE_PIXELS = env_int("WBC_MAX_IMAGE_PIXELS", 40_000_000)
WBC_MODELS_DIR = Path(env_str("WBC_MODELS_DIR", str(BASE_DIR / "models")))
WBC_CUSTOM_MODELS_DIR = Path(env_str("WBC_CUSTOM_MODELS_DIR", str(BASE_DIR / "var" / "custom-models")))
WBC_MAX_MODEL_BYTES = env_int("WBC_MAX_MODEL_BYTES", 200 * 1024 * 1024)
WBC_ONNX_DIR = Path(env_str("WBC_ONNX_DIR", str(BASE_DIR / "var" / "onnx")))
WBC_BATCH_MAX_FILES = env_int("WBC_BATCH_MAX_FILES", 1000)
WBC_BATCH_MAX_BYTES = env_int("WBC_BATCH_MAX_BYTES", 1024 * 1024 * 1024)
WBC_BATCH_MAX_URLS = env_int("WBC_BATCH_MAX_URLS", 50)
# Host names (not addresses) that may resolve to private addresses, e.g. the lab's own image server.
WBC_URL_ALLOWED_PRIVATE_HOSTS = frozenset(env_list("WBC_URL_ALLOWED_PRIVATE_HOSTS", []))
WBC_ZIP_MAX_RATIO = env_int("WBC_ZIP_MAX_RATIO", 100)
WBC_LEASE_SECONDS = env_int("WBC_LEASE_SECONDS", 120)
# Where background workers listen for "a chunk is queued" on SQLite (Unix datagram sockets; polling is the fallback).
# On PostgreSQL the wake-ups are LISTEN/NOTIFY instead, across hosts.
WBC_WORKER_WAKEUP_DIR = Path(env_str("WBC_WORKER_WAKEUP_DIR", str(BASE_DIR / "var" / "wakeup")))
WBC_WORKER_IDLE_SECONDS = env_int("WBC_WORKER_IDLE_SECONDS", 2)  # a look at the queue without a wake-up
# Image URLs: one download must finish within WBC_URL_FETCH_SECONDS; a user runs at most WBC_URL_FETCHES_PER_USER
# single-image downloads at once (per web process). A batch's URLs are fetched by the worker within a total budget.
WBC_URL_FETCH_SECONDS = env_int("WBC_URL_FETCH_SECONDS", 15)
WBC_URL_FETCHES_PER_USER = env_int("WBC_URL_FETCHES_PER_USER", 2)
WBC_BATCH_URL_BUDGET_SECONDS = env_int("WBC_BATCH_URL_BUDGET_SECONDS", 120)
WBC_BATCH_MAX_ATTEMPTS = env_int("WBC_BATCH_MAX_ATTEMPTS", 3)  # a chunk whose task keeps failing fails its batch
# A chunk whose task failed is tried again after this many seconds, doubled at each further attempt (5, 10, ...):
# a short outage (S3 down for a few seconds) is ridden out instead of using up the attempts at once.
WBC_BATCH_RETRY_SECONDS = env_int("WBC_BATCH_RETRY_SECONDS", 5)
# A batch is split into chunks of about WBC_CHUNK_SIZE images; each chunk is one task, so several workers share it.
WBC_CHUNK_SIZE = max(1, env_int("WBC_CHUNK_SIZE", 128))
# ONNX Runtime threads per inference session in the worker (0: ONNX Runtime's default, one per core).
WBC_ONNX_THREADS = max(0, env_int("WBC_ONNX_THREADS", 0))
# The niceness the worker gives itself at start (0-19; 0 leaves it as started): on a host shared with web processes,
# the requests people wait for get the CPU first and batches use what is left.
WBC_WORKER_NICE = min(19, max(0, env_int("WBC_WORKER_NICE", 10)))
# How long (microseconds) a thread busy in Python may keep the GIL while another waits for it, in web processes and
# the worker (wbcsite.thread_switching). CPython's 5,000 makes every short blocking call (a file write, a database
# round trip) wait up to 5 ms for the GIL to come back; 500 took a quarter off the submit time under load.
WBC_GIL_SWITCH_US = max(100, env_int("WBC_GIL_SWITCH_US", 500))
# The worker writes a heartbeat every WBC_WORKER_HEARTBEAT_SECONDS; older than WBC_WORKER_STALE_SECONDS means "no
# worker is running". It looks for batches left by a dead worker every WBC_WORKER_RECOVERY_SECONDS.
WBC_WORKER_HEARTBEAT_SECONDS = env_int("WBC_WORKER_HEARTBEAT_SECONDS", 5)
WBC_WORKER_STALE_SECONDS = env_int("WBC_WORKER_STALE_SECONDS", 30)
WBC_WORKER_RECOVERY_SECONDS = env_int("WBC_WORKER_RECOVERY_SECONDS", 15)
# Adapting a model to a lab's cells (the adaptation app): the share of each class held back to compare the base and
# adapted models, caps per class, an optional folder of non-WBC images for the detectors, when a running job whose
# worker stored nothing for that long may be cancelled outright, and AdaptConfig overrides (tests make it small).
WBC_ADAPT_HELD_BACK_PERCENT = env_int("WBC_ADAPT_HELD_BACK_PERCENT", 25)
WBC_ADAPT_MAX_TRAIN_PER_CLASS = env_int("WBC_ADAPT_MAX_TRAIN_PER_CLASS", 50)
WBC_ADAPT_MAX_HELD_BACK_PER_CLASS = env_int("WBC_ADAPT_MAX_HELD_BACK_PER_CLASS", 100)
WBC_ADAPT_NON_WBC_DIR = env_str("WBC_ADAPT_NON_WBC_DIR", "")
WBC_ADAPT_STALE_SECONDS = env_int("WBC_ADAPT_STALE_SECONDS", 600)
WBC_ADAPT_CONFIG: dict = {}
# A few extra fields beside the files; the batch view reports "too many files" itself.
DATA_UPLOAD_MAX_NUMBER_FILES = WBC_BATCH_MAX_FILES
DATA_UPLOAD_MAX_NUMBER_FIELDS = env_int("DATA_UPLOAD_MAX_NUMBER_FIELDS", 2000)

# Background work goes through django.tasks; the database backend and its worker are the default.
# "adaptation": the adaptation jobs, run beside the batch chunks (adaptation.tasks)
TASKS = {
    "default": {
        "BACKEND": env_str("TASKS_BACKEND", "django_tasks_db.DatabaseBackend"),
        "QUEUES": ["default", "adaptation"],
    }
}

# HTTPS: the run command serves TLS itself; behind a proxy set SECURE_PROXY_SSL_HEADER via env.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", PRODUCTION)
# Probes and the Prometheus scraper may talk plain HTTP to gunicorn behind a TLS proxy (docs/deploy.md).
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", PRODUCTION)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", PRODUCTION)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", PRODUCTION)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", PRODUCTION)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (Django's own middleware): scripts, styles and everything else only from this site, no
# inline script or event handler anywhere. Two allowances: style attributes (the server-computed widths of the
# probability and progress bars; an attribute cannot run script) and data:/blob: images (the classify page's
# preview of the chosen file; the API docs' icons). Redoc alone gets inline <style> elements (wbcsite.api_urls).
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "style-src-attr": [CSP.UNSAFE_INLINE],
    "img-src": [CSP.SELF, "data:", "blob:"],
    "font-src": [CSP.SELF],
    "connect-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}
WBC_REDOC_CSP = {**SECURE_CSP, "style-src": [CSP.SELF, CSP.UNSAFE_INLINE], "worker-src": [CSP.SELF, "blob:"]}
# /metrics (wbcsite.metrics) answers a request with "Authorization: Bearer <WBC_METRICS_TOKEN>" (when set) or one
# straight from these addresses or networks (no proxy headers); anyone else gets a 404.
WBC_METRICS_TOKEN = env_str("WBC_METRICS_TOKEN")
WBC_METRICS_ALLOWED_NETWORKS = env_networks("WBC_METRICS_ALLOWED_ADDRESSES", ["127.0.0.1", "::1"])
if env_bool("USE_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
if PRODUCTION and DEBUG:
    raise ImproperlyConfigured("DEBUG must be off when WBC_ENV=production")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"axes": {"level": "WARNING"}},
}

# --- REST API for the laboratory information system (LIS): /api/v1/ ------------------------------------------------
# Per-user API tokens (Authorization: Token <key>, or Bearer) and the browser session; every endpoint needs one.
# Rates are per token (per user for sessions): "<n>/<second|minute|hour|day>". Classify/submit/labels also count
# against the lower submit rate. Rate counters (API throttles, log-in attempts per address) are atomic counters in
# their own cache, shared by every worker and machine: the database (table "wbc_rate_counters", made by
# "manage.py createcachetable") by default, Redis when REDIS_URL is set (redis://host:6379/0).
WBC_API_RATE = env_str("WBC_API_RATE", "120/min")
WBC_API_SUBMIT_RATE = env_str("WBC_API_SUBMIT_RATE", "20/min")
WBC_API_PAGE_SIZE = env_int("WBC_API_PAGE_SIZE", 25)
WBC_API_MAX_TOKENS_PER_USER = env_int("WBC_API_MAX_TOKENS_PER_USER", 20)
REDIS_URL = env_str("REDIS_URL")


def caches_config() -> dict:
    """CACHES from the environment. With REDIS_URL, both caches are Redis (Django's own RedisCache), shared by every
    web and worker host; WBC_REDIS_KEY_PREFIX keeps several installations apart on one Redis. Without it, the default
    cache is per process and the rate counters live in the database table "wbc_rate_counters"."""
    redis_url = env_str("REDIS_URL")
    rate = {"KEY_PREFIX": "wbc-rate", "TIMEOUT": 86400 + 60}
    if not redis_url:
        return {
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            "api_throttle": {
                "BACKEND": "accounts.counter_cache.AtomicDatabaseCache",
                "LOCATION": "wbc_rate_counters",
                "OPTIONS": {"MAX_ENTRIES": 1_000_000},  # culling would reset live counters: keep it far away
                **rate,
            },
        }
    prefix = env_str("WBC_REDIS_KEY_PREFIX", "wbc")
    redis = {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url}
    return {
        "default": {**redis, "KEY_PREFIX": prefix},
        "api_throttle": {**redis, **rate, "KEY_PREFIX": f"{prefix}-rate"},
    }


CACHES = caches_config()

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ApiTokenAuthentication",  # first: a missing token is a 401 with WWW-Authenticate
        "rest_framework.authentication.SessionAuthentication",  # the browser (Swagger UI); CSRF enforced
    ],
    "DEFAULT_PERMISSION_CLASSES": ["accounts.authentication.IsLabMember"],
    "DEFAULT_THROTTLE_CLASSES": ["accounts.authentication.ApiRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "wbcsite.api_errors.PagePagination",
    "PAGE_SIZE": WBC_API_PAGE_SIZE,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "wbcsite.api_errors.api_exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "WBC Classifier API",
    "DESCRIPTION": (
        "The REST API the laboratory information system (LIS) uses to classify white-blood-cell images, submit "
        "batches (slides), read their differential and attach true labels. Authenticate with "
        "`Authorization: Token <key>` (a key from /account/tokens/). Every object belongs to your laboratory. "
        'Errors are `{"error": {"code", "message", "details"}}`.'
    ),
    "VERSION": "1.0.0",
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",  # no internet at run time: the UI's assets are served from our static files
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "persistAuthorization": False},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "wbcsite.api_errors.document_error_responses",
    ],
    "ENUM_NAME_OVERRIDES": {
        "BatchStatusEnum": "reports.models.Batch.Status",
        "ItemStatusEnum": "reports.models.BatchItem.Status",
    },
}
