"""Where the files of registered models live: two Django storages, and this host's checked cache of them.

Uploaded model files (and a detector file that comes with one) are in ``STORAGES["models"]``; every ONNX copy, of
bundled and uploaded models alike, is in ``STORAGES["onnx"]``. By default both are folders on this machine
(``WBC_CUSTOM_MODELS_DIR``, ``WBC_ONNX_DIR``); with the S3 settings they are prefixes of the bucket, so every web and
worker host sees the same files. Bundled models and their detectors stay files of the checkout (``WBC_MODELS_DIR``).

Serving needs a local file (ONNX Runtime, Keras and the sandboxed children open paths), so:

* a storage with local paths (a folder: ``Storage.path`` works) is used in place; the loader
  (:class:`wbc_ml.inference.LoadedModel`, the saliency child) checks the file's sha256 before every load;
* a remote storage (S3: ``Storage.path`` raises ``NotImplementedError``) is copied into this host's cache,
  ``WBC_MODEL_CACHE_DIR/<alias>/<name>``. A cached file is used only while its sha256 is the registered one; a
  missing or mismatching one is fetched again, and a fetched file that still mismatches is refused
  (:class:`ModelUnavailable`), never served and never kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage, storages

from wbc_ml.checksums import file_sha256
from wbc_ml.inference import ModelUnavailable

logger = logging.getLogger(__name__)

MODELS = "models"  # uploaded model files (and their detector files)
ONNX = "onnx"  # ONNX copies of every model
READ_CHUNK = 1024 * 1024

_verified: dict[Path, tuple[str, int, int, int]] = {}  # cached file -> (sha256, inode, size, mtime_ns) hashed here
_fetch_lock = threading.Lock()


class SettingFolderStorage(FileSystemStorage):
    """A folder storage rooted where a setting says, read at each use (``WBC_CUSTOM_MODELS_DIR``, ``WBC_ONNX_DIR``).

    The folder settings keep their meaning (and an override of them, in tests or a management command, takes
    effect at once), while the code only ever talks to the storage.
    """

    def __init__(self, setting: str, **kwargs):
        self.setting = setting
        super().__init__(**kwargs)

    @property
    def base_location(self) -> str:
        return str(getattr(settings, self.setting))

    @property
    def location(self) -> str:
        return os.path.abspath(self.base_location)


def model_storage(alias: str) -> Storage:
    return storages[alias]


def local_path(alias: str, name: str, sha256: str, what: str) -> Path:
    """A path on this host to the stored file ``name`` of storage ``alias`` (``what`` names it in messages).

    In place for a folder storage; else this host's cached copy, fetched when missing or not ``sha256``. A file the
    storage does not have gives a path that does not exist: the loader says it is missing (and a bundled model
    then serves with TensorFlow, as for a lost ONNX copy). Raises :class:`ModelUnavailable` when the stored file is
    not the registered one or the storage cannot be read.
    """
    storage = model_storage(alias)
    try:
        return Path(storage.path(name))
    except NotImplementedError:  # a remote storage: through this host's cache
        pass
    cached = _cache_path(alias, name)
    if not sha256:  # a row from before checksums: nothing to check a copy against, so none is fetched
        return cached
    with _fetch_lock:
        if _is_verified(cached, sha256):
            return cached
        _fetch(storage, name, cached, sha256, what)
    return cached


def store(alias: str, name: str, source: Path) -> str:
    """Save the local file ``source`` as ``name`` in storage ``alias``; the name the storage gave it."""
    with open(source, "rb") as handle:
        return model_storage(alias).save(name, File(handle, name=Path(name).name))


def delete_stored(alias: str, name: str) -> None:
    """Remove ``name`` from storage ``alias`` (nothing if it is not there); logged, never raised: it runs while
    another failure is being reported."""
    try:
        model_storage(alias).delete(name)
    except Exception as exc:
        logger.warning("could not delete %s from the %s storage: %s", name, alias, exc)


def _cache_path(alias: str, name: str) -> Path:
    root = (Path(settings.WBC_MODEL_CACHE_DIR) / alias).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):  # names are ours, but never let one escape the cache
        raise ModelUnavailable(f"The stored name {name!r} is not a valid model file name.")
    return path


def _is_verified(path: Path, sha256: str) -> bool:
    """Whether the cached file holds ``sha256``: hashed once per process, then trusted while it is the same file
    (inode, size, mtime). The loader checks the bytes it loads again in any case."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    signature = (sha256, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if _verified.get(path) == signature:
        return True
    if file_sha256(path) != sha256:
        logger.warning("cached model file %s does not match its registered sha256; fetching it again", path)
        return False
    _verified[path] = signature
    return True


def _fetch(storage: Storage, name: str, target: Path, sha256: str, what: str) -> None:
    """Download ``name`` into ``target`` (atomically, through a temporary file beside it) if it is ``sha256``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".fetching-", delete=False) as out:
        partial = Path(out.name)
        try:
            with storage.open(name, "rb") as source:
                while chunk := source.read(READ_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            partial.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            return
        except Exception as exc:
            partial.unlink(missing_ok=True)
            raise ModelUnavailable(
                f"The {what} {Path(name).name} could not be fetched from the model storage "
                f"({type(exc).__name__}: {exc}); try again in a moment."
            ) from exc
    actual = digest.hexdigest()
    if actual != sha256:
        partial.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        raise ModelUnavailable(
            f"The {what} {Path(name).name} does not match its registered checksum in the model storage "
            f"(expected {sha256[:12]}…, found {actual[:12]}…); it may be damaged or replaced, so it is not used."
        )
    os.replace(partial, target)
    stat = target.stat()
    _verified[target] = (sha256, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    logger.info("fetched %s %s into the model cache", what, name)
