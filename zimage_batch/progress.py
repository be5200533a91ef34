"""Progress events from the run to whoever listens (the CLI's progress bar).

Kept apart from Prefect's logging so a user sees one clean bar, not server log lines.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_listeners: list[Callable[[str, Any], None]] = []


def emit(event: str, value: Any = None) -> None:
    """Tell every listener: ``("planned", RunPlan)``, ``("loading", "MODEL on DEVICE")``, ``("loaded", seconds)``,
    ``("compiling", "BATCH x WIDTHxHEIGHT")``, ``("compiled", seconds)``, ``("record", ManifestRecord)``,
    ``("delivered", ManifestRecord)``."""
    for listener in list(_listeners):
        listener(event, value)


@contextmanager
def listening(callback: Callable[[str, Any], None]) -> Iterator[None]:
    """Receive events while the block runs."""
    _listeners.append(callback)
    try:
        yield
    finally:
        _listeners.remove(callback)


class ProgressBar:
    """A rich progress bar fed by run events: images done, rate and ETA."""

    def __init__(self, enabled: bool = True, device: str = ""):
        self.enabled = enabled
        self.device = device
        self._progress = None
        self._task = None
        self._counts = {"ok": 0, "rejected": 0, "failed": 0}
        self._deliveries = {"delivered": 0, "conflict": 0, "failed": 0}
        self._loading = ""  # the model being loaded, as "MODEL on DEVICE"
        self._compiling = ""  # the size the model is being compiled for

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]images[/bold]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def on_event(self, event: str, value: Any) -> None:
        if self._progress is None:
            return
        if event == "planned":
            skipped = f", {value.skipped} already done" if value.skipped else ""
            skipped += f", {value.to_deliver} to upload" if value.to_deliver else ""
            self._task = self._progress.add_task("images", total=value.pending, rate="", status=f"on {self.device}{skipped}")
        elif event == "shard" and self._task is not None and value.process != os.getpid():
            # the shard ran on a Dask worker, whose per-image events do not reach this process
            for status, count in (("ok", value.generated), ("rejected", value.rejected), ("failed", value.failed)):
                self._counts[status] += count
            self._advance(value.images)
        elif event == "record" and self._task is not None:
            self._counts[value.status] += 1
            self._advance(1)
        elif event == "loading":
            self._loading = value
            if self._task is not None:
                self._progress.update(self._task, status=f"loading {value} ...")
        elif event == "loaded":
            self._progress.console.print(f"Loaded {self._loading} in {value:.1f} s.")
            if self._task is not None:
                self._progress.update(self._task, status=self._status())
        elif event == "compiling":
            self._compiling = value
            if self._task is not None:
                self._progress.update(self._task, status=f"compiling the model for batches of {value} (a new shape; "
                                                        f"~50 s on a fresh machine, less from Inductor's cache) ...")
        elif event == "compiled":
            self._progress.console.print(f"Compiled for batches of {self._compiling} and made them in {value:.1f} s "
                                         f"(--no-compile turns compiling off).")
            if self._task is not None:
                self._progress.update(self._task, status=self._status())
        elif event == "delivered" and self._task is not None:
            self._deliveries[value.delivery] += 1
            self._progress.update(self._task, status=self._status())

    def _advance(self, images: int) -> None:
        speed = self._progress.tasks[self._task].speed
        rate = f"{speed * 3600:,.0f} img/h" if speed else ""
        self._progress.update(self._task, advance=images, rate=rate, status=self._status())

    def _status(self) -> str:
        parts = [f"{n} {k}" for k, n in self._counts.items() if n and k != "ok"]
        parts += [f"{n} {'uploaded' if k == 'delivered' else 'upload ' + k}" for k, n in self._deliveries.items() if n]
        return ", ".join(parts)
