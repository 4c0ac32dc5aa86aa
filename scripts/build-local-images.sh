#!/usr/bin/env bash
# TEST HARNESS, not for users: users pull the official Flower images (`docker compose up` does it).
#
# Makes the images docker-compose.yml names available on a Docker host that cannot reach Docker
# Hub, so the compose deployment can run end to end there (tests/test_compose.py, CI):
#
#   scripts/build-local-images.sh [--flwr-version V] [--app-tag T] [--no-app] [--rebuild | --clean]
#
# 1. flwr/superlink:V, flwr/supernode:V, flwr/superexec:V (V: the flwr pin, default 1.41.0).
#    An image already present is kept (official or stand-in); otherwise `docker pull` is tried;
#    only if that fails is a stand-in built, from
#    - fedsb-local/debian:bookworm: `debootstrap --variant=minbase` (python3, venv, pip,
#      ca-certificates) and `docker import` (about 3 minutes, once);
#    - fedsb-local/flwr-base:V: flwr==V from the package registry into the venv /python/venv (pip
#      runs in a container on the host network, with the host's CA bundle, the one `pip config
#      list` names, mounted and named by PIP_CERT), and what the official flwr/base image has and
#      docker-compose.yml relies on: user `app` (uid 49999), HOME and WORKDIR /app owned by app
#      (the superlink-state volume mounts there), the venv owned by app (the Dockerfile pip-installs
#      as app), PATH, PYTHONUNBUFFERED, LANG;
#    - the three images: that base with the official entrypoints flower-superlink, flower-supernode,
#      flower-superexec. flwr/superexec also carries the CA bundle at /etc/fedsb-stand-in/pip-ca.crt
#      with PIP_CERT naming it, the one deliberate difference from the official image: the
#      Dockerfile's pip steps need it here, and the legacy builder (the only one without buildx)
#      cannot mount a file into a build.
#    Stand-ins carry the label org.fedsb.stand-in=true (`docker image inspect` tells them apart).
# 2. fedsb-superexec:T (default latest), the app image of docker-compose.yml: `docker build` of
#    ./Dockerfile, unchanged, on flwr/superexec:V, with --build-arg TORCH_WHEEL naming the CPU torch
#    wheel in pip's find-links folder (served on 127.0.0.1 for the build) when it is there, instead
#    of the CPU index. With Docker's layer cache a rebuild takes a second when nothing changed and
#    seconds after a code change (the dependencies have their own layer).
#
# Every container of the build uses the host network (nothing on Docker's bridge network).
# --rebuild removes the app image and the stand-ins (never an official image) first: a cold build.
# --clean only removes them (then `python -m pytest -s tests/test_compose.py` measures a cold start).
# Needs: docker (a running daemon), and for a stand-in base debootstrap (as root), python3.
set -euo pipefail

flwr_version="${FLWR_VERSION:-1.41.0}"
app_tag="${FEDSB_IMAGE_TAG:-latest}"
build_app=1
rebuild=0
clean_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --flwr-version) flwr_version="$2"; shift 2 ;;
    --app-tag) app_tag="$2"; shift 2 ;;
    --no-app) build_app=0; shift ;;
    --rebuild) rebuild=1; shift ;;
    --clean) rebuild=1; clean_only=1; shift ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "build-local-images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
debian_image="fedsb-local/debian:bookworm"
base_image="fedsb-local/flwr-base:${flwr_version}"
app_image="fedsb-superexec:${app_tag}"
stand_in_label="org.fedsb.stand-in"
t_start=$SECONDS

say() { echo "[images $((SECONDS - t_start))s] $*"; }
die() { echo "build-local-images.sh: $*" >&2; exit 1; }
exists() { docker image inspect "$1" >/dev/null 2>&1; }
is_stand_in() { [ "$(docker image inspect -f "{{index .Config.Labels \"$stand_in_label\"}}" "$1" 2>/dev/null)" = true ]; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (start dockerd)"

# The file pip itself trusts (`pip config list`: global.cert, or PIP_CERT): containers get it to
# reach the package registry from this machine.
pip_setting() {
  python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'$/\1/p" | head -n 1
}
pip_cert="${PIP_CERT:-$(pip_setting cert)}"
pip_cert="${pip_cert:-/etc/ssl/certs/ca-certificates.crt}"

tmp="$(mktemp -d /var/tmp/fedsb-images.XXXXXX)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# --- 1. the Flower images ----------------------------------------------------------------------
if [ "$rebuild" = 1 ]; then  # children first: an image with children cannot be removed
  if exists "$app_image"; then docker image rm "$app_image" >/dev/null; say "removed $app_image"; fi
  for img in "flwr/superlink:$flwr_version" "flwr/supernode:$flwr_version" "flwr/superexec:$flwr_version" \
             "$base_image" "$debian_image"; do
    if exists "$img" && is_stand_in "$img"; then docker image rm "$img" >/dev/null; say "removed stand-in $img"; fi
  done
  if [ "$clean_only" = 1 ]; then exit 0; fi
fi

needed=()
for name in superlink supernode superexec; do
  img="flwr/$name:$flwr_version"
  if exists "$img"; then
    say "$img present ($(is_stand_in "$img" && echo stand-in || echo official)): kept"
  elif docker pull -q "$img" >/dev/null 2>"$tmp/pull.err"; then
    say "$img pulled (official)"
  else
    say "$img cannot be pulled ($(tail -n 1 "$tmp/pull.err")): building a stand-in"
    needed+=("$name")
  fi
done

if [ ${#needed[@]} -gt 0 ]; then
  if ! exists "$debian_image"; then
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root"
    say "debootstrap bookworm (minbase + python3) into $tmp/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$tmp/rootfs" > "$tmp/debootstrap.log" 2>&1 \
      || { tail -n 20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
    tar -C "$tmp/rootfs" -c . | docker import -c "LABEL $stand_in_label=true" - "$debian_image" >/dev/null
    rm -rf "$tmp/rootfs"
    say "imported $debian_image"
  else
    say "$debian_image present: kept"
  fi

  if ! exists "$base_image"; then
    [ -r "$pip_cert" ] || die "the CA bundle $pip_cert is not readable (set PIP_CERT)"
    say "installing flwr==$flwr_version from the package registry into $base_image"
    # Mirrors flwr/base (src/docker/base in the Flower repository): a venv at /python/venv owned
    # by app, user app uid 49999 with home /app.
    script="set -eu
python3 -m venv /python/venv
/python/venv/bin/pip install --no-cache-dir --disable-pip-version-check 'flwr==$flwr_version'
useradd --no-create-home --home-dir /app --uid 49999 --user-group --shell /bin/sh app
mkdir -p /app && chown app:app /app && chown -R app:app /python/venv"
    cid="$(docker create --network host -v "$pip_cert:/run/pip-ca.crt:ro" -e PIP_CERT=/run/pip-ca.crt \
      "$debian_image" /bin/sh -c "$script")"
    if ! docker start -a "$cid" > "$tmp/flwr-base.log" 2>&1; then
      tail -n 20 "$tmp/flwr-base.log" >&2; docker rm -f "$cid" >/dev/null; die "installing flwr failed"
    fi
    docker commit \
      -c "ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      -c "ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONIOENCODING=UTF-8 LANG=C.UTF-8 LC_ALL=C.UTF-8 HOME=/app" \
      -c "WORKDIR /app" -c "USER app" -c "LABEL $stand_in_label=true" \
      "$cid" "$base_image" >/dev/null
    docker rm "$cid" >/dev/null
    say "committed $base_image ($(grep -o 'Successfully installed.*' "$tmp/flwr-base.log" | cut -c1-120)...)"
  else
    say "$base_image present: kept"
  fi

  for name in "${needed[@]}"; do
    ctx="$tmp/ctx-$name"
    mkdir -p "$ctx"
    extra=""
    if [ "$name" = superexec ]; then
      cp "$pip_cert" "$ctx/pip-ca.crt"
      extra="COPY pip-ca.crt /etc/fedsb-stand-in/pip-ca.crt
ENV PIP_CERT=/etc/fedsb-stand-in/pip-ca.crt"
    fi
    printf '%s\n' "FROM $base_image" "$extra" "LABEL $stand_in_label=true" \
      "ENTRYPOINT [\"flower-$name\"]" > "$ctx/Dockerfile"
    docker build -q --force-rm --network host -t "flwr/$name:$flwr_version" "$ctx" >/dev/null 2>"$tmp/build.err" \
      || { cat "$tmp/build.err" >&2; die "building the stand-in flwr/$name:$flwr_version failed"; }
    say "built stand-in flwr/$name:$flwr_version (entrypoint flower-$name)"
  done
fi

# --- 2. the app image --------------------------------------------------------------------------
if [ "$build_app" = 1 ]; then
  build_args=(--build-arg "FLWR_VERSION=$flwr_version")
  find_links="${PIP_FIND_LINKS:-$(pip_setting find-links)}"
  wheel=""
  for dir in $find_links; do  # the CPU torch 2.13.0 wheel for this Python, if pip has one locally
    for w in "$dir"/torch-2.13.0+cpu-cp311-cp311-manylinux*_x86_64.whl; do [ -f "$w" ] && wheel="$w"; done
  done
  if [ -n "$wheel" ]; then
    # A fixed port (outside fedsb's deployment range 41000-41999): the URL is a build argument, and
    # a new one misses the layer cache. Taken: any free port, and the torch layer is rebuilt.
    port="${FEDSB_WHEEL_PORT:-47391}"
    if ! python3 -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; then
      taken="$port"
      port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
      say "port $taken is taken: serving the wheel on $port (so the torch layer is rebuilt)"
    fi
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$(dirname "$wheel")" \
      > "$tmp/http.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 50); do
      python3 - "$port" <<'EOF' 2>/dev/null && break
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
EOF
      kill -0 "$server_pid" 2>/dev/null || die "could not serve $wheel on 127.0.0.1:$port: $(cat "$tmp/http.log")"
      sleep 0.2
    done
    build_args+=(--build-arg "TORCH_WHEEL=http://127.0.0.1:$port/$(basename "$wheel")")
    say "building $app_image with torch from $wheel (served on 127.0.0.1:$port)"
  else
    say "building $app_image (no local torch wheel: torch from the Dockerfile's TORCH_INDEX_URL)"
  fi
  docker build --force-rm --network host -t "$app_image" "${build_args[@]}" "$root" > "$tmp/app-build.log" 2>&1 \
    || { tail -n 40 "$tmp/app-build.log" >&2; die "building $app_image failed"; }
  versions=$(grep -E '^flwr .* torch ' "$tmp/app-build.log" | tail -n 1 || true)
  say "built $app_image (${versions:+$versions, }$(grep -c 'Using cache' "$tmp/app-build.log" || true) steps from the cache)"
fi
say "done in $((SECONDS - t_start)) s"
