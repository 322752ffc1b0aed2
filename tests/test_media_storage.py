"""Media writes: the folder storage writes a file as Django's does, with fewer system calls; a set of files (a chunk's
images) is written in the calling thread to a folder and on the file pool to a remote storage."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, InMemoryStorage, default_storage
from django.core.files.uploadedfile import TemporaryUploadedFile

from reports.file_pool import write_each
from wbcsite.media_storage import MediaFolderStorage


def both(tmp_path, **options) -> tuple[MediaFolderStorage, FileSystemStorage]:
    ours = MediaFolderStorage(location=tmp_path / "ours", allow_overwrite=True, **options)
    django = FileSystemStorage(location=tmp_path / "django", allow_overwrite=True, **options)
    return ours, django


def test_media_is_stored_in_the_media_folder_storage(settings):
    assert isinstance(default_storage, MediaFolderStorage)


@pytest.mark.parametrize("name", ["cell.png", "batches/2026/12/02/a-1.jpg", "batches/./2026/b.jpg"])
def test_a_new_file_is_stored_as_django_stores_it_in_a_new_folder_and_in_an_existing_one(tmp_path, name):
    data = os.urandom(150_000)  # more than one 64-KB chunk
    names = []
    for storage in both(tmp_path):
        first = storage.save(name, ContentFile(data))  # its folder is new
        second = storage.save(os.path.join(os.path.dirname(name), "second.jpg"), ContentFile(b"2"))  # it exists now
        assert storage.open(first).read() == data
        assert storage.open(second).read() == b"2"
        names.append((first, second))
    assert names[0] == names[1]
    ours, django = both(tmp_path)
    assert sorted(p.relative_to(ours.location) for p in (tmp_path / "ours").rglob("*")) == sorted(
        p.relative_to(django.location) for p in (tmp_path / "django").rglob("*")
    )


def test_saving_under_an_existing_name_replaces_the_file(tmp_path):
    storage, _ = both(tmp_path)
    name = storage.save("x/cell.jpg", ContentFile(b"a longer first content"))
    assert storage.save(name, ContentFile(b"short")) == name
    assert storage.open(name).read() == b"short"


def test_the_file_permissions_setting_is_applied(tmp_path):
    storage, _ = both(tmp_path, file_permissions_mode=0o640)
    storage.save("x/first.jpg", ContentFile(b"1"))
    name = storage.save("x/second.jpg", ContentFile(b"2"))
    assert stat.S_IMODE(os.stat(storage.path(name)).st_mode) == 0o640


def test_an_upload_spooled_to_a_temporary_file_is_moved_into_place(tmp_path, settings):
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)
    storage, _ = both(tmp_path)
    storage.save("x/first.jpg", ContentFile(b"1"))
    upload = TemporaryUploadedFile("big.jpg", "image/jpeg", 5, None)
    upload.write(b"12345")
    upload.seek(0)
    spooled = upload.temporary_file_path()
    name = storage.save("x/big.jpg", upload)
    assert storage.open(name).read() == b"12345"
    assert not os.path.exists(spooled)


def test_files_for_a_folder_are_written_in_the_calling_thread_and_for_a_remote_storage_on_the_pool(tmp_path):
    def where(position: int, item: str) -> tuple[int, str, int]:
        return position, item, threading.get_ident()

    here = threading.get_ident()
    local = write_each(where, ["a", "b", "c"], MediaFolderStorage(location=tmp_path))
    assert local == [(0, "a", here), (1, "b", here), (2, "c", here)]
    remote = write_each(where, ["a", "b", "c"], InMemoryStorage())  # not a folder: as S3 is
    assert [(position, item) for position, item, _ in remote] == [(0, "a"), (1, "b"), (2, "c")]
    assert here not in {thread for *_, thread in remote}


@pytest.mark.parametrize("storage", ["folder", "remote"])
def test_the_first_error_is_raised_once_no_write_is_running(tmp_path, storage):
    running, ended = [], []

    def write(position: int, item: int) -> int:
        running.append(position)
        if position == 1:
            raise OSError("disk full")
        ended.append(position)
        return item

    target = MediaFolderStorage(location=tmp_path) if storage == "folder" else InMemoryStorage()
    with pytest.raises(OSError, match="disk full"):
        write_each(write, range(6), target)
    assert sorted(ended) == sorted(p for p in running if p != 1)  # whatever started has ended
