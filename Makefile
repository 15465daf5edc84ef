# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: install test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -e '.[test]'
	# pyctcdecode pins numpy<2 in every release (jax needs numpy>=2) but runs with it: no deps.
	$(PY) -m pip install --no-deps pyctcdecode pygtrie
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

bench: $(STAMP)
	$(PY) benchmarks/pretrain_step.py

demo: $(STAMP)
	@echo "make demo: the end-to-end demo (corpus, pretraining, fine-tuning) is not built yet; see issue 5."

clean:
	rm -rf $(VENV) build *.egg-info
