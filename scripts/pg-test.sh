#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the test suite, run as an unprivileged user
# (PostgreSQL refuses to run as root). Usage: scripts/pg-test.sh start DIR PORT | stop DIR
set -euo pipefail
cmd=$1; dir=$2
bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
runas=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  runas=(runuser -u postgres --)
fi
case "$cmd" in
  start)
    port=$3
    rm -rf "$dir"; mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    "${runas[@]}" "$bindir/initdb" -D "$dir/data" -U darbaza --auth=trust -E UTF8 >/dev/null
    # Tests trade durability for speed; benchmarks (PG_DURABLE=1) keep PostgreSQL's defaults.
    fast="-c fsync=off -c synchronous_commit=off"
    [ "${PG_DURABLE:-0}" = 1 ] && fast=""
    "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 $fast -c max_connections=200" start >/dev/null
    "${runas[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U darbaza darbaza_test
    echo "postgresql+psycopg://darbaza@127.0.0.1:$port/darbaza_test"
    ;;
  stop)
    [ -d "$dir/data" ] && "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
esac
