"""onnxruntime sessions for exported graphs: provider choice, TensorRT / CUDA options, IO binding.

Providers are tried in the order TensorRT -> CUDA -> CPU; each one that this onnxruntime build
lacks is logged once in one line, so a slow run on the wrong provider is never silent.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

LOG = logging.getLogger("multiclip.serving")
PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SHORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_reported: set[str] = set()


@dataclass(frozen=True)
class RuntimeOptions:
    providers: tuple[str, ...] = ("tensorrt", "cuda", "cpu")  # wanted, in order of preference
    fp16: bool = False  # load <graph>.fp16.onnx where exported; TensorRT builds fp16 engines
    int8: bool = False  # load <graph>.int8.onnx where exported (the towers; for CPUs)
    trt_cache_dir: str | None = None  # TensorRT engine cache (default: <export>/trt_cache)
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 1
    optimization: str = "all"  # disable | basic | extended | all
    device_id: int = 0


OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def choose_providers(options: RuntimeOptions, cache_dir: Path) -> list[tuple[str, dict]]:
    """The wanted providers this build has, with their options; one log line per missing one."""
    unknown = [p for p in options.providers if p not in SHORT_NAMES]
    if unknown:
        raise ValueError(f"unknown execution provider(s) {unknown}; choose from {sorted(SHORT_NAMES)}")
    available = set(ort.get_available_providers())
    chosen = []
    for short in options.providers:
        name = SHORT_NAMES[short]
        if name not in available:
            if name not in _reported:
                _reported.add(name)
                LOG.warning("onnxruntime %s has no %s (available: %s); not using it",
                            ort.__version__, name, ", ".join(sorted(available)))
            continue
        chosen.append((name, provider_options(name, options, cache_dir)))
    if not chosen:
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


def provider_options(name: str, options: RuntimeOptions, cache_dir: Path) -> dict:
    if name == "TensorrtExecutionProvider":
        cache = Path(options.trt_cache_dir) if options.trt_cache_dir else cache_dir
        cache.mkdir(parents=True, exist_ok=True)
        return {"device_id": options.device_id, "trt_fp16_enable": options.fp16,
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
    if name == "CUDAExecutionProvider":
        return {"device_id": options.device_id, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    return {}


def session_options(options: RuntimeOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[options.optimization]
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3
    return so


class Session:
    """One graph in onnxruntime; ``run(**inputs)`` returns ``{output name: array}``.

    On CUDA (and TensorRT) the inputs are bound to device memory and the outputs are allocated there
    with IO binding, then copied back once, so there are no extra host copies per call.
    """

    def __init__(self, path: str | Path, options: RuntimeOptions = RuntimeOptions()):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX graph not found: {path}")
        providers = choose_providers(options, path.parent / "trt_cache")
        so = session_options(options)
        if path.name.endswith(".fp16.onnx") and providers[0][0] == "CPUExecutionProvider" \
                and so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            LOG.warning("%s on CPU: graph optimisation capped at 'extended' (onnxruntime %s's CPU layout "
                        "passes crash on fp16 graphs; fp16 pays off on GPUs only)", path.name, ort.__version__)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        self.session = ort.InferenceSession(str(path), so,
                                            providers=[p for p, _ in providers],
                                            provider_options=[o for _, o in providers])
        self.path = path
        self.providers = self.session.get_providers()
        self.device_id = options.device_id
        self.on_gpu = self.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.path.name}: missing input(s) {missing}")
        if not self.on_gpu:
            return dict(zip(self.output_names, self.session.run(None, {n: inputs[n] for n in self.input_names})))
        binding = self.session.io_binding()
        for name in self.input_names:
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(inputs[name]), "cuda", self.device_id)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

