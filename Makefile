# Two commands a new user runs on a fresh machine:
#   make demo   set up .venv, generate shards, train on 2 ranks with DeepSpeed, evaluate
#   make test   set up .venv, run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RANKS ?= 2
DEMO_TASKS ?= retrieval time geo_time
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo test bench-venv bench-train clean

setup: $(STAMP)

# torch==2.13.0 first, so no later requirement can swap in a CUDA build; the constraint holds it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# per task: synthetic shards -> 2-rank DeepSpeed training -> evaluation of the saved weights -> table
demo: $(STAMP)
	@for task in $(DEMO_TASKS); do \
	  set -e; \
	  $(PY) -m shards.synth --out data/synth/$$task --task $$task --train 6000 --val 500 --seed 0 --overwrite; \
	  $(VENV)/bin/deepspeed --num_gpus $(RANKS) launch/train.py --config configs/$${task}_tiny.yaml; \
	  $(PY) launch/evaluate.py --config configs/$${task}_tiny.yaml --checkpoint runs/$${task}_tiny \
	    --out runs/$${task}_tiny/eval.json > /dev/null; \
	done
	@for task in $(DEMO_TASKS); do $(PY) launch/report.py runs/$${task}_tiny; echo; done

test: $(STAMP)
	$(PY) -m pytest -q tests

# open_clip's own trainer needs webdataset<=0.2.86, so the comparison runs it from its own venv
bench-venv: .cache/bench/openclip-venv/.installed
.cache/bench/openclip-venv/.installed:
	$(PYTHON) -m venv .cache/bench/openclip-venv
	.cache/bench/openclip-venv/bin/pip install --quiet torch==2.13.0
	.cache/bench/openclip-venv/bin/pip install --quiet -c constraints.txt "open_clip_torch[training]==3.3.0" "webdataset<=0.2.86"
	touch $@

bench-train: $(STAMP) bench-venv
	$(PY) benchmarks/train_throughput.py --steps 150 --rounds 2

clean:
	rm -rf data runs .cache
