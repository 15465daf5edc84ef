# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

# The offline TTS corpus (w2v2 make-corpus) needs these Debian packages; `corpus-deps` installs them.
# The festvox voices of other languages speak the corpus's unlabeled split (pretraining only).
TTS_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox bible-kjv \
  festvox-ca-ona-hts festvox-czech-dita festvox-czech-machac festvox-suopuhe-lj festvox-suopuhe-mv \
  festvox-italp16k festvox-itapc16k
FESTIVAL_VOICES := /usr/share/festival/voices
TTS_VOICE_DIRS := $(addprefix $(FESTIVAL_VOICES)/,us/cmu_us_slt_arctic_hts catalan/upc_ca_ona_hts czech/czech_dita \
  czech/czech_machac finnish/suo_fi_lj_diphone finnish/hy_fi_mv_diphone italian/lp_diphone italian/pc_diphone)

.PHONY: install corpus-deps test-deps test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -e '.[test]'
	# pyctcdecode pins numpy<2 in every release (jax needs numpy>=2) but runs with it: no deps.
	$(PY) -m pip install --no-deps pyctcdecode pygtrie
	# libtpu (the TPU compiler for `w2v2 compile-check` and its tests) at the installed jax's version.
	$(PY) -m pip install "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $(STAMP)

install: $(STAMP)

# apt_install PROGRAMS PACKAGES WHY [PATHS]: install the Debian packages when a program or path is missing
# (root or sudo -n).
define apt_install
	@missing=""; \
	for prog in $(1); do command -v $$prog >/dev/null || missing="$$missing $$prog"; done; \
	for path in $(4); do [ -e $$path ] || missing="$$missing $$path"; done; \
	if [ -n "$$missing" ]; then \
	  echo "$(3): missing$$missing; installing $(2) with apt-get"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(2) >/dev/null; } || { \
	    echo "$(3): could not install $(2) (needs apt-get and root or passwordless sudo)."; \
	    echo "Install these Debian/Ubuntu packages by hand: $(2)"; \
	    exit 1; }; \
	fi
endef

corpus-deps:
	$(call apt_install,espeak-ng flite text2wave sox bible,$(TTS_PACKAGES),corpus-deps,$(TTS_VOICE_DIRS))

# The tests run the audio fallback decoder (librosa -> audioread -> ffmpeg) for real, as on Colab.
test-deps:
	$(call apt_install,ffmpeg,ffmpeg,test-deps)

test: $(STAMP) corpus-deps test-deps
	$(PY) -m pytest -n 2 --dist loadfile -q

bench: $(STAMP)
	$(PY) benchmarks/pretrain_step.py

# make demo [SCALE=0.3] [HOURS=1] [UNLABELED=1] [SEED=0] [COMPARE=1]: SCALE multiplies the training updates
# (1: about 41 min on 2 cores); UNLABELED: hours of audio only pretraining hears (default: HOURS); COMPARE=1
# adds the baselines (random initialisation, 10 labeled minutes, probes: about 70 min more on 2 cores).
SCALE ?= 1
HOURS ?= 1
UNLABELED ?=
SEED ?= 0
COMPARE ?=
demo: $(STAMP) corpus-deps
	$(VENV)/bin/w2v2 demo --out=runs/demo --corpus=data/tts_corpus --hours=$(HOURS) --scale=$(SCALE) --seed=$(SEED) \
	  $(if $(UNLABELED),--unlabeled_hours=$(UNLABELED)) $(if $(COMPARE),--compare)

clean:
	rm -rf $(VENV) build *.egg-info
