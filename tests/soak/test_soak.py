"""The soak of issue 5, two minutes per target: a writer at 1,000 rows/s, the uploader in loop mode,
chaos (kills, graceful restarts, freezes, state-file loss; on Databricks also 503 storms, dropped
answers, refused connections, slow answers, warehouse restarts and crashes), then a row-by-row
comparison.

It runs bench/soak.py exactly as a user does (see bench/README.md) and checks its JSON summary:
no row lost, duplicated or altered, every fault recovered from (the lag back under one interval),
the uploader never exiting on its own and stopping with exit code 0. SOAK_SEED replays the
chaos choices of a failed run (timings differ); SOAK_MINUTES runs longer.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SOAK = ROOT / "bench" / "soak.py"


@pytest.mark.parametrize("target", ["databricks", "delta"])
def test_two_minute_soak_loses_and_duplicates_nothing(target: str, tmp_path: Path):
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1 << 30))
    minutes = os.environ.get("SOAK_MINUTES", "2")
    summary_path = tmp_path / "summary.json"
    command = [sys.executable, str(SOAK), "--target", target, "--minutes", minutes, "--seed", str(seed),
               "--workdir", str(tmp_path / "work"), "--json", str(summary_path), "--verbose",
               # Shorter faults and gaps than the defaults: more of them fit in two minutes.
               "--fault-seconds", "3,12", "--gap", "1,6",
               "--recovery-timeout", "120", "--drain-timeout", "150"]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                             timeout=float(minutes) * 60 + 600)
    print(process.stdout)
    print(process.stderr[-5000:])
    assert summary_path.exists(), f"no summary (exit code {process.returncode}):\n{process.stderr[-5000:]}"
    summary = json.loads(summary_path.read_text())
    context = f"(target {target}, seed {seed}; replay with SOAK_SEED={seed}; work dir {tmp_path / 'work'})"

    assert summary["rows_written"] >= 30_000, f"the writer wrote too little {context}"
    assert summary["lost"] == 0, f"{summary['lost']} row(s) lost {context}: {summary['examples']}"
    assert summary["duplicated"] == 0, f"{summary['duplicated']} duplicate(s) {context}: {summary['examples']}"
    assert summary["unexpected"] == 0 and summary["mismatched"] == 0, f"{summary['examples']} {context}"
    assert summary["rows_in_target"] == summary["rows_written"], context
    assert len(summary["episodes"]) >= 2, f"too few faults to call it a soak: {summary['episodes']} {context}"
    assert summary["faults_not_recovered"] == 0, f"lag did not recover: {summary['failures']} {context}"
    assert summary["unexpected_uploader_exits"] == 0, f"{summary['failures']} {context}"
    assert summary["final_exit_code"] == 0, context
    assert summary["passed"], f"{summary['failures']} {context}"
    assert process.returncode == 0, f"exit code {process.returncode} {context}"
