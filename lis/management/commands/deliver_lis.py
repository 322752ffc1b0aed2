"""Deliver the LIS outbox: ``manage.py deliver_lis`` runs until stopped; ``--once`` sends what is due and exits."""

from __future__ import annotations

import signal
import threading

from django.core.management.base import BaseCommand

from lis.delivery import deliver_due, next_due_in


class Command(BaseCommand):
    help = "Send the LIS result messages that are due (HL7 over MLLP, FHIR REST), in order per destination."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="send what is due now, then exit")
        parser.add_argument("--idle", type=float, default=2.0, help="longest sleep between rounds, seconds")

    def handle(self, *args, once: bool = False, idle: float = 2.0, **options):
        if once:
            sent = deliver_due()
            self.stdout.write(f"{sent} delivery attempt{'s' if sent != 1 else ''}.")
            return
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write("LIS delivery ready.", ending="\n")
        self.stdout.flush()
        while not stop.is_set():
            deliver_due()
            wait = next_due_in()
            stop.wait(idle if wait is None else min(max(wait, 0.05), idle))
