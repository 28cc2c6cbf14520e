"""A batch's buffers go back to the system when they are freed, on glibc (keep_large_blocks_mapped).

Each probe runs in a process of its own, since the setting is per process. It frees one block as
large as a batch column, as a drain does: after that, glibc's own rule serves blocks of a few MB
from the heap. It then allocates sixteen 2 MB blocks, frees every other one (the others are still
in use, as the next batch's are), and measures how much went back to the system.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent("""
    import ctypes, os, sys
    import sqlite_to_databricks_uploader as uploader

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    print(uploader.keep_large_blocks_mapped())
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(16 << 20))  # a batch committed
    blocks = [libc.malloc(2 << 20) for _ in range(16)]
    for block in blocks:
        ctypes.memset(block, 1, 2 << 20)
    used = resident()
    for block in blocks[::2]:
        libc.free(block)
    print(used - resident())
""")

glibc = pytest.mark.skipif(not (hasattr(os, "confstr") and (os.confstr("CS_GNU_LIBC_VERSION") or "")
                                .startswith("glibc")), reason="the setting is glibc's")


def probe(env_extra: dict[str, str] | None = None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra or {})
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    applied, released = result.stdout.split()
    return applied, int(released)


@glibc
def test_freed_batch_buffers_are_not_kept_resident():
    applied, released = probe()
    assert applied == "True"
    assert released >= 8 << 20  # of 16 MB freed (blocks cut from free heap space stay there)


@glibc
def test_glibcs_own_rule_keeps_them_and_the_users_tuning_wins():
    """The baseline the setting changes, and a MALLOC_MMAP_THRESHOLD_ of the user's own is left as it is."""
    applied, released = probe({"MALLOC_MMAP_THRESHOLD_": str(32 << 20)})
    assert applied == "False"
    assert released < 1 << 20
