# Two commands a new user runs on a fresh machine:
#   make demo   set up .venv, generate shards, train all heads on 2 ranks with DeepSpeed, evaluate, export ONNX, infer
#   make test   set up .venv, run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RANKS ?= 2
DEMO := runs/all_heads_tiny
# task:train:val sizes of the synthetic shard sets the all-heads demo trains on
DEMO_DATA := retrieval:6000:500 time:6000:500 geo_time:6000:500 contextual:2000:300 meme:4000:500
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo test bench-venv bench-train clean

setup: $(STAMP)

# torch==2.13.0 first, so no later requirement can swap in a CUDA build; the constraint holds it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[train,cpu,dev]"
	touch $(STAMP)

# synthetic shards for every head -> one 2-rank DeepSpeed job training all five heads -> evaluation of the
# saved weights -> ONNX export (parity-checked) -> torch-free batch inference -> Grad-CAM overlays -> one table per task
demo: $(STAMP)
	@set -e; for spec in $(DEMO_DATA); do \
	  task=$${spec%%:*}; sizes=$${spec#*:}; \
	  $(PY) -m shards.synth --out data/synth/$$task --task $$task --train $${sizes%%:*} --val $${sizes#*:} \
	    --seed 0 --shard-size 250 --overwrite; \
	done
	$(VENV)/bin/deepspeed --num_gpus $(RANKS) --master_port $$($(PY) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
	  launch/train.py --config configs/all_heads_tiny.yaml
	$(PY) launch/evaluate.py --config configs/all_heads_tiny.yaml --checkpoint $(DEMO) --out $(DEMO)/eval.json > /dev/null
	$(PY) launch/export.py --checkpoint $(DEMO) --out $(DEMO)/onnx > /dev/null
	@set -e; for spec in $(DEMO_DATA); do task=$${spec%%:*}; \
	  $(PY) launch/infer.py --model $(DEMO)/onnx --shards data/synth/$$task/val --tasks $$task \
	    --out $(DEMO)/predictions/$$task; \
	done
	$(PY) launch/cam.py --checkpoint $(DEMO) --shards data/synth/retrieval/val --count 2 --out $(DEMO)/cam > /dev/null
	$(PY) launch/report.py $(DEMO)

# 2 workers, each module's tests on one (its module fixtures are built once); see tests/conftest.py
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

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
