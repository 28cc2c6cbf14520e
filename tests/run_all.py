"""Run the whole test suite as pytest sessions side by side; exit with the worse status.

Most of the suite's time is waiting, not computing: the uploader's sleep loops, the soaks, SIGKILL
timing, container builds on one side, and a Spark-backed warehouse emulator answering one statement
at a time on the other. One session leaves half the machine idle. The Databricks folders (which
share one emulator) run in one session, the emulator's own tests and the landing path's tests (an
emulator per folder) in another, everything else in the first; each has its own base temporary directory,
so their files, canary audits and soak outputs never mix.

    python3 tests/run_all.py              # the README's test command runs this
    python3 tests/run_all.py -k fleet     # extra arguments go to every session

The other sessions' output is printed after the first's. The exit status is pytest's:
0 when all passed; otherwise a failing session's status; 5 (no tests collected) when a session
collected nothing, so a run that tests nothing never looks green.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folders that start a warehouse emulator, as sessions of their own (each shares one emulator
# within its session); everything else is the first session.
SESSIONS = (("tests/databricks", "tests/databricks_faults"), ("tests/emulator", "tests/landing"))
NO_TESTS_COLLECTED = 5


def combined_status(statuses: list[int]) -> int:
    failing = [s for s in statuses if s not in (0, NO_TESTS_COLLECTED)]
    if failing:
        return failing[0]
    return NO_TESTS_COLLECTED if NO_TESTS_COLLECTED in statuses else 0


def main(extra: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    with tempfile.TemporaryDirectory(prefix="suite-", ignore_cleanup_errors=True) as scratch:
        scratch_dir = Path(scratch)
        background: list[tuple[tuple[str, ...], subprocess.Popen, Path]] = []
        try:
            for index, folders in enumerate(SESSIONS, start=2):
                log = scratch_dir / f"session-{index}.log"
                with log.open("w") as out:
                    process = subprocess.Popen([*pytest, *folders, "--basetemp", str(scratch_dir / f"s{index}"),
                                                *extra], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
                background.append((folders, process, log))
            ignores = [f"--ignore={folder}" for folders in SESSIONS for folder in folders]
            local_status = subprocess.call([*pytest, *ignores, "--basetemp", str(scratch_dir / "local"), *extra],
                                           cwd=ROOT)
        finally:
            statuses = [process.wait() for _folders, process, _log in background]
        total = len(SESSIONS) + 1
        for index, (folders, _process, log) in enumerate(background, start=2):
            print(f"\n===== session {index} of {total}: {' '.join(folders)} =====", flush=True)
            sys.stdout.write(log.read_text(errors="replace"))
    summary = [f"session 1 (everything else): exit {local_status}"] + [
        f"session {i} ({' '.join(folders)}): exit {status}"
        for i, ((folders, _p, _l), status) in enumerate(zip(background, statuses), start=2)]
    print("\n" + "; ".join(summary), flush=True)
    return combined_status([local_status, *statuses])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
