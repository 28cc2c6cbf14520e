"""Print the dependencies of a script's PEP 723 header (`# /// script` block), one per line.

    python3 docker/pep723_requirements.py sqlite_to_databricks_uploader.py > requirements.txt

Used by the Dockerfile, so the image installs exactly what the script declares. Exits 1 when
the header is missing or when this Python does not satisfy the header's requires-python
(checked for the simple `>=X.Y` form the script uses). Standard library only (Python >= 3.11).
"""

from __future__ import annotations

import re
import sys

import tomllib

# The reference regular expression of PEP 723.
BLOCK = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")


def script_metadata(text: str) -> dict:
    blocks = [m for m in BLOCK.finditer(text) if m.group("type") == "script"]
    if len(blocks) != 1:
        raise SystemExit(f"expected one '# /// script' block, found {len(blocks)}")
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in blocks[0].group("content").splitlines(keepends=True))
    return tomllib.loads(content)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        metadata = script_metadata(handle.read())
    wanted = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", metadata.get("requires-python", ">=3.0"))
    if wanted and sys.version_info[:2] < (int(wanted.group(1)), int(wanted.group(2))):
        print(f"this Python is {sys.version.split()[0]}, the script requires {metadata['requires-python']}",
              file=sys.stderr)
        return 1
    for requirement in metadata.get("dependencies", []):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
