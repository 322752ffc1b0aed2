"""The adaptation job's background task (django.tasks; run by ``manage.py run_worker`` like a batch)."""

from django.tasks import task

from .runner import run_job


@task
def run_adaptation(job_id: int) -> str:
    return run_job(job_id)
