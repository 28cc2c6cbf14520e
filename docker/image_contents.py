"""Print what the uploader's image holds: the size of each installed distribution in /opt/venv,
the rest of the environment, the script, and everything else (the base image and the user layer).

Runs inside the image, standard library only; feed it on stdin, so nothing has to be mounted:

    podman run --rm -i --entrypoint /opt/venv/bin/python IMAGE - < docker/image_contents.py
    docker run --rm -i --entrypoint /opt/venv/bin/python IMAGE - < docker/image_contents.py

Sizes are apparent sizes (what the image layers store before compression), hard links counted
once. A distribution's share is every file its RECORD lists plus what the build added beside
them (bytecode in __pycache__, the symlinks the Dockerfile puts in place of duplicate libraries).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

VENV = Path(sys.prefix)
APP = Path("/app")
SKIP_ROOTS = {"/proc", "/sys", "/dev", "/run", "/tmp"}  # kernel and runtime mounts, not the image


def walk_sizes(top: Path, skip: set[str] = frozenset(), seen: set | None = None) -> dict[str, int]:
    """Apparent size of every file under `top` (relative path -> bytes), one filesystem only."""
    seen = set() if seen is None else seen
    sizes: dict[str, int] = {}
    device = top.lstat().st_dev
    for directory, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.path.join(directory, d) not in skip
                   and os.lstat(os.path.join(directory, d)).st_dev == device]
        for name in files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            sizes[os.path.relpath(path, top)] = info.st_size
    return sizes


def owners(site: Path) -> tuple[dict[str, str], dict[str, set[str]]]:
    """RECORD file -> distribution, and directory -> the distributions with files in it."""
    by_file: dict[str, str] = {}
    by_dir: dict[str, set[str]] = defaultdict(set)
    for dist in importlib.metadata.distributions(path=[str(site)]):
        label = f"{dist.metadata['Name']} {dist.version}"
        for record in dist.files or []:
            relative = os.path.normpath(str(record))
            if relative.startswith(".."):
                continue  # scripts in bin/
            by_file[relative] = label
            parent = os.path.dirname(relative)
            while parent:
                by_dir[parent].add(label)
                parent = os.path.dirname(parent)
    return by_file, by_dir


def owner_of(relative: str, by_file: dict[str, str], by_dir: dict[str, set[str]]) -> str:
    if relative in by_file:
        return by_file[relative]
    directory, name = os.path.split(relative)
    if os.path.basename(directory) == "__pycache__":  # x.cpython-311.pyc belongs to x.py's owner
        source = os.path.join(os.path.dirname(directory), name.split(".")[0] + ".py")
        if source in by_file:
            return by_file[source]
        directory = os.path.dirname(directory)
    while directory:
        if len(by_dir.get(directory, ())) == 1:
            return next(iter(by_dir[directory]))
        directory = os.path.dirname(directory)
    return "(no distribution claims it)"


def megabytes(size: int) -> str:
    return f"{size / 1e6:8.1f} MB"


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    seen: set = set()
    venv = walk_sizes(VENV, seen=seen)
    app = walk_sizes(APP, seen=seen) if APP.is_dir() else {}
    rest = walk_sizes(Path("/"), skip=SKIP_ROOTS | {str(VENV), str(APP)}, seen=seen)
    by_file, by_dir = owners(site)

    per_dist: dict[str, int] = defaultdict(int)
    bytecode: dict[str, int] = defaultdict(int)
    venv_other = 0
    site_prefix = os.path.relpath(site, VENV) + os.sep
    for relative, size in venv.items():
        if not relative.startswith(site_prefix):
            venv_other += size
            continue
        label = owner_of(relative[len(site_prefix):], by_file, by_dir)
        per_dist[label] += size
        if relative.endswith(".pyc"):
            bytecode[label] += size

    print(f"{'installed distributions in ' + str(site):60s} {'size':>11s} {'bytecode':>11s}")
    for label, size in sorted(per_dist.items(), key=lambda item: -item[1]):
        print(f"  {label:58s} {megabytes(size)} {megabytes(bytecode[label])}")
    print(f"  {'all distributions':58s} {megabytes(sum(per_dist.values()))} {megabytes(sum(bytecode.values()))}")
    print(f"{str(VENV) + ' outside site-packages (python links, activate scripts)':60s} {megabytes(venv_other)}")
    print(f"{str(APP) + ' (the script)':60s} {megabytes(sum(app.values()))}")
    print(f"{'everything else (the base image, the uploader user, /state)':60s} {megabytes(sum(rest.values()))}")
    total = sum(venv.values()) + sum(app.values()) + sum(rest.values())
    print(f"{'total':60s} {megabytes(total)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
