"""The warehouse (the emulator process) is down for whole cycles, then comes back.

A loop-mode uploader (short interval, small databricks_retry_timeout) must log each failed cycle
and keep running, then catch up once the warehouse is back; a `--once` run while it is down must
exit 1 with a clear message and leave its state file as it was, and a later run must complete.
Every row exactly once at the end. The emulator restarts on the same port and data directory.
"""

from __future__ import annotations

import random
from pathlib import Path

from .conftest import Job, Source, assert_exactly_once, connector_count, new_schema, wait_until

RETRY = ["--databricks-retry-timeout", "4"]


def test_warehouse_down_for_whole_cycles_and_back(emulator, tmp_path: Path):
    loop_source = Source(tmp_path / "loop" / "sensors.db", random.Random(101))
    once_source = Source(tmp_path / "once" / "sensors.db", random.Random(102))
    loop_source.insert(14)
    once_source.insert(10)
    loop_job = Job(emulator, loop_source.path, tmp_path / "loop", new_schema("downloop"),
                   ["--batch-size", "20", "--interval", "3", *RETRY])
    once_job = Job(emulator, once_source.path, tmp_path / "once", new_schema("downonce"),
                   ["--batch-size", "20", *RETRY])

    loop = loop_job.start(label="loop")
    try:
        first = once_job.run("--once")
        assert first.returncode == 0, first.describe()
        assert wait_until(lambda: connector_count(emulator, loop_job.schema) == loop_source.count(), timeout=180,
                          interval=1.0, while_alive=[loop]), loop.describe()
        failed_before = loop.count(r"Cycle failed")

        emulator.stop()
        try:
            loop_source.insert(25, tie_with_last=True)
            once_source.insert(15, tie_with_last=True)
            state_before = once_job.state_file.read_bytes()
            down = once_job.run("--once", timeout=240)
            assert down.returncode == 1, down.describe()
            errors = [line for line in down.log().splitlines() if " ERROR " in line]
            assert errors and "Databricks" in errors[-1] and "127.0.0.1" in errors[-1], down.describe()
            assert "Traceback" not in down.log(), down.describe()
            assert once_job.state_file.read_bytes() == state_before, "the failed run changed the state file"
            # The loop uploader fails whole cycles, says so, and stays up.
            assert wait_until(lambda: loop.count(r"Cycle failed") >= failed_before + 2, timeout=120,
                              interval=0.5, while_alive=[loop]), loop.describe()
            assert loop.returncode is None, loop.describe()
        finally:
            emulator.start()

        # Back: the loop uploader catches up on its own, the next --once run completes.
        again = once_job.run("--once")
        assert again.returncode == 0, again.describe()
        assert wait_until(lambda: connector_count(emulator, loop_job.schema) == loop_source.count(), timeout=240,
                          interval=2.0, while_alive=[loop]), loop.describe()
        assert loop.terminate() == 0, loop.describe()
    finally:
        loop.stop_hard()
    failures = [line for line in loop.log().splitlines() if "Cycle failed" in line]
    assert all("retrying in" in line for line in failures), failures
    assert_exactly_once(emulator, loop_job.schema, loop_source.expected(), context=" (loop mode)")
    assert_exactly_once(emulator, once_job.schema, once_source.expected(), context=" (--once)")
