"""One pool of threads per process for reading, checking and writing the images of batches.

It lives as long as the process instead of being made for every submission or chunk: a storage that keeps a client
per thread (django-storages' S3 makes a boto3 resource per thread, tens of milliseconds of CPU and tens of MB each)
then makes it once per pool thread and reuses it, and a web process holds at most ``FILE_THREADS`` of them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

FILE_THREADS = 4


@cache
def file_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=FILE_THREADS, thread_name_prefix="batch-files")
