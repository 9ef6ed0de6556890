# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install the package and the Debian data packages when
# they are missing, then run the main job or the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/ondevice_demo
# The speech engines of ondevice/data/engines: the default corpus needs only
# espeak-ng; Flite, Festival and the festvox voices make the multi-engine
# populations (config.data.population) and run in their tests. Together they
# add about 64 MB of downloads and 20 s of apt-get install.
FESTVOX := festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts \
  festvox-ca-ona-hts festvox-czech-krb festvox-czech-ph festvox-suopuhe-lj \
  festvox-suopuhe-mv festvox-italp16k festvox-itapc16k
DEB_PACKAGES := espeak-ng dataset-fashion-mnist flite festival $(FESTVOX)

.PHONY: demo test setup apt clean

apt:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tfds]'
	touch $@

setup: apt $(VENV)/.installed

# The main job: federated keyword spotting, every synthesised speaker a client
# (configs/fed_kws.py); the centralised baseline is configs/kws_central.py.
demo: setup
	$(PY) -m experiments.federated --config=configs/fed_kws.py --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV)
