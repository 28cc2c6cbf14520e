#!/usr/bin/env bash
# Make a local stand-in for the official python:3.11-slim image, for machines that cannot pull
# images (no registry access). Debian bookworm, made with debootstrap, with Python 3.11 and venv.
#
#   tests/container/make_base_image.sh [--arch amd64|arm64]   -> prints the path of a rootfs tarball
#
# The tarball is cached under ${XDG_CACHE_HOME:-~/.cache}/sqlite-uploader-container/ (keyed by this
# script's content and the architecture): the first run takes ~1-2 min (amd64) or ~5 min (arm64,
# under qemu), later runs are instant. Import it with
#   podman import --change 'CMD ["python3"]' TARBALL localhost/python:3.11-slim
#
# TEST USE ONLY: the host's extra CA certificates (a TLS-intercepting proxy's) are added to the
# image's trust store, so pip can reach PyPI from inside a build on such machines. The product's
# Dockerfile never does this.
set -euo pipefail

arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=${2:?--arch needs a value}; shift 2 ;;
    --arch=*) arch=${1#--arch=}; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "make_base_image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "make_base_image.sh: debootstrap needs root" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "make_base_image.sh: debootstrap is not installed" >&2; exit 1; }

# The Debian mirror this machine's apt uses (deb822 or one-line sources).
mirror=$(grep -h -o -E '^(URIs:[[:space:]]*|deb[[:space:]]+)(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' \
           /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null \
         | grep -o -E 'https?://[^[:space:]]+' | grep -v -- '-security' | head -1 || true)
mirror=${DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}

cache_dir=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/sqlite-uploader-container
key=$( (cat "$0"; echo "$arch"; cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true) | sha256sum | cut -c1-12)
tarball="$cache_dir/base-bookworm-$arch-$key.tar"
if [ -s "$tarball" ]; then
  echo "$tarball"
  exit 0
fi
mkdir -p "$cache_dir"

work=$(mktemp -d "${TMPDIR:-/tmp}/uploader-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

foreign=()
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
  # Needs qemu-user-static with binfmt_misc (the second stage runs arm64 binaries).
  foreign=(--foreign)
fi

echo "make_base_image.sh: debootstrap bookworm/$arch from $mirror" >&2
debootstrap --arch="$arch" --variant=minbase "${foreign[@]}" \
  --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -30 "$work/debootstrap.log" >&2; exit 1; }
if [ ${#foreign[@]} -gt 0 ]; then
  chroot "$rootfs" /debootstrap/debootstrap --second-stage >>"$work/debootstrap.log" 2>&1 || {
    tail -30 "$work/debootstrap.log" >&2; exit 1; }
fi

# Look like the official image where it matters: pip may install, no apt cache, no docs.
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
# TEST ONLY: trust the host's extra CAs (see the header).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || true
fi
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/locale/* "$rootfs"/var/log/* "$rootfs"/debootstrap
find "$rootfs/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true

tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
mv "$tarball.tmp" "$tarball"
echo "$tarball"
