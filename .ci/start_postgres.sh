#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the autotune storage tests, and print its URL.
#   eval "$(bash .ci/start_postgres.sh)"   # exports QWEN3EXPORT_TEST_PG_URL
# Installs Debian's postgresql with apt-get when missing (CI runs as root). The cluster lives under /tmp and
# listens on loopback only; the server runs as the unprivileged `postgres` user (initdb refuses root).
set -euo pipefail

PORT="${QWEN3EXPORT_PG_PORT:-55432}"
DATA="${QWEN3EXPORT_PG_DATA:-/tmp/qwen3export-pg}"
DB=qwen3export_tune

find_bin() {  # newest installed server version's bin dir
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

BIN="$(find_bin)"
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  echo "installing postgresql with apt-get ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  BIN="$(find_bin)"
fi
id postgres >/dev/null 2>&1 || useradd --system --home-dir "$DATA" postgres

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if ! as_postgres "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  rm -rf "$DATA"
  mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] && chown postgres "$DATA"
  as_postgres "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
  # loopback only, socket in the data dir (no /var/run permissions needed), small footprint
  as_postgres "$BIN/pg_ctl" -D "$DATA" -w -l "$DATA/server.log" \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c max_connections=50 -c shared_buffers=32MB -c fsync=off" \
    start >/dev/null
fi
if ! as_postgres "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" \
    | grep -q 1; then
  as_postgres "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
fi
URL="postgresql://postgres@127.0.0.1:$PORT/$DB"
echo "export QWEN3EXPORT_TEST_PG_URL=$URL"
