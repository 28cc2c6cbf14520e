"""Run the whole test suite as two pytest sessions side by side; exit with the worse status.

Most of the suite's time is waiting, not computing: the uploader's sleep loops, the soaks, SIGKILL
timing, container builds on one side, and a Spark-backed warehouse emulator answering one statement
at a time on the other. One session leaves half the machine idle. The Databricks folders (which
share their emulators within a session) run in one session, everything else in the other; each has
its own base temporary directory, so their files, canary audits and soak outputs never mix.

    python3 tests/run_all.py              # the README's test command runs this
    python3 tests/run_all.py -k fleet     # extra arguments go to both sessions

The second session's output is printed when it ends, after the first's. The exit status is pytest's:
0 when both passed; otherwise a failing session's status; 5 (no tests collected) when a session
collected nothing, so a run that tests nothing never looks green.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folders that talk to the warehouse emulator: their own session.
EMULATOR_FOLDERS = ("tests/databricks", "tests/databricks_faults", "tests/emulator")
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
        log = scratch_dir / "emulator-session.log"
        with log.open("w") as out:
            emulator_session = subprocess.Popen(
                [*pytest, *EMULATOR_FOLDERS, "--basetemp", str(scratch_dir / "emulator"), *extra],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            try:
                ignores = [f"--ignore={folder}" for folder in EMULATOR_FOLDERS]
                local_status = subprocess.call([*pytest, *ignores, "--basetemp", str(scratch_dir / "local"), *extra],
                                               cwd=ROOT)
            finally:
                emulator_status = emulator_session.wait()
        print(f"\n===== session 2 of 2: {' '.join(EMULATOR_FOLDERS)} =====", flush=True)
        sys.stdout.write(log.read_text(errors="replace"))
    print(f"\nsession 1 (everything else): exit {local_status}; session 2 (emulator folders): exit {emulator_status}",
          flush=True)
    return combined_status([local_status, emulator_status])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
