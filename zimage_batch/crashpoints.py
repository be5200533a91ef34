"""Crash points for the crash-safety tests: kill the process (SIGKILL, like ``kill -9``) at a named
point of a run, so a test can crash it exactly between two steps.

``ZIMAGE_BATCH_CRASH_AT=<point>:<n>`` kills the process the n-th time it reaches ``<point>``
(read once, at import). Unset (always, outside those tests) every call is a no-op. Points:
``planned`` (the pending jobs are spooled, no image made yet), ``store.before_rename`` (a file's
bytes are in its temp file, not yet under its name), ``store.after_rename`` (a file is delivered,
its manifest record not yet written), ``manifest.compacted`` (manifest.jsonl written, the parts
not yet deleted), ``deliver.sidecars`` (a job's images and sidecars are at the destination, its
record not yet journaled there).
"""

from __future__ import annotations

import os
import signal
import threading

_POINT, _, _AT = os.environ.get("ZIMAGE_BATCH_CRASH_AT", "").partition(":")
_hits = 0
_lock = threading.Lock()


def reached(point: str) -> None:
    """Die here if this is the crash point's n-th hit."""
    global _hits
    if point != _POINT:
        return
    with _lock:
        _hits += 1
        if _hits == int(_AT or 1):
            os.kill(os.getpid(), signal.SIGKILL)
