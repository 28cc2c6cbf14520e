#!/usr/bin/env bash
# Build (and, with --push, publish) the uploader's container image. Run ./build.sh --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./build.sh [--tag TAG] [--registry REGISTRY|local] [--push] [options]

Builds the uploader's image from the Dockerfile beside this script. Nothing is pushed unless
--push is given.

  --tag TAG           image tag (default: latest)
  --registry R        registry to name and push the image for (default: $REGISTRY or ghcr.io);
                      "local" keeps the image in this machine's image store only
  --push              build every platform in PLATFORMS and push one multi-arch image
                      (REGISTRY/ORGANIZATION_NAME/IMAGE_NAME:TAG, plus :latest unless --no-latest)
  --no-latest         with --push, do not also move the :latest tag
  --platforms LIST    same as PLATFORMS
  --base-image IMAGE  same as BASE_IMAGE
  --builder NAME      same as BUILDER
  --dry-run           print the commands instead of running them
  -h, --help          this text

Environment variables:
  ORGANIZATION_NAME   registry namespace (user or organisation); required unless --registry local
  IMAGE_NAME          image name (default: databricks-uploader)
  PLATFORMS           comma-separated platforms (default for --push: linux/amd64,linux/arm64).
                      Without --push one platform is built and loaded locally: PLATFORMS if it
                      names exactly one, else this machine's
  REGISTRY            default for --registry
  BASE_IMAGE          base image (default: the Dockerfile's, an official python slim image)
  BUILDER             docker (buildx), podman or buildah (default: the first that works, in
                      that order)

Examples:
  ./build.sh --registry local --tag dev                          # local image databricks-uploader:dev
  ORGANIZATION_NAME=your-org ./build.sh --tag v1.0.0 --push      # ghcr.io/your-org/databricks-uploader
  PLATFORMS=linux/arm64 ./build.sh --registry local --tag arm64  # one foreign platform (needs QEMU)

Multi-platform builds of foreign architectures need QEMU user emulation registered with
binfmt_misc (Debian: apt-get install qemu-user-static). Pushing needs a prior login:
docker login / podman login / buildah login REGISTRY.
EOF
}

die() { echo "build.sh: $*" >&2; exit 1; }
usage_error() { echo "build.sh: $*" >&2; echo "Run ./build.sh --help for usage." >&2; exit 2; }

tag=latest
registry=${REGISTRY:-ghcr.io}
push=false
also_latest=true
dry_run=false
platforms=${PLATFORMS:-}
base_image=${BASE_IMAGE:-}
builder=${BUILDER:-}

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tag) [ $# -ge 2 ] || usage_error "--tag needs a value"; tag=$2; shift 2 ;;
    --tag=*) tag=${1#*=}; shift ;;
    --registry) [ $# -ge 2 ] || usage_error "--registry needs a value"; registry=$2; shift 2 ;;
    --registry=*) registry=${1#*=}; shift ;;
    --push) push=true; shift ;;
    --no-latest) also_latest=false; shift ;;
    --platforms) [ $# -ge 2 ] || usage_error "--platforms needs a value"; platforms=$2; shift 2 ;;
    --platforms=*) platforms=${1#*=}; shift ;;
    --base-image) [ $# -ge 2 ] || usage_error "--base-image needs a value"; base_image=$2; shift 2 ;;
    --base-image=*) base_image=${1#*=}; shift ;;
    --builder) [ $# -ge 2 ] || usage_error "--builder needs a value"; builder=$2; shift 2 ;;
    --builder=*) builder=${1#*=}; shift ;;
    --dry-run) dry_run=true; shift ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

image_name=${IMAGE_NAME:-databricks-uploader}
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || usage_error "invalid tag '$tag' (letters, digits, _ . -; at most 128)"
[[ $image_name =~ ^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$ ]] \
  || usage_error "invalid IMAGE_NAME '$image_name' (lowercase letters, digits, . _ - /)"
[ -n "$registry" ] || usage_error "--registry is empty"

if [ "$registry" = local ]; then
  $push && usage_error "--push cannot be used with --registry local: name a registry (e.g. --registry ghcr.io)"
  if [ -n "${ORGANIZATION_NAME:-}" ]; then
    image="$ORGANIZATION_NAME/$image_name"
  else
    image="$image_name"
  fi
else
  [ -n "${ORGANIZATION_NAME:-}" ] || usage_error \
    "ORGANIZATION_NAME is not set: export ORGANIZATION_NAME=your-org (the registry namespace), or use --registry local"
  image="$registry/$ORGANIZATION_NAME/$image_name"
fi
[[ ${ORGANIZATION_NAME:-x} =~ ^[a-z0-9]+([._-][a-z0-9]+)*$ ]] \
  || usage_error "invalid ORGANIZATION_NAME '${ORGANIZATION_NAME}' (registries want lowercase letters, digits, . _ -)"

host_platform() {
  local arch
  arch=$(uname -m)
  case "$arch" in
    x86_64|amd64) echo linux/amd64 ;;
    aarch64|arm64) echo linux/arm64 ;;
    armv7l) echo linux/arm/v7 ;;
    *) echo "linux/$arch" ;;
  esac
}

if $push; then
  platforms=${platforms:-linux/amd64,linux/arm64}
else
  if [ -z "$platforms" ] || [[ $platforms == *,* ]]; then
    [ -n "$platforms" ] && echo "build.sh: building only $(host_platform) for the local image store (PLATFORMS is used with --push)" >&2
    platforms=$(host_platform)
  fi
fi
platforms=${platforms// /}

# ---- the builder ----
docker_works() {
  command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1
}
if [ -z "$builder" ]; then
  if docker_works; then builder=docker
  elif command -v podman >/dev/null 2>&1; then builder=podman
  elif command -v buildah >/dev/null 2>&1; then builder=buildah
  else
    hint=""
    if command -v docker >/dev/null 2>&1; then
      if ! docker buildx version >/dev/null 2>&1; then
        hint=" (docker is installed but its buildx plugin is not: install docker-buildx-plugin)"
      else
        hint=" (docker is installed but its daemon does not answer: start it, or check DOCKER_HOST)"
      fi
    fi
    die "no image builder found$hint. Install Docker with buildx, podman or buildah."
  fi
else
  case "$builder" in
    docker)
      command -v docker >/dev/null 2>&1 || die "BUILDER=docker but docker is not installed"
      docker buildx version >/dev/null 2>&1 || die "docker buildx is not available: install the buildx plugin (docker-buildx-plugin)"
      $dry_run || timeout 20 docker info >/dev/null 2>&1 || die "the docker daemon does not answer (docker info failed)" ;;
    podman|buildah) command -v "$builder" >/dev/null 2>&1 || die "BUILDER=$builder but $builder is not installed" ;;
    *) usage_error "unknown builder '$builder' (docker, podman or buildah)" ;;
  esac
fi

# Foreign platforms need QEMU emulation (buildx may also use remote builders: it reports itself).
if [ "$builder" != docker ]; then
  IFS=, read -r -a plist <<<"$platforms"
  for p in "${plist[@]}"; do
    [ "$p" = "$(host_platform)" ] && continue
    arch=${p#linux/}; arch=${arch%%/*}
    case "$arch" in amd64) q=x86_64 ;; arm64) q=aarch64 ;; arm) q=arm ;; *) q=$arch ;; esac
    if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$q" ]; then
      die "building $p on $(host_platform) needs QEMU emulation, which is not registered (no /proc/sys/fs/binfmt_misc/qemu-$q): apt-get install qemu-user-static, or build on a $p machine"
    fi
  done
fi

# ---- login check before a long build ----
if $push; then
  case "$builder" in
    docker)
      config="${DOCKER_CONFIG:-$HOME/.docker}/config.json"
      if [ ! -f "$config" ] || ! grep -q -E "\"(https://)?$registry(/[^\"]*)?\"|\"credsStore\"" "$config"; then
        die "not logged in to $registry: run docker login $registry (needs a token that can push packages)"
      fi ;;
    podman|buildah)
      if ! "$builder" login --get-login "$registry" >/dev/null 2>&1; then
        die "not logged in to $registry: run $builder login $registry (needs a token that can push packages)"
      fi ;;
  esac
fi

cd "$(dirname "$0")"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_args=(--build-arg "VERSION=$tag" --build-arg "REVISION=$revision" --build-arg "CREATED=$created")
[ -n "$base_image" ] && build_args+=(--build-arg "BASE_IMAGE=$base_image")
tags=("$image:$tag")
if $push && $also_latest && [ "$tag" != latest ]; then tags+=("$image:latest"); fi

run() {
  echo "+ $*" >&2
  $dry_run || "$@"
}

echo "build.sh: $builder, $platforms -> ${tags[*]}$($push && echo ' (push)' || echo ' (local)')" >&2
case "$builder" in
  docker)
    tag_args=()
    for t in "${tags[@]}"; do tag_args+=(-t "$t"); done
    if $push; then
      run docker buildx build --platform "$platforms" "${build_args[@]}" "${tag_args[@]}" --push .
    else
      run docker buildx build --platform "$platforms" "${build_args[@]}" "${tag_args[@]}" --load .
    fi ;;
  podman|buildah)
    build=(podman build)
    [ "$builder" = buildah ] && build=(buildah bud)
    # The docker format keeps the HEALTHCHECK (the OCI image format has no field for it).
    if $push; then
      manifest="localhost/build-sh-$image_name-$tag-$$"
      run "$builder" manifest create "$manifest"
      run "${build[@]}" --format docker --platform "$platforms" "${build_args[@]}" --manifest "$manifest" .
      for t in "${tags[@]}"; do
        run "$builder" manifest push --all --format v2s2 "$manifest" "docker://$t"
      done
      run "$builder" manifest rm "$manifest" >/dev/null
    else
      run "${build[@]}" --format docker --platform "$platforms" "${build_args[@]}" -t "${tags[0]}" .
    fi ;;
esac
$dry_run || echo "build.sh: built ${tags[*]}$($push && echo ', pushed')" >&2
