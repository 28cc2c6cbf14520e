"""The canary audit: the test run's secrets must never appear in anything the tools print or write.

Every emulator the tests start accepts only CANARY_TOKEN (and the service principal secret
CANARY_SECRET), so every Databricks run of the uploader in the whole test run carries one of
them. The audit (installed by tests/conftest.py for the whole session) looks for both values in:
- the stdout/stderr of every subprocess whose output a test collects (subprocess.run,
  Popen.communicate);
- everything pytest captured for every test (output, logs, failure reports);
- every file under pytest's temporary directory at the end of the run (uploader logs that tests
  redirect to files, state files, heartbeats, Delta tables, staged Parquet).
A hit fails the session, naming where the secret was seen.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANARY_TOKEN = "dapi-canary-5e7c1b9a40d2f6831c0e"
CANARY_SECRET = "sp-secret-canary-93be27d1f4a6"
CANARIES = (CANARY_TOKEN, CANARY_SECRET)
CHUNK = 1 << 20


@dataclass
class OutputAudit:
    canaries: tuple[str, ...] = CANARIES
    findings: list[str] = field(default_factory=list)
    outputs_scanned: int = 0
    files_scanned: int = 0
    uploader_runs_with_canary: int = 0

    def scan_text(self, text: Any, where: str) -> None:
        if text is None:
            return
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        self.outputs_scanned += 1
        for canary in self.canaries:
            at = text.find(canary)
            if at >= 0:
                excerpt = text[max(0, at - 200): at + len(canary) + 50].replace("\n", "\\n")
                self.findings.append(f"{where}: ...{excerpt}...")

    def scan_file(self, path: Path) -> None:
        needles = [c.encode() for c in self.canaries]
        overlap = max(len(n) for n in needles)
        tail = b""
        try:
            with open(path, "rb") as handle:
                self.files_scanned += 1
                while chunk := handle.read(CHUNK):
                    window = tail + chunk
                    for needle in needles:
                        if needle in window:
                            self.findings.append(f"file {path} contains the canary {needle[:12].decode()}...")
                            return
                    tail = window[-overlap:]
        except OSError:
            return

    def scan_tree(self, root: Path) -> None:
        for directory, _dirs, files in os.walk(root):
            for name in files:
                path = Path(directory) / name
                if not path.is_symlink():
                    self.scan_file(path)

    def install(self, uploader_script: Path) -> None:
        """Look at every subprocess's collected output for the rest of this Python process."""
        audit = self
        original_init = subprocess.Popen.__init__
        original_communicate = subprocess.Popen.communicate
        script = str(uploader_script)

        def init(popen: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
            original_init(popen, args, *rest, **kwargs)
            words = [str(a) for a in (args if isinstance(args, (list, tuple)) else [args])]
            env = kwargs.get("env") or os.environ
            if any(script in w for w in words) and any(c in v for v in env.values() for c in audit.canaries):
                audit.uploader_runs_with_canary += 1
            popen._audit_label = " ".join(words)[:200]  # type: ignore[attr-defined]

        def communicate(popen: subprocess.Popen, *args: Any, **kwargs: Any) -> Any:
            out, err = original_communicate(popen, *args, **kwargs)
            label = getattr(popen, "_audit_label", "a subprocess")
            audit.scan_text(out, f"stdout of {label}")
            audit.scan_text(err, f"stderr of {label}")
            return out, err

        subprocess.Popen.__init__ = init  # type: ignore[method-assign]
        subprocess.Popen.communicate = communicate  # type: ignore[method-assign]
