# Two commands from a fresh clone on a fresh Debian machine (as root): `make demo`, `make test`.
# Each does its own set-up: host packages, virtualenv, Docker engine, node image.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export DEBIAN_FRONTEND := noninteractive

.PHONY: demo test host-packages venv docker image lint clean

demo: image
	$(BIN)/fab demo

# Lint and type check first (seconds), then every test: unit tests, and integration tests on a
# real local cluster. `pytest -m "not integration"` runs the fast part alone.
test: lint image
	$(BIN)/pytest

# Host tools the local cloud drives: the Docker engine, debootstrap (node image without a
# registry), ssh (Ansible's transport) and losetup (data disks).
host-packages:
	@missing=""; \
	command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	command -v losetup >/dev/null || missing="$$missing util-linux"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

docker: host-packages venv
	$(BIN)/python -m infra.clouds.local engine

image: docker
	$(BIN)/python -m infra.clouds.local image

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/ansible-playbook --syntax-check -i localhost, playbooks/site.yml

clean:
	rm -rf $(VENV) runs
