#!/usr/bin/env bash
# `make run`: a private Redis (AOF on, data under var/), migrations on SQLite, the demo
# school, the provider on :8000, the demo portal app on :8001, the background worker and a
# local SMTP sink that prints every mail. Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var/redis
[ -s var/secret_key ] || (umask 077; .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(48))' > var/secret_key)
export IDP_SECRET_KEY="${IDP_SECRET_KEY:-$(cat var/secret_key)}"
export IDP_REDIS_URL="${IDP_REDIS_URL:-redis://127.0.0.1:6380/0}"
export IDP_DATABASE_URL="${IDP_DATABASE_URL:-sqlite:///$PWD/var/darbaza.sqlite3}"
export IDP_ISSUER="${IDP_ISSUER:-http://127.0.0.1:8000}"
pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped"
}
trap cleanup INT TERM EXIT

if .venv/bin/python -c "import redis,sys; redis.Redis.from_url('$IDP_REDIS_URL').ping()" 2>/dev/null; then
  echo "Redis already answers at $IDP_REDIS_URL; reusing it"
else
  redis-server --bind 127.0.0.1 --port 6380 --dir "$PWD/var/redis" --appendonly yes \
    --save "" --daemonize no --logfile "$PWD/var/redis/redis.log" &
  pids+=($!)
  for _ in $(seq 50); do
    .venv/bin/python -c "import redis; redis.Redis(port=6380).ping()" 2>/dev/null && break; sleep 0.1
  done
fi
.venv/bin/darbaza db upgrade
.venv/bin/darbaza demo seed --out var --demo-app-url http://127.0.0.1:8001
.venv/bin/darbaza serve --bind 127.0.0.1:8000 --workers "${IDP_WORKERS:-2}" &
pids+=($!)
# Mail goes to a local sink that prints each message and keeps it in var/mail/*.eml.
export IDP_SMTP_HOST="${IDP_SMTP_HOST:-127.0.0.1}" IDP_SMTP_PORT="${IDP_SMTP_PORT:-8025}"
.venv/bin/darbaza mail sink --port "$IDP_SMTP_PORT" --out var/mail &
pids+=($!)
.venv/bin/darbaza worker &
pids+=($!)
DEMO_CLIENT_FILE=var/demo-client.json .venv/bin/gunicorn --bind 127.0.0.1:8001 --workers 1 --threads 4 \
  --worker-class gthread --no-control-socket 'examples.demo_portal:create_app()' &
pids+=($!)
echo
echo "Darbaza:      http://127.0.0.1:8000/.well-known/openid-configuration"
echo "Demo portal:  http://127.0.0.1:8001  (sign in with a demo login above; Ctrl-C stops everything)"
echo "Mail:         printed in this console and kept in var/mail/*.eml (SMTP sink on 127.0.0.1:$IDP_SMTP_PORT)"
wait -n "${pids[@]}"
