#!/usr/bin/env bash
# Credentials for the multi-node deployment (docker-compose.yml, or SuperLink and SuperNodes on
# separate hosts); see docs/multinode.md.
#
#   scripts/gen-certs.sh [--nodes N] [--out DIR] [--host NAME_OR_IP]... [--days D] [--force]
#
# Writes into DIR (default: ./certs):
#   ca.crt, ca.key            a self-signed CA (EC P-384); ca.crt is what every client trusts
#   server.pem, server.key    the SuperLink's TLS certificate, signed by the CA, valid for
#                             localhost, 127.0.0.1, superlink (the compose service) and every --host
#   supernode-<i>, .pub       SuperNode i's key pair (OpenSSH ECDSA P-384, what flwr 1.41 takes for
#                             --auth-supernode-private-key and `flwr supernode register`), i = 1..N
# N defaults to $NUM_SUPERNODES, else 2; certificates are valid for D days (default 365).
# The CA and existing SuperNode keys are kept (so adding nodes later keeps what is registered)
# unless --force; the SuperLink certificate is remade every time (pass every --host each time).
#
# The files are made by fedsb's own generator (fedsb/ops/deploy/credentials.py, through
# `python -m fedsb.ops.deploy certs`, from this checkout), the one the local deployment uses.
# It runs with $PYTHON (default python3), which needs the `cryptography` package (flwr brings it).
#
# The official Flower images run as uid 49999: before `docker compose up`, make the private keys
# readable for it:  sudo chown -R 49999:49999 certs   (the .crt/.pem/.pub files stay world-readable).
set -euo pipefail

nodes="${NUM_SUPERNODES:-2}"
out="certs"
force=0
hosts=(localhost 127.0.0.1 superlink)
days=365

while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --host) hosts+=("$2"); shift 2 ;;
    --days) days="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gen-certs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$nodes" in ''|*[!0-9]*) echo "gen-certs.sh: --nodes needs a number, got '$nodes'" >&2; exit 2 ;; esac
case "$days" in ''|*[!0-9]*) echo "gen-certs.sh: --days needs a number, got '$days'" >&2; exit 2 ;; esac

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "gen-certs.sh: $python is required (set PYTHON)" >&2; exit 1; }
"$python" -c "import cryptography" 2>/dev/null || {
  echo "gen-certs.sh: $python cannot import cryptography (pip install cryptography, or install fedsb)" >&2
  exit 1
}

# This checkout's fedsb first on the path, so the script works without installing the project.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
args=(certs "$out" --nodes "$nodes" --days "$days")
for h in "${hosts[@]}"; do args+=(--host "$h"); done
if [ "$force" != 1 ]; then args+=(--keep-existing); fi
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m fedsb.ops.deploy "${args[@]}"
