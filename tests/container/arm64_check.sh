#!/usr/bin/env bash
# Opt-in check: build the linux/arm64 image on an amd64 machine under QEMU user emulation and run
# it (--once into a Delta table, no network). Needs root (binfmt_misc, debootstrap), ~450 MB of
# packages and 10-20 minutes. Not part of CI; the result is recorded in README.md.
#
#   tests/container/arm64_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(uname -m)" = aarch64 ]; then
  echo "arm64_check.sh: this machine is arm64 already: the ordinary container tests cover it" >&2
fi
if ! command -v qemu-aarch64-static >/dev/null 2>&1; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-user-static binfmt-support >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 || update-binfmts --import qemu-aarch64
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "arm64_check.sh: could not register qemu-aarch64" >&2; exit 1; }

RUN_ARM64_CHECK=1 REQUIRE_CONTAINER_TESTS=1 python3 -m pytest tests/container/test_arm64.py -p no:cacheprovider -q -s "$@"
