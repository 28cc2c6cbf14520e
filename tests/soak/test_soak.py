"""The soak of issue 5, two minutes per target: a writer at 1,000 rows/s, the uploader in loop mode,
chaos (kills, graceful restarts, freezes, state-file loss; on Databricks also 503 storms, dropped
answers, refused connections, slow answers, warehouse restarts and crashes), then a row-by-row
comparison.

It runs bench/soak.py exactly as a user does (see bench/README.md) and checks its JSON summary:
no row lost, duplicated or altered, every fault recovered from (the lag back under one interval),
the uploader never exiting on its own and stopping with exit code 0. Both soaks start in the
background when collection ends and these tests run last (see conftest.py). SOAK_SEED replays the
chaos choices of a failed run (timings differ); SOAK_MINUTES runs longer.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("target", ["databricks", "delta"])
def test_two_minute_soak_loses_and_duplicates_nothing(target: str, soak):
    code = soak.wait()
    print(soak.tail(soak.stdout, 20_000))
    print(soak.tail(soak.stderr))
    context = f"(target {target}, seed {soak.seed}; replay with SOAK_SEED={soak.seed}; work dir {soak.workdir})"
    assert soak.summary.exists(), f"no summary (exit code {code}) {context}:\n{soak.tail(soak.stderr)}"
    summary = json.loads(soak.summary.read_text())

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
    assert code == 0, f"exit code {code} {context}"
