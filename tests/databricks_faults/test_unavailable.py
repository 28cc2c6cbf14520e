"""The warehouse answers HTTP 503 (starting) to every request for 60 seconds.

Two uploaders meet it at once: one `--once` with the default databricks_retry_timeout (120 s,
longer than the outage: the connector's retries ride it out), one in loop mode with a 15 s retry
timeout (cycles fail and are retried with backoff, the process keeps running). Both must finish
with every row exactly once, and both must say in their log what is going on.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from .conftest import Job, Source, assert_exactly_once, connector_count, fired, new_schema, wait_until

OUTAGE_S = 60
CLEAR_LINE = re.compile(r"\b503\b|unavailable|warehouse is starting|is starting", re.IGNORECASE)


def test_warehouse_answering_503_for_60_seconds(emulator, tmp_path: Path):
    once_source = Source(tmp_path / "once" / "sensors.db", random.Random(91))
    loop_source = Source(tmp_path / "loop" / "sensors.db", random.Random(92))
    once_source.insert(30)
    loop_source.insert(30)
    once_job = Job(emulator, once_source.path, tmp_path / "once", new_schema("unavailonce"), ["--batch-size", "12"])
    loop_job = Job(emulator, loop_source.path, tmp_path / "loop", new_schema("unavailloop"),
                   ["--batch-size", "12", "--interval", "2", "--databricks-retry-timeout", "15"])

    emulator.set_faults({"kind": "unavailable", "seconds": OUTAGE_S})
    once = once_job.start("--once")
    loop = loop_job.start(label="loop")
    try:
        # The loop uploader gives up on a cycle while the warehouse is still starting, and goes on.
        failed = wait_until(lambda: loop.count(r"Cycle failed") >= 1, timeout=OUTAGE_S, while_alive=[loop])
        assert failed, f"no failed cycle logged during the outage\n{loop.describe()}"
        # The --once uploader waits the outage out and completes.
        assert once.popen.wait(timeout=OUTAGE_S + 240) == 0, once.describe()
        assert fired(emulator, "unavailable") > 0
        # After the outage the loop uploader, still running, loads everything.
        landed = wait_until(lambda: connector_count(emulator, loop_job.schema) == loop_source.count(),
                            timeout=180, interval=2.0, while_alive=[loop])
        assert landed, loop.describe()
        assert loop.returncode is None, loop.describe()
        assert loop.terminate() == 0, loop.describe()
    finally:
        once.stop_hard()
        loop.stop_hard()
    assert_exactly_once(emulator, once_job.schema, once_source.expected(), context=" (--once, default retry timeout)")
    assert_exactly_once(emulator, loop_job.schema, loop_source.expected(), context=" (loop mode)")

    # The logs: a clear line that the warehouse is unavailable/starting, not a generic failure.
    problems = []
    failures = [line for line in loop.log().splitlines() if "Cycle failed" in line]
    if not any(CLEAR_LINE.search(line) for line in failures):
        problems.append("loop mode: no failed-cycle line says the warehouse is starting/unavailable (HTTP 503); "
                        f"they read: {failures[:2]}")
    if not any(CLEAR_LINE.search(line) for line in once.log().splitlines()):
        problems.append(f"--once with the default retry timeout: waited {OUTAGE_S} s for a starting warehouse "
                        "without a single log line saying so; its log:\n" + once.log())
    assert not problems, "\n".join(problems)
