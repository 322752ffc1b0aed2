"""How soon a thread that waits for the GIL gets it from one that is busy in Python (``sys.setswitchinterval``).

A web process runs its request threads beside the threads that check and write a batch's images; the worker
decodes, classifies and writes on several threads. Most of those threads make short blocking calls (a file
write, a database round trip, a socket read), each of which gives the GIL away and must wait for it to come back.
With CPython's default interval, 5 ms, a thread parsing a multipart upload keeps it that long each time, so a
100-image submission's thousand such calls can wait seconds (a "convoy"). ``WBC_GIL_SWITCH_US`` (500 by default)
sets the interval in web processes (``wbcsite.wsgi``/``asgi``) and the long-running worker.
"""

from __future__ import annotations

import sys

from django.conf import settings


def apply_switch_interval() -> None:
    """Set this process's switch interval from ``WBC_GIL_SWITCH_US``."""
    sys.setswitchinterval(settings.WBC_GIL_SWITCH_US / 1_000_000)
