"""Background tasks (django.tasks; the database backend and its worker by default)."""

from django.tasks import task

from .worker import process_batch_now


@task
def process_batch(batch_id: int) -> str:
    return process_batch_now(batch_id)
