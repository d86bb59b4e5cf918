#!/usr/bin/env bash
# The whole suite: once on SQLite (with the browser test), once on PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
pgdir=$(mktemp -d /tmp/darbaza-pg.XXXXXX)
trap 'scripts/pg-test.sh stop "$pgdir"' EXIT
port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pg_url=$(scripts/pg-test.sh start "$pgdir" "$port")
workers=${PYTEST_WORKERS:-2}
echo "== SQLite =="
DARBAZA_TEST_DB=sqlite $PY -m pytest -n "$workers" --dist loadfile "$@"
echo "== PostgreSQL =="
DARBAZA_TEST_DB="$pg_url" $PY -m pytest -n "$workers" --dist loadfile -m "not browser" "$@"
