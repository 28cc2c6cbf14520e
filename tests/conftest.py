"""Fixtures for the tests in this folder; the helpers live in uploader_testkit.py.

Test modules import helpers from uploader_testkit, never from conftest: several folders have a
conftest.py, and `from conftest import ...` gets whichever one pytest imported last. The names
are re-exported here for code that loads this file by path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from output_audit import OutputAudit
from uploader_testkit import (  # noqa: F401  (sample_db is a fixture pytest finds here)
    ROOT,
    SAMPLE,
    SCRIPT,
    clean_env,
    read_delta,
    run_uploader,
    sample_db,
    sqlite_rows,
    uploader_command,
)

# --- The canary audit of the whole run (see output_audit.py)

AUDIT = OutputAudit()
AUDIT.install(SCRIPT)


def pytest_runtest_logreport(report) -> None:
    for title, text in report.sections:
        AUDIT.scan_text(text, f"{report.nodeid}: {title}")
    if report.longrepr is not None:
        AUDIT.scan_text(str(report.longrepr), f"{report.nodeid}: failure report")


def pytest_sessionfinish(session, exitstatus) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        AUDIT.scan_tree(factory.getbasetemp())
    if AUDIT.findings:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(
        f"canary audit: {AUDIT.outputs_scanned} outputs and {AUDIT.files_scanned} files scanned, "
        f"{AUDIT.uploader_runs_with_canary} uploader runs carried a canary secret, "
        f"{len(AUDIT.findings)} leak(s)")
    for finding in AUDIT.findings[:20]:
        terminalreporter.write_line(f"  LEAK {finding}", red=True)
