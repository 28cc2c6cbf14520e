"""SIGKILL of the uploader at random points, again and again, on both load paths.

Two lanes run side by side, each with its own source and target table: the bulk path (PUT,
progress record, COPY INTO, REMOVE) and the INSERT path. Each lane starts `--once` runs and
SIGKILLs them at random moments -- during start-up and table set-up, or while batches are being
committed -- then lets a run finish; new rows (some tying with the last uploaded timestamp) arrive
between runs and the batch size changes from run to run. At the end every source row must be in
the target exactly once, read back through the connector and from the Parquet files.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .conftest import Job, Run, Source, assert_exactly_once, new_schema

MIN_KILLS = 20  # real kills of a still-running uploader, over the whole test
MIN_KILLS_PER_LANE = 6  # the faster lane makes up the rest
COMMITTED = r"^\S+ \S+ INFO Batch \d+ committed"
REPLAYED = r"recorded but not confirmed"


def kill_at_random_point(run: Run, rng: random.Random) -> str | None:
    """SIGKILL the run at a random moment; return where it was, or None if it ended first."""
    if rng.random() < 0.45:
        # Any moment: interpreter start, connection, table set-up, reading, any statement.
        delay = rng.uniform(0.3, 7.0)
        with contextlib.suppress(subprocess.TimeoutExpired):  # still running: the point we wanted
            run.popen.wait(timeout=delay)
    else:
        # Inside the stream of batches: after this run committed k batches, plus a random part of
        # the next batch's statements (PUT, progress record, COPY INTO / INSERT, REMOVE).
        wanted = rng.randint(1, 2)
        deadline = time.monotonic() + 120
        while run.returncode is None and run.count(COMMITTED) < wanted and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.2))
    if run.returncode is not None:
        return None
    committed_before = run.count(COMMITTED)
    run.popen.kill()
    if run.popen.wait(timeout=30) != -9:
        return None  # it exited on its own in the meantime
    return "after a commit" if committed_before else "before any commit"


def rows_behind(run: Run) -> int:
    """What the run's last cycle summary says is left in the source (0 when it says nothing)."""
    found = re.findall(r"(\d+) row\(s\) behind", run.log())
    return int(found[-1]) if found else 0


class KillCount:
    """Kills of all lanes together, so that the faster lane does more of them."""

    def __init__(self) -> None:
        self.total = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.total += 1

    def wanted(self, lane_kills: int) -> bool:
        with self.lock:
            return lane_kills < MIN_KILLS_PER_LANE or self.total < MIN_KILLS


def drive_lane(emulator, work: Path, name: str, extra: list[str], seed: int,
               kills: KillCount) -> tuple[Counter, Job, Source]:
    rng = random.Random(seed)
    source = Source(work / "sensors.db", rng)
    job = Job(emulator, source.path, work, new_schema(name), extra, node_id=f"{name}-node")
    tally: Counter = Counter()
    source.insert(rng.randint(90, 120))  # more than a run gets through before it is killed
    for _ in range(100):
        run = job.start("--once", "--batch-size", str(rng.choice([6, 9, 14])))
        tally["runs"] += 1
        if kills.wanted(tally["kills"]):
            where = kill_at_random_point(run, rng)
            if where is not None:
                kills.add()
                tally["kills"] += 1
                tally[f"kills {where}"] += 1
                if rng.random() < 0.35:  # new rows while the uploader is down
                    source.insert(rng.randint(3, 25), tie_with_last=rng.random() < 0.5)
                continue
        try:
            code = run.popen.wait(timeout=300)
        finally:
            run.stop_hard()
        assert code == 0, f"lane {name}, seed {seed}: a run that was not killed failed, {run.describe()}"
        tally["completed runs"] += 1
        behind = rows_behind(run)
        if behind:
            # A run after a kill may finish the interrupted window and stop there (see
            # test_once_after_a_kill_uploads_rows_written_meanwhile): run again.
            tally["completed runs with rows behind"] += 1
            continue
        if not kills.wanted(tally["kills"]):
            break
        # The backlog is drained: give the next runs something to be killed in.
        source.insert(rng.randint(25, 60), tie_with_last=rng.random() < 0.5)
    else:
        raise AssertionError(f"lane {name}: no run completed after {tally}")
    tally["replayed batches"] = sum(len(re.findall(REPLAYED, path.read_text()))
                                    for path in work.glob("run-*.log"))
    return tally, job, source


def test_sigkill_at_random_points_leaves_every_row_exactly_once(emulator, tmp_path: Path):
    seed = int(os.environ.get("FAULT_TESTS_SEED") or random.SystemRandom().randrange(1 << 30))
    lanes = [("killbulk", []), ("killins", ["--staging-volume", "none", "--lineage-columns", "batch_id"])]
    kills = KillCount()
    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        futures = [pool.submit(drive_lane, emulator, tmp_path / name, name, extra, seed + i, kills)
                   for i, (name, extra) in enumerate(lanes)]
        results = [future.result() for future in futures]
    total: Counter = Counter()
    for (name, _), (tally, job, source) in zip(lanes, results):
        print(f"\nlane {name} (seed {seed}): {dict(tally)}")
        total.update(tally)
        assert_exactly_once(emulator, job.schema, source.expected(), context=f" (lane {name}, seed {seed})")
    assert total["kills"] >= MIN_KILLS, total
    # The kills must land in the batch stream too, not only at start-up.
    assert total["kills after a commit"] >= 4, total
    # And some of them between a batch's progress record and its confirmation: replayed on restart.
    assert total["replayed batches"] >= 1, total


def test_once_after_a_kill_uploads_rows_written_meanwhile(emulator, tmp_path: Path):
    """`--once` drains the backlog (README): after a run was killed in the middle of its window, the
    next --once run must upload the rest of that window AND the rows written while it was down."""
    source = Source(tmp_path / "sensors.db", random.Random(44))
    job = Job(emulator, source.path, tmp_path, new_schema("onceafterkill"), ["--batch-size", "8"])
    source.insert(40)
    first = job.start("--once")
    deadline = time.monotonic() + 180
    while first.returncode is None and first.count(COMMITTED) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.returncode is None, f"the first run should still be busy with its 5 batches: {first.describe()}"
    first.popen.kill()
    first.popen.wait(timeout=30)
    source.insert(20, tie_with_last=True)
    second = job.run("--once")
    assert second.returncode == 0, second.describe()
    assert rows_behind(second) == 0, (
        f"--once exited 0 with {rows_behind(second)} row(s) of the source left behind: it finished the "
        f"interrupted window and stopped.\n{second.describe()}")
    assert_exactly_once(emulator, job.schema, source.expected())
