"""Background tasks (django.tasks; the database backend and its worker by default)."""

from django.tasks import TaskContext, task

from .worker import process_batch_now, process_chunk_now


@task(takes_context=True)
def process_chunk(context: TaskContext, chunk_id: int) -> str:
    """One chunk of a batch; the chunk records which worker took it (the worker's heartbeat id)."""
    worker_ids = context.task_result.worker_ids
    return process_chunk_now(chunk_id, worker_id=worker_ids[-1] if worker_ids else "")


@task
def process_batch(batch_id: int) -> str:
    """A whole batch, chunk after chunk: only for tasks queued before batches were split into chunk tasks."""
    return process_batch_now(batch_id)
