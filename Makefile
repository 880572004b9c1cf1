# Quick start: `make run` (set up, migrate, import demo nodes, run on loopback) and
# `make test`.  Everything lands in .venv and ./var.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONF ?= conf/metadatad.conf
PYTEST_ARGS ?=

.PHONY: run test lint bench clean deb

$(BIN)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt \
		--config-settings editable_mode=compat --editable '.[test,dev]'
	@# compat mode puts the checkout on sys.path, where twistd finds twisted/plugins.
	touch $@

var/admin-token:
	mkdir -p var
	umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))' > $@

run: $(BIN)/.installed var/admin-token
	$(BIN)/metadatad-manage --config $(CONF) db upgrade
	$(BIN)/metadatad-manage --config $(CONF) node import conf/demo-nodes.json
	@echo "metadata: http://127.0.0.1:8775/  admin: http://127.0.0.1:8776/ (token in var/admin-token)"
	$(BIN)/twistd --nodaemon --pidfile= metadatad --config $(CONF)

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check metadatad tests bench twisted
	$(BIN)/mypy metadatad
	$(BIN)/lint-imports

bench: $(BIN)/.installed
	$(BIN)/python bench/http.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# The Debian package, built from a copy of the committed and working-tree files (never
# .venv or var), so the source tree stays clean; the .deb lands in $(DEB_OUT).
DEB_OUT ?= $(abspath ..)/metadatad-deb
deb:
	rm -rf $(DEB_OUT)/src && mkdir -p $(DEB_OUT)/src/metadatad
	git ls-files -z --cached --others --exclude-standard \
		| tar --null --files-from=- --ignore-failed-read -cf - \
		| tar -xf - -C $(DEB_OUT)/src/metadatad
	cd $(DEB_OUT)/src/metadatad && dpkg-buildpackage -us -uc -b
	mv $(DEB_OUT)/src/*.deb $(DEB_OUT)/src/*.buildinfo $(DEB_OUT)/src/*.changes $(DEB_OUT)/
	rm -rf $(DEB_OUT)/src
	@ls -1 $(DEB_OUT)/*.deb
