#!/usr/bin/env bash
# Prepares `sam local` on a Debian machine without a registry: Docker from Debian, dockerd on host
# networking only, and a Lambda-compatible Python base image built from Debian packages + awslambdaric.
#
# Usage: scripts/sam_local/setup.sh [--env-file FILE]
#   Idempotent. Writes the variables the sam_local tests read (CLIPSEARCH_SAM_LOCAL_READY,
#   DOCKER_HOST, ...) to FILE (default .cache/sam_local/env) for `source`.
#   Stop the dockerd it started with: scripts/sam_local/stop.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

# The template's runtime decides the image: python3.13 is Debian trixie's python3.
runtime_version=3.13
suite=trixie
mirror=${CLIPSEARCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
awslambdaric_pin=awslambdaric==4.2.2
# The Lambda runtime ships boto3; the layer (shared/requirements.txt) relies on that.
boto3_pin=boto3==${CLIPSEARCH_SAM_BOTO3_VERSION:-1.44.8}
image=public.ecr.aws/lambda/python:${runtime_version}-x86_64

state=$repo/.cache/sam_local
env_file=$state/env
[ "${1:-}" = "--env-file" ] && env_file=$2
mkdir -p "$state"
log=$state/setup.log
: > "$log"

started=$SECONDS
say() { echo "sam_local: [$((SECONDS - started))s] $*" >&2; }
fail() { say "FAILED: $*"; [ -s "$log" ] && tail -n 25 "$log" >&2; exit 1; }
quiet() { "$@" >> "$log" 2>&1 || fail "$* (log: $log)"; }

[ "$(id -u)" = 0 ] || fail "needs root (apt-get, dockerd, debootstrap)"
# dockerd and debootstrap install into sbin, which a minimal PATH (env -i, cron, some CI runners) lacks.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# 1. Packages from Debian.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} from Debian"
  # Without systemd, docker.io's maintainer script would start dockerd with its defaults, which rewrite
  # iptables: a policy-rc.d that refuses service starts prevents it.
  blocker=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    blocker=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$blocker" && chmod 755 "$blocker"
  fi
  quiet apt-get update -qq
  DEBIAN_FRONTEND=noninteractive quiet apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [ -n "$blocker" ]; then rm -f "$blocker"; fi
fi
command -v dockerd >/dev/null || fail "dockerd not found after installing docker.io"

# 2. dockerd: no bridge, no iptables rules, no ip_forward; containers use host networking only.
socket=$state/docker.sock
export DOCKER_HOST=unix://$socket
if ! docker version >/dev/null 2>&1; then
  say "starting dockerd (host networking only: --bridge=none --iptables=false --ip-forward=false)"
  rm -f "$socket"
  setsid dockerd --host "$DOCKER_HOST" --pidfile "$state/dockerd.pid" \
    --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    > "$state/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 150); do
    docker version >/dev/null 2>&1 && break
    kill -0 $! 2>/dev/null || { tail -n 20 "$state/dockerd.log" >&2; fail "dockerd exited (log: $state/dockerd.log)"; }
    sleep 0.2
  done
  docker version >/dev/null 2>&1 || fail "dockerd did not answer on $socket within 30 s (log: $state/dockerd.log)"
  say "dockerd running, pid $(cat "$state/dockerd.pid")"
else
  say "dockerd already answering on $socket"
fi

# 3. The base image, rebuilt only when its recipe changes.
recipe=$(printf '%s\n' "$suite" "$runtime_version" "$awslambdaric_pin" "$boto3_pin" "$(sha256sum "$0")" | sha256sum | cut -c1-16)
if [ "$(docker image inspect --format '{{index .Config.Labels "clipsearch.recipe"}}' "$image" 2>/dev/null)" = "$recipe" ]; then
  say "image $image is up to date (recipe $recipe)"
else
  rootfs_tar=$state/rootfs-$suite-minbase.tar
  if [ ! -s "$rootfs_tar" ]; then
    say "debootstrap $suite minbase with python3 (cached as $rootfs_tar; takes ~2 min)"
    rootfs=$(mktemp -d "$state/rootfs.XXXXXX")
    quiet debootstrap --variant=minbase --include=python3,ca-certificates "$suite" "$rootfs" "$mirror"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    quiet tar -C "$rootfs" -cf "$rootfs_tar.part" .
    mv "$rootfs_tar.part" "$rootfs_tar"
    rm -rf "$rootfs"
  fi
  work=$(mktemp -d "$state/image.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  quiet tar -C "$work" -xf "$rootfs_tar"
  [ -x "$work/usr/bin/python$runtime_version" ] \
    || fail "the $suite rootfs has no python$runtime_version ($(ls "$work"/usr/bin/python3.* 2>/dev/null)), the template needs it"
  say "installing $awslambdaric_pin and $boto3_pin (python$runtime_version wheels) into /var/runtime"
  quiet python3 -m pip install --quiet --disable-pip-version-check --no-compile --only-binary=:all: \
    --implementation cp --python-version "$runtime_version" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --target "$work/var/runtime" "$awslambdaric_pin" "$boto3_pin"
  cat > "$work/var/runtime/bootstrap" <<BOOTSTRAP
#!/bin/sh
# The runtime the emulator starts: Lambda's search path (function, layers, runtime), then the client.
export PYTHONPATH=/var/task:/opt/python/lib/python$runtime_version/site-packages:/opt/python:/var/runtime
exec /usr/bin/python$runtime_version -m awslambdaric "\$_HANDLER"
BOOTSTRAP
  chmod 755 "$work/var/runtime/bootstrap"
  mkdir -p "$work/var/task" "$work/opt"
  say "importing $image"
  tar -C "$work" -c . | docker import \
    --change "ENV LAMBDA_TASK_ROOT=/var/task" --change "ENV LAMBDA_RUNTIME_DIR=/var/runtime" \
    --change "ENV LANG=en_US.UTF-8" --change "ENV TZ=:/etc/localtime" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "WORKDIR /var/task" --change "LABEL clipsearch.recipe=$recipe" \
    --change 'ENTRYPOINT ["/var/runtime/bootstrap"]' - "$image" >> "$log" 2>&1 \
    || fail "docker import (log: $log)"
  # SAM layers its emulator on this image once and reuses the result: drop the stale derivatives.
  docker images --format '{{.Repository}}:{{.Tag}}' \
    | grep -E "^(public.ecr.aws/lambda/python:${runtime_version}-rapid|samcli/lambda-python:${runtime_version})" \
    | xargs -r docker rmi -f >> "$log" 2>&1 || true
  docker image prune -f >> "$log" 2>&1 || true
fi

cat > "$env_file" <<ENV
export DOCKER_HOST=$DOCKER_HOST
export SAM_CLI_TELEMETRY=0
export CLIPSEARCH_SAM_LOCAL_READY=1
export CLIPSEARCH_SAM_LOCAL_IMAGE=$image
ENV
say "ready in $((SECONDS - started)) s; variables for the tests: source $env_file"
