"""The soaks start when collection ends and are judged at the end of the run.

A soak is minutes of wall-clock time spent mostly waiting (a writer at 1,000 rows/s, an uploader
sleeping between cycles, faults that last seconds). Run one after the other at their place in the
suite they cost CI over four minutes of pure waiting; started in the background as soon as pytest
knows they were selected, they overlap the rest of the suite and each other. Their tests are moved
to the end of the run, where they wait for their soak and check its summary.

Each soak writes its output to files under pytest's basetemp (a pipe would fill and stall it), which
the canary audit scans at the end. If the run stops early, the soaks are stopped with SIGTERM; the
soak then stops its writer, uploader and emulator.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SOAK = ROOT / "bench" / "soak.py"
HERE = Path(__file__).resolve().parent


@dataclass
class RunningSoak:
    target: str
    seed: int
    minutes: float
    workdir: Path
    summary: Path
    stdout: Path
    stderr: Path
    process: subprocess.Popen
    started: float

    def wait(self) -> int:
        """The soak's exit code, once it ends (its own drain timeout bounds it; this is a backstop)."""
        deadline = self.started + self.minutes * 60 + 600
        try:
            return self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop(self)
            pytest.fail(f"the {self.target} soak did not end in {self.minutes} minutes + 10; stopped it")

    def tail(self, path: Path, chars: int = 5000) -> str:
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


SOAKS = pytest.StashKey[dict]()


def is_soak(item: pytest.Item) -> bool:
    return item.path.resolve().parent == HERE


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # The soak tests only wait for their background run: last, so the rest of the suite overlaps it.
    items.sort(key=is_soak)


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if config.option.collectonly:
        return
    targets = [item.callspec.params["target"] for item in session.items
               if is_soak(item) and hasattr(item, "callspec")]
    if targets:
        config.stash[SOAKS] = {target: start(config, target) for target in dict.fromkeys(targets)}


def start(config: pytest.Config, target: str) -> RunningSoak:
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1 << 30))
    minutes = float(os.environ.get("SOAK_MINUTES", "2"))
    directory = config._tmp_path_factory.mktemp(f"soak-{target}")  # type: ignore[attr-defined]
    summary = directory / "summary.json"
    stdout, stderr = directory / "soak.out", directory / "soak.err"
    command = [sys.executable, str(SOAK), "--target", target, "--minutes", str(minutes), "--seed", str(seed),
               "--workdir", str(directory / "work"), "--json", str(summary), "--verbose",
               # Shorter faults and gaps than the defaults: more of them fit in two minutes.
               "--fault-seconds", "3,12", "--gap", "1,6",
               "--recovery-timeout", "120", "--drain-timeout", "150"]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    return RunningSoak(target, seed, minutes, directory / "work", summary, stdout, stderr, process,
                       time.monotonic())


def stop(soak: RunningSoak) -> None:
    if soak.process.poll() is None:
        soak.process.send_signal(signal.SIGTERM)
        try:
            soak.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            soak.process.kill()
            soak.process.wait()


def pytest_sessionfinish(session: pytest.Session) -> None:
    for soak in session.config.stash.get(SOAKS, {}).values():
        stop(soak)


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> RunningSoak:
    """The background soak of this test's target."""
    target = request.node.callspec.params["target"]
    running = request.config.stash.get(SOAKS, {})
    if target not in running:  # selected after collection ended (cannot happen with plain pytest)
        running[target] = start(request.config, target)
        request.config.stash[SOAKS] = running
    return running[target]
