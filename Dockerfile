# multiclip for GPU nodes: CUDA runtime, the pinned torch (CUDA build), DeepSpeed, the project.
# Build:  docker build -t multiclip:0.1 .
# Run:    docker run --gpus all --ipc=host -v $PWD/data:/app/data -v $PWD/runs:/app/runs multiclip:0.1 \
#           deepspeed --num_gpus 8 launch/train.py --config configs/retrieval_tiny.yaml
# Not built here: the development machine has no Docker engine (see README, "Docker").
FROM nvidia/cuda:13.0.0-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/app/.cache/torch_extensions
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev g++ git openssh-client pdsh libnuma-dev numactl \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# torch first (the CUDA 13.0 build of the same 2.13.0 release), then the pinned rest and the GPU extra.
RUN pip install torch==2.13.0 torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cu130
COPY pyproject.toml README.md constraints.txt ./
COPY training training
COPY serving serving
COPY shards shards
# onnxruntime and onnxruntime-gpu install the same module: keep only the GPU one.
RUN pip install -c constraints.txt -e ".[gpu]" \
    && pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1
COPY launch launch
COPY configs configs
COPY benchmarks benchmarks

CMD ["python", "launch/train.py", "--help"]
