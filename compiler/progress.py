"""Progress on stderr for long steps: numbered stages with timings and in-stage counters."""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger(__name__)


class Progress:
    """Reports stages ("[2/5] calibrate ...") and counters; silent when `stream` is None."""

    def __init__(self, total_stages: int, stream=sys.stderr):
        self.total = total_stages
        self.stream = stream
        self.index = 0
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[Callable[[int, int | None], None]]:
        """Time a stage; yields a `tick(done, total)` callback for in-stage progress."""
        self.index += 1
        prefix = f"[{self.index}/{self.total}] {name}"
        self._write(f"{prefix}{' ' + detail if detail else ''} ...", end="\n")
        start = time.perf_counter()

        def tick(done: int, total: int | None = None) -> None:
            self._write(f"\r    {done}/{total if total is not None else '?'}", end="")

        try:
            yield tick
        finally:
            elapsed = time.perf_counter() - start
            self.times[name] = elapsed
            self._write(f"\r    {name} done in {elapsed:.1f} s", end="\n")
            logger.debug("stage %s took %.2f s", name, elapsed)

    def _write(self, text: str, end: str) -> None:
        if self.stream is not None:
            self.stream.write(text + end)
            self.stream.flush()
