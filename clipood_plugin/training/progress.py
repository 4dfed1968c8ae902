"""Rich progress display for training: images/s, loss, lr and the skipped-sample count.

Only the primary rank draws; other ranks get a no-op object with the same methods, so the loop
reads the same on every rank.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["TrainProgress"]


class TrainProgress:
    """``with TrainProgress(total, enabled) as bar: bar.advance(images=…, loss=…, lr=…, skipped=…)``."""

    def __init__(self, total_steps: int, *, start_step: int = 0, enabled: bool = True, description: str = "train") -> None:
        self.enabled = enabled
        self._images = 0
        self._t0 = time.perf_counter()
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task(description, total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, *, images: int, loss: float, lr: float, skipped: int) -> float:
        """Advance one step; returns the running images/s."""
        self._images += images
        rate = self._images / max(time.perf_counter() - self._t0, 1e-9)
        if self._progress is not None:
            stats = f"{rate:,.0f} img/s  loss {loss:.4f}  lr {lr:.2e}  skipped {skipped}"
            self._progress.update(self._task, advance=1, stats=stats)
        return rate

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.log(message)
