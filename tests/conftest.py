"""Fixtures for the tests in this folder; the helpers live in uploader_testkit.py.

Test modules import helpers from uploader_testkit, never from conftest: several folders have a
conftest.py, and `from conftest import ...` gets whichever one pytest imported last. The names
are re-exported here for code that loads this file by path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
