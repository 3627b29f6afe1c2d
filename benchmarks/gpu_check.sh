#!/usr/bin/env bash
# The one-call GPU check: GPU tests + ViT-B-32 bf16 figures, on a GPU machine that reaches no registry.
#
#   bash benchmarks/gpu_wheels.sh gpu_wheels        # here: the wheels that machine lacks (~26 MB)
#   bash benchmarks/gpu_check.sh                     # there (device tool, carry gpu_wheels): writes to $OUT
#   bash benchmarks/gpu_check.sh --dry-run           # here, on CPU: every step, tiny model, GPU parts skip
#
# Installs the carried wheels without dependencies into a venv that sees the machine's own torch
# (--system-site-packages), runs tests/test_gpu.py, then benchmarks/gpu_bench.py. Writes at most
# 6 files to $OUT: env.txt, test_gpu.txt, gpu_bench.json, train_log.jsonl, train_output.txt, check.txt.
# Budget: one device call of at most 9 minutes; each step has its own timeout so a hang still reports.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; [[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$(mktemp -d)}
WHEELS=${WHEELS:-gpu_wheels}
mkdir -p "$OUT"
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/check.txt"; }

if [[ $DRY == 1 ]]; then
  PY=${PYTHON:-.venv/bin/python}          # the project's own venv: nothing to install
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=
  say "dry run on $(nproc) CPU cores with $PY"
else
  PY=/tmp/multiclip-gpu-venv/bin/python
  if [[ ! -x $PY ]]; then
    python3 -m venv --system-site-packages /tmp/multiclip-gpu-venv || { say "venv failed"; exit 1; }
  fi
  [[ -d $WHEELS ]] || { say "no wheel folder $WHEELS (make it with benchmarks/gpu_wheels.sh and carry it)"; exit 1; }
  # --no-deps: the wheels are exactly the missing set; nothing may replace the machine's torch
  $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl 2>&1 | tail -3 | tee -a "$OUT/check.txt"
fi
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/multiclip-torch-ext} RAY_AUTH_MODE=disabled

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  $PY - <<'EOF'
import importlib, platform
import training  # noqa: F401  (torchvision compatibility before open_clip, as every entry point does)
print("python", platform.python_version())
for name in ("torch", "deepspeed", "open_clip", "webdataset", "onnxruntime", "onnx", "transformers", "pydantic"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:  # noqa: BLE001  (report, do not stop)
        print(name, "MISSING", type(err).__name__, err)
import onnxruntime, torch
print("onnxruntime providers", onnxruntime.get_available_providers())
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
say "environment: $(grep -c MISSING "$OUT/env.txt") missing module(s); see env.txt"

say "tests/test_gpu.py"
timeout 240 $PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py > "$OUT/test_gpu.txt" 2>&1
say "tests: rc=$? $(tail -1 "$OUT/test_gpu.txt")"

say "benchmarks/gpu_bench.py"
if [[ $DRY == 1 ]]; then BENCH=(--dry-run); else BENCH=(); fi
timeout 270 $PY benchmarks/gpu_bench.py --out "$OUT" "${BENCH[@]}" > /dev/null 2>> "$OUT/check.txt"
status=$?
say "bench: rc=$status"
exit $status
