"""Stops a helper process when the process that started it dies, even by SIGKILL.

    python -m zimage_batch.reaper PARENT_PID CHILD_PID

The embedded Prefect server is a child process of ``zimage-batch run``; a run killed with
``kill -9`` (or by the OOM killer) cannot stop it, and it would live on, holding a port and memory.
This watcher, started beside it, notices the parent is gone (it is re-parented) and terminates the
child: SIGTERM, then SIGKILL after five seconds. It exits by itself once the child is gone.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_SECONDS = 0.5
GRACE_SECONDS = 5.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (pid reused): not ours to judge
        return True
    return True


def watch(parent: int, child: int) -> None:
    while alive(child):
        if os.getppid() != parent:  # re-parented: the process that started us (and the child) died
            stop(child)
            return
        time.sleep(POLL_SECONDS)


def stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
