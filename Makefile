# `make demo` trains and dissects a small spectrum on built-in data; `make test` runs the tests.
# Both create (or reuse) the virtual environment .venv in this checkout and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the torch build this project is developed and tested with; override for another platform
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# keras_vib without torch, on JAX: its own environment, as a Keras-only user installs it
NOTORCH_VENV ?= .venv-keras-notorch
NOTORCH_STAMP := $(NOTORCH_VENV)/.installed
KERAS_TESTS := $(wildcard tests/test_keras_*.py)
NOTORCH_TESTS := tests/test_keras_layers.py tests/test_keras_model.py tests/test_keras_torchfree.py

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[torch,keras,dev]'
	touch $(STAMP)

$(NOTORCH_STAMP): pyproject.toml
	test -x $(NOTORCH_VENV)/bin/python || $(PYTHON) -m venv $(NOTORCH_VENV)
	$(NOTORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(NOTORCH_VENV)/bin/python -m pip install -q -e '.[keras,jax]' 'pytest>=8' 'pytest-timeout>=2'
	touch $(NOTORCH_STAMP)

demo: $(STAMP)
	$(VENV)/bin/timm-vib demo $(ARGS)

# everything with the Keras tests on the torch backend; the Keras tests again on JAX and on TensorFlow
# (timm, on torch, stays their reference); then keras_vib where torch is not installed
test: $(STAMP) $(NOTORCH_STAMP)
	KERAS_BACKEND=torch $(PY) -m pytest -q $(ARGS)
	KERAS_BACKEND=jax $(PY) -m pytest -q $(KERAS_TESTS)
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q $(KERAS_TESTS)
	KERAS_BACKEND=jax $(NOTORCH_VENV)/bin/python -m pytest -q $(NOTORCH_TESTS)

clean:
	rm -rf $(VENV) $(NOTORCH_VENV) build *.egg-info
