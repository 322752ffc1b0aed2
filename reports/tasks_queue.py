"""What the task queue already holds, so the worker's recovery never queues a chunk twice."""

from __future__ import annotations

from django.tasks import task_backends

PROCESS_CHUNK_PATH = "reports.tasks.process_chunk"


def chunks_waiting_for_a_task() -> set[int]:
    """Ids of chunks with a ``process_chunk`` task that no worker has picked up yet.

    Only the database backend (django-tasks-db, the default) can be asked; with another backend the answer is
    empty, so recovery simply enqueues (a second task for a chunk finds it taken and does nothing).
    """
    from django_tasks_db.backend import DatabaseBackend
    from django_tasks_db.models import DBTaskResult

    if not isinstance(task_backends["default"], DatabaseBackend):
        return set()
    waiting = DBTaskResult.objects.ready().filter(task_path=PROCESS_CHUNK_PATH).values_list("args_kwargs", flat=True)
    return {args["args"][0] for args in waiting if args.get("args")}
