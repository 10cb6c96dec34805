"""Progress on stderr for long steps: numbered stages with timings and in-stage counters."""
from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger(__name__)


STDERR = object()  # resolve sys.stderr when writing, so redirection after import is honoured


class Progress:
    """Reports stages ("[2/5] calibrate ...") and counters; silent when `stream` is None."""

    def __init__(self, total_stages: int, stream=STDERR):
        self.total = total_stages
        self._stream = stream
        self.index = 0
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, detail: str = "",
              heartbeat: float | None = None) -> Iterator[Callable[[int, int | None], None]]:
        """Time a stage; yields a `tick(done, total)` callback for in-stage progress. `heartbeat` (seconds): for a
        stage that cannot count its steps (one long library call), report the time spent every `heartbeat` s."""
        self.index += 1
        prefix = f"[{self.index}/{self.total}] {name}"
        self._write(f"{prefix}{' ' + detail if detail else ''} ...", end="\n")
        start = time.perf_counter()

        def tick(done: int, total: int | None = None) -> None:
            if self._interactive() or _is_milestone(done, total):
                self._write(f"\r    {done}/{total if total is not None else '?'}", end="")

        beating = self._heartbeat(name, start, heartbeat) if heartbeat and self.stream is not None else None
        try:
            yield tick
        except BaseException:
            if self._interactive():
                self._write("", end="\n")  # end a half-written counter line before the error
            raise
        finally:
            if beating is not None:
                beating()
        elapsed = time.perf_counter() - start
        self.times[name] = elapsed
        self._write(f"\r    {name} done in {elapsed:.1f} s", end="\n")
        logger.debug("stage %s took %.2f s", name, elapsed)

    def _heartbeat(self, name: str, start: float, interval: float) -> Callable[[], None]:
        """Start writing "<name>: N s" every `interval` s from a daemon thread; returns the function that stops it
        (and waits, so nothing is written after the stage's last line)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                self._write(f"\r    {name}: {time.perf_counter() - start:.0f} s", end="")

        thread = threading.Thread(target=beat, name=f"qcompile-progress-{name}", daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join()
        return halt

    @property
    def stream(self):
        return sys.stderr if self._stream is STDERR else self._stream

    def _interactive(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _write(self, text: str, end: str) -> None:
        stream = self.stream
        if stream is None:
            return
        if not self._interactive():
            text = text.replace("\r", "")
            end = end or "\n"
        stream.write(text + end)
        stream.flush()


def _is_milestone(done: int, total: int | None) -> bool:
    """Non-interactive streams get about ten counter lines per stage, not one per step."""
    if not total:
        return done % 100 == 0
    return done == total or done % max(1, total // 10) == 0
