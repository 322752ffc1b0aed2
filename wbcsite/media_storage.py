"""The media folder (the single-host default): a new file costs one open, its writes and one close.

Every media name the app writes carries a uuid and the folder storage overwrites (``allow_overwrite``), so a file
can be written straight to its name. Django's own ``_save`` also looks for the folder with a stat or three, and
takes and releases an advisory lock that no other writer of a uuid name can contend. Each of those system calls
hands the GIL over, and under load a busy thread keeps it for the switch interval. A 100-cell batch is 200 files
(each image and its thumbnail, written by the worker); when submissions still wrote a file per image, Django's
``_save`` was about half of the web process's samples (py-spy) during 100-image submissions.

A file whose folder does not exist yet, an upload that Django spooled to a temporary file (it is moved, not
copied) and a storage that must not overwrite all go through Django's own ``_save``.
"""

from __future__ import annotations

import os

from django.core.files.storage import FileSystemStorage


class MediaFolderStorage(FileSystemStorage):
    def _save(self, name, content):
        if not self._allow_overwrite or hasattr(content, "temporary_file_path"):
            return super()._save(name, content)
        full_path = self.path(name)
        try:
            handle = open(full_path, "wb")  # closed below; a new folder goes through Django
        except FileNotFoundError:
            return super()._save(name, content)
        with handle:
            for chunk in content.chunks():
                handle.write(chunk)
        if self.file_permissions_mode is not None:
            os.chmod(full_path, self.file_permissions_mode)
        self._ensure_location_group_id(full_path)
        return os.path.relpath(full_path, self.location).replace("\\", "/")
