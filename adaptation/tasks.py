"""The adaptation job's background task (django.tasks), on a queue of its own.

``manage.py run_worker`` runs this queue in a thread beside the batch chunks, so a lab's batches go on while a
job trains for minutes.
"""

from django.tasks import task

from .runner import run_job

ADAPTATION_QUEUE = "adaptation"


@task(queue_name=ADAPTATION_QUEUE)
def run_adaptation(job_id: int) -> str:
    return run_job(job_id)
