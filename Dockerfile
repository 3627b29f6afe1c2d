# multiclip for GPU nodes: Ubuntu 24.04's Python 3.12, torch 2.13.0 (CUDA 13.0), DeepSpeed, the project,
# onnxruntime-gpu (its one onnxruntime build) and TensorRT 10 for onnxruntime's TensorRT provider.
# Build:  docker build -t multiclip:0.1 .
# Run:    docker run --gpus all --ipc=host -v $PWD/data:/app/data -v $PWD/runs:/app/runs multiclip:0.1 \
#           deepspeed --num_gpus 8 launch/train.py --config configs/retrieval_tiny.yaml
# Not built here: the development machine has no Docker engine; tests/test_dockerfile.py parses this
# file instead (base tag, apt packages, pins, one onnxruntime build). See README, "Docker".
#
# Base: CUDA's "base" flavour (libcudart, the forward-compatibility libraries, the NVIDIA_* variables
# the container toolkit reads), not "runtime" or "devel". torch 2.13.0's wheel brings every CUDA
# library it and onnxruntime-gpu load (nvidia-* wheels: cuBLAS, cuFFT, cuRAND, cuDNN 9, NCCL ...), so
# a runtime or devel base would only add second copies. No nvcc is needed: DeepSpeed JIT-builds an op
# only when it is used, and on CUDA the trainer uses torch's AdamW (no fused_adam) and NCCL (no shm
# comm op); the CPU-only ops it can still build need just g++ and Python's headers. 13.0.3 is the
# CUDA 13.0 update torch 2.13.0's wheel pins (cuda-toolkit==13.0.3), so the one duplicate (libcudart)
# is the same release.
FROM nvidia/cuda:13.0.3-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/app/.cache/torch_extensions
# python3 is 3.12 on 24.04. gcc/g++ + python3-dev: DeepSpeed's JIT ops and Triton's launcher stubs;
# pdsh + openssh-client: DeepSpeed's multi-node launcher; numactl: its --bind_cores_to_rank;
# ca-certificates: TLS for the TensorRT placeholder package's download.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc g++ ca-certificates openssh-client pdsh numactl \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# torch first, alone (PyPI's 2.13.0 is the CUDA 13.0 build; constraints.txt then holds it).
RUN pip install torch==2.13.0
COPY pyproject.toml README.md constraints.txt ./
COPY training training
COPY serving serving
COPY shards shards
# The pinned rest, onnxruntime-gpu ("gpu": the image's only onnxruntime build; "cpu" is never added)
# and TensorRT 10 ("tensorrt"; its PyPI package fetches NVIDIA's wheel during this step).
RUN pip install -c constraints.txt -e ".[train,gpu,tensorrt]"
# onnxruntime loads CUDA, cuDNN and TensorRT by soname and the pip wheels sit in site-packages, off
# the loader's path: list every folder of theirs for ld.so, then fail the build if onnxruntime's
# CUDA or TensorRT provider still misses a library (libcuda.so.1 is the driver's, mounted at run
# time), if a second onnxruntime build got in, or if torch is not a CUDA 13 build.
RUN python -c "import importlib.util, pathlib; sp = pathlib.Path(importlib.util.find_spec('torch').origin).parents[1]; \
dirs = sorted({str(f.parent) for top in ('nvidia', 'tensorrt_libs') for f in (sp / top).rglob('lib*.so*')}); \
pathlib.Path('/etc/ld.so.conf.d/zz-multiclip-pip-libs.conf').write_text(''.join(d + '\n' for d in dirs))" \
    && ldconfig \
    && capi=$(python -c "import importlib.util as u; print(u.find_spec('onnxruntime').submodule_search_locations[0])")/capi \
    && test -f "$capi/libonnxruntime_providers_cuda.so" && test -f "$capi/libonnxruntime_providers_tensorrt.so" \
    && ! ldd "$capi/libonnxruntime_providers_cuda.so" "$capi/libonnxruntime_providers_tensorrt.so" \
         | grep "not found" | grep -v "libcuda\.so\.1" \
    && python -c "import importlib.metadata as m, torch; \
builds = sorted({d.metadata['Name'].lower() for d in m.distributions() if d.metadata['Name'].lower().startswith('onnxruntime')}); \
assert builds == ['onnxruntime-gpu'], builds; assert (torch.version.cuda or '').startswith('13.'), torch.version.cuda"
COPY launch launch
COPY configs configs
COPY benchmarks benchmarks

CMD ["python", "launch/train.py", "--help"]
