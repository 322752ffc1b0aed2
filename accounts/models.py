"""Laboratories, their users, and the users' API tokens."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from wbc_ml.review_flag import DEFAULT_THRESHOLD, THRESHOLD_MAX, THRESHOLD_MIN


def threshold_validators() -> list:
    return [MinValueValidator(THRESHOLD_MIN), MaxValueValidator(THRESHOLD_MAX)]


class Laboratory(models.Model):
    lab_path = "id"  # accounts.scoping: a laboratory is in its own scope
    name = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    default_model = models.ForeignKey(
        "classifier.ClassifierModel",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="used by the API and by batches sent without a model (chosen by a Model admin on the models page)",
    )

    class Meta:
        verbose_name_plural = "laboratories"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class User(AbstractUser):
    """A platform user; every user works in exactly one laboratory."""

    laboratory = models.ForeignKey(Laboratory, on_delete=models.PROTECT, related_name="members", null=True)
    review_threshold = models.FloatField(default=DEFAULT_THRESHOLD, validators=threshold_validators())
    default_model = models.ForeignKey(
        "classifier.ClassifierModel",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="preselected on the classify and batch pages (the last model used)",
    )


DEFAULT_REFERENCE_RANGES = {  # adult differential, percent of WBC: (low, high)
    "neutrophil": [40.0, 60.0],
    "lymphocyte": [20.0, 40.0],
    "monocyte": [2.0, 8.0],
    "eosinophil": [1.0, 4.0],
    "basophil": [0.5, 1.0],
}
DEFAULT_CELL_CATEGORIES = [  # (key, label, hotkey): the non-WBC categories a technologist can assign
    ("immature_granulocyte", "Immature granulocyte", "6"),
    ("erythroblast", "Erythroblast (NRBC)", "7"),
    ("platelet", "Platelet / platelet clump", "8"),
    ("smudge", "Smudge cell", "9"),
    ("artefact", "Artefact", "0"),
    ("other", "Other / unidentifiable", "-"),
]


def default_reference_ranges() -> dict:
    return {name: list(bounds) for name, bounds in DEFAULT_REFERENCE_RANGES.items()}


class LabSettings(models.Model):
    """How a laboratory reviews and signs slides (one row per laboratory, made with its defaults on first use)."""

    class CountTarget(models.IntegerChoices):
        WBC_100 = 100, "100 WBC"
        WBC_200 = 200, "200 WBC"

    laboratory = models.OneToOneField(Laboratory, on_delete=models.CASCADE, related_name="settings")
    count_target = models.PositiveSmallIntegerField(choices=CountTarget.choices, default=CountTarget.WBC_100)
    require_all_verified = models.BooleanField(
        default=False, help_text="sign-off also waits until every cell has a technologist's class"
    )
    two_person_signoff = models.BooleanField(default=False, help_text="a Supervisor countersigns every slide")
    out_of_scope_limit = models.FloatField(
        default=0.30,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="share of flagged cells above which a slide opens with the out-of-scope warning",
    )
    reference_ranges = models.JSONField(
        default=default_reference_ranges, help_text="percent of WBC per class: [low, high]"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "laboratory settings"
        verbose_name_plural = "laboratory settings"

    def __str__(self) -> str:
        return f"Settings of {self.laboratory}"

    @classmethod
    def for_lab(cls, laboratory_id: int) -> LabSettings:
        settings_row, _ = cls.objects.get_or_create(laboratory_id=laboratory_id)
        return settings_row


class CellCategory(models.Model):
    """A non-WBC category a technologist can put a cell in (left out of the WBC differential, counted per 100 WBC)."""

    laboratory = models.ForeignKey(Laboratory, on_delete=models.CASCADE, related_name="cell_categories")
    key = models.SlugField(max_length=40)
    label = models.CharField(max_length=80)
    hotkey = models.CharField(max_length=1, blank=True)
    is_active = models.BooleanField(default=True)
    position = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["position", "id"]
        verbose_name_plural = "cell categories"
        constraints = [models.UniqueConstraint(fields=["laboratory", "key"], name="unique_cell_category_per_lab")]

    def __str__(self) -> str:
        return self.label

    @classmethod
    def for_lab(cls, laboratory_id: int) -> list[CellCategory]:
        """The lab's active categories; the defaults are created the first time a lab asks."""
        if not cls.objects.filter(laboratory_id=laboratory_id).exists():
            cls.objects.bulk_create(
                [
                    cls(laboratory_id=laboratory_id, key=key, label=label, hotkey=hotkey, position=position)
                    for position, (key, label, hotkey) in enumerate(DEFAULT_CELL_CATEGORIES)
                ],
                ignore_conflicts=True,
            )
        return list(cls.objects.filter(laboratory_id=laboratory_id, is_active=True))


class TooManyTokens(ValueError):
    """A user already holds the most active tokens allowed (WBC_API_MAX_TOKENS_PER_USER)."""


class ApiToken(models.Model):
    """A personal API key for the LIS. The key is shown once, at creation, and never stored.

    A key reads ``wbc_<prefix>_<secret>``. The database keeps the short, non-secret ``prefix`` (to find the row)
    and an HMAC-SHA256 of the whole key under ``SECRET_KEY`` (``digest``), compared in constant time. A revoked
    token stays listed (with when it was revoked) but no longer authenticates.
    """

    lab_path = "user__laboratory"  # accounts.scoping
    KEY_PREFIX = "wbc"
    PREFIX_BYTES = 6  # 12 hex characters: enough to find the row, nothing an attacker can use
    SECRET_BYTES = 32
    HMAC_SALT = "classifier.ApiToken.digest"
    LAST_USED_RESOLUTION_S = 60  # last_used_at is written at most once a minute per token

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="what the token is for, e.g. “LIS production”")
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False, help_text="HMAC-SHA256 of the key; never the key")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.KEY_PREFIX}_{self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    @property
    def shown_prefix(self) -> str:
        return f"{self.KEY_PREFIX}_{self.prefix}_…"

    @classmethod
    def compute_digest(cls, key: str, secret_key: str | None = None) -> str:
        from django.utils.crypto import salted_hmac

        return salted_hmac(cls.HMAC_SALT, key, secret=secret_key or settings.SECRET_KEY, algorithm="sha256").hexdigest()

    def assign_new_key(self) -> str:
        """Give this (unsaved) token a fresh key; returns the key, which is not kept anywhere."""
        import secrets

        self.prefix = secrets.token_hex(self.PREFIX_BYTES)
        key = f"{self.KEY_PREFIX}_{self.prefix}_{secrets.token_urlsafe(self.SECRET_BYTES)}"
        self.digest = self.compute_digest(key)
        return key

    @classmethod
    def issue(cls, user, name: str) -> tuple[ApiToken, str]:
        """Create and store a token for ``user``; returns it with its key (show the key once, then forget it)."""
        from django.db import IntegrityError, transaction

        for _attempt in range(3):  # a prefix collision (48 random bits) is practically impossible; retry anyway
            token = cls(user=user, name=name.strip()[:100] or "API token")
            key = token.assign_new_key()
            try:
                with transaction.atomic():
                    token.save()
            except IntegrityError:
                continue
            return token, key
        raise RuntimeError("could not allocate a unique token prefix")

    @classmethod
    def issue_within_limit(cls, user, name: str) -> tuple[ApiToken, str]:
        """``issue``, unless the user already has WBC_API_MAX_TOKENS_PER_USER active tokens (TooManyTokens)."""
        active = cls.objects.filter(user=user, revoked_at__isnull=True).count()
        if active >= settings.WBC_API_MAX_TOKENS_PER_USER:
            raise TooManyTokens(f"You already have {active} active tokens; revoke one you no longer use first.")
        return cls.issue(user, name)

    @classmethod
    def find(cls, key: str) -> ApiToken | None:
        """The active token whose key this is, or None. Constant-time digest comparison."""
        from django.utils.crypto import constant_time_compare

        parts = key.split("_", 2)
        valid_shape = len(parts) == 3 and parts[0] == cls.KEY_PREFIX and len(parts[1]) == 2 * cls.PREFIX_BYTES
        token = None
        if valid_shape:
            try:  # the prefix is unique: get(), not first(), which also sorts and limits (a third of the lookup)
                token = cls.objects.select_related("user", "user__laboratory").get(prefix=parts[1])
            except cls.DoesNotExist:
                pass
        secret_keys = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
        matched = None
        for index, secret_key in enumerate(secret_keys):
            # Always compute at least one HMAC, so an unknown prefix takes as long as a wrong secret.
            if constant_time_compare(cls.compute_digest(key, secret_key), token.digest if token else "-"):
                matched = index
                break
            if token is None:
                break
        if token is None or matched is None or not token.is_active:
            return None
        if matched:  # made under a rotated SECRET_KEY: re-key the digest with the current one
            token.digest = cls.compute_digest(key)
            cls.objects.filter(pk=token.pk).update(digest=token.digest)
        return token

    def touch(self) -> None:
        """Record use (at most once a minute, so a busy LIS does not turn every request into a write)."""
        from datetime import timedelta

        from django.utils import timezone

        now = timezone.now()
        if self.last_used_at is None or now - self.last_used_at > timedelta(seconds=self.LAST_USED_RESOLUTION_S):
            type(self).objects.filter(pk=self.pk).update(last_used_at=now)
            self.last_used_at = now

    def revoke(self, by=None) -> None:
        """Revoke the token; saved (not a queryset update) so the audit trail records who did it (``by``, else the
        owner)."""
        from django.utils import timezone

        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self._history_user = by or self.user
            self._change_reason = "token revoked"
            self.save(update_fields=["revoked_at"])
