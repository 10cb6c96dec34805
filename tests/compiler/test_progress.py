"""Progress lines of long steps (`qcompile.progress.Progress`), as a non-interactive stream (a log file, CI) gets them."""
import io
import re
import threading
import time

import pytest

from qcompile.progress import Progress


def test_heartbeat_reports_a_long_stage_and_stops_with_it():
    out = io.StringIO()
    progress = Progress(2, out)
    with progress.stage("compile", "AOTInductor", heartbeat=0.05):
        time.sleep(0.4)
    with progress.stage("quantize", "fp8"):  # no heartbeat: its start and end lines only
        time.sleep(0.12)
    time.sleep(0.15)  # a beat written after the first stage ended would land here
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/2] compile AOTInductor ..."
    end = next(i for i, line in enumerate(lines) if line.startswith("    compile done in"))
    beats = lines[1:end]
    assert len(beats) >= 2 and all(re.fullmatch(r"    compile: \d+ s", line) for line in beats), lines
    assert lines[end + 1:] == ["[2/2] quantize fp8 ...", lines[-1]] and lines[-1].startswith("    quantize done in")


def test_heartbeat_thread_ends_when_the_stage_fails_and_is_never_started_without_a_stream():
    progress = Progress(1, io.StringIO())
    with pytest.raises(ValueError):
        with progress.stage("compile", heartbeat=0.05):
            raise ValueError("compile failed")
    quiet = Progress(1, None)
    with quiet.stage("compile", heartbeat=0.05):
        alive = [t.name for t in threading.enumerate() if t.name.startswith("qcompile-progress")]
    assert alive == []
