"""onnxruntime sessions for exported graphs: provider choice, TensorRT / CUDA options, IO binding.

Providers are asked for in the order given (default TensorRT -> CUDA -> CPU), and a session says
what it really runs on: after it is created, ``session.get_providers()`` is compared with the
request, and every requested GPU provider that is not in use is one WARNING line (once per process
and reason) and one entry of ``Session.fallbacks`` ({provider, reason}), which serving/infer.py
writes to summary.json. The two reasons a GPU provider drops out:

* ``not in this onnxruntime build``: the CPU wheel (``onnxruntime``) has neither CUDA nor TensorRT;
* ``listed by onnxruntime but not loaded``: onnxruntime-gpu lists CUDA and TensorRT whenever it is
  installed, but their CUDA / cuDNN / TensorRT libraries may be missing or of the wrong version;
  onnxruntime then quietly runs the graph on the CPU. Each listed GPU provider is probed once per
  process on a one-node graph (after ``onnxruntime.preload_dlls()``, which loads CUDA and cuDNN from
  the nvidia-* pip wheels), so the real session is planned on what will load.

``RuntimeOptions(require_gpu=True)`` raises :class:`ProviderError` instead of falling back.
fp16 graphs on the CPU get graph optimisation capped at 'extended' (onnxruntime's CPU layout passes
crash on them at session creation); that is decided on the providers that will be in use, not on the
request. Only the towers (``allow_tensorrt=True``) go to TensorRT, with profile shapes for their
dynamic batch axis (min 1, opt ``trt_opt_batch``, max ``trt_max_batch``) and engine and timing
caches, so TensorRT builds one engine instead of one per new batch size; the small head graphs run
on CUDA (and the CPU).
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

try:
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail
except ImportError:  # pragma: no cover  (older onnxruntime)
    EPFail = RuntimeError

LOG = logging.getLogger("multiclip.serving")
SHORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU = "CPUExecutionProvider"
NOT_IN_BUILD = "not in this onnxruntime build"
NOT_LOADED = "listed by onnxruntime but not loaded: its CUDA/cuDNN/TensorRT libraries are missing or mismatched"
_reported: set[tuple[str, str]] = set()  # (provider, reason) already logged in this process
_probes: dict[tuple[str, int], str | None] = {}  # (provider, device) -> None (loads) or why it does not
_preloaded: list[bool] = []


class ProviderError(RuntimeError):
    """A requested GPU provider is not in use and ``require_gpu`` is set."""


@dataclass(frozen=True)
class RuntimeOptions:
    providers: tuple[str, ...] = ("tensorrt", "cuda", "cpu")  # wanted, in order of preference
    fp16: bool = False  # load <graph>.fp16.onnx where exported; TensorRT builds fp16 engines
    int8: bool = False  # load <graph>.int8.onnx where exported (the towers; for CPUs)
    trt_cache_dir: str | None = None  # TensorRT engine and timing caches (default: <export>/trt_cache)
    trt_opt_batch: int = 64  # TensorRT profile: the batch size the engine is tuned for
    trt_max_batch: int = 256  # TensorRT profile: the largest batch the engine takes (min is 1)
    require_gpu: bool = False  # raise ProviderError when a requested GPU provider is not in use
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 1
    optimization: str = "all"  # disable | basic | extended | all
    device_id: int = 0


OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
LEVEL_NAMES = {v: k for k, v in OPT_LEVELS.items()}


# --------------------------------------------------------------------------- which providers


def requested_providers(options: RuntimeOptions, allow_tensorrt: bool = True) -> list[str]:
    """The full provider names asked for one graph, in order; without TensorRT, it becomes CUDA (heads)."""
    unknown = [p for p in options.providers if p not in SHORT_NAMES]
    if unknown:
        raise ValueError(f"unknown execution provider(s) {unknown}; choose from {sorted(SHORT_NAMES)}")
    names = []
    for short in options.providers:
        name = SHORT_NAMES[short]
        if name == "TensorrtExecutionProvider" and not allow_tensorrt:
            name = "CUDAExecutionProvider"
        if name not in names:
            names.append(name)
    return names


def preload_gpu_libraries() -> None:
    """``onnxruntime.preload_dlls()`` once per process, where it exists (onnxruntime-gpu >= 1.21)."""
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded.append(True)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ort.preload_dlls()
    except Exception as err:  # noqa: BLE001  (preloading only helps; the probe says what loads)
        LOG.info("onnxruntime.preload_dlls() failed: %s", err)
    if printed.getvalue().strip():
        LOG.info("onnxruntime.preload_dlls(): %s", " ".join(printed.getvalue().split()))


def _probe_model() -> bytes:
    """A one-node graph (Identity on a float [1]) in memory."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def probe_provider(name: str, device_id: int = 0) -> str | None:
    """None when ``name`` really loads (a session on a one-node graph keeps it), else the reason; cached."""
    key = (name, device_id)
    if key not in _probes:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            session = ort.InferenceSession(_probe_model(), so, providers=[name, CPU],
                                           provider_options=[{"device_id": device_id}, {}], enable_fallback=0)
            _probes[key] = None if name in session.get_providers() else NOT_LOADED
        except Exception as err:  # noqa: BLE001  (any failure to create it is the reason)
            _probes[key] = f"could not be created: {_one_line(err)}"
    return _probes[key]


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _report(graph: str, provider: str, reason: str, running_on: Sequence[str]) -> None:
    """One WARNING line per (provider, reason) and process: the rest is in summary.json."""
    if (provider, reason) in _reported:
        return
    _reported.add((provider, reason))
    if reason.startswith(NOT_IN_BUILD):
        LOG.warning("onnxruntime %s has no %s (%s; available: %s): %s and later graphs that ask for it run on %s",
                    ort.__version__, provider, NOT_IN_BUILD, ", ".join(sorted(ort.get_available_providers())),
                    graph, ", ".join(running_on))
    else:
        LOG.warning("%s: requested %s is not in use (%s); running on %s", graph, provider, reason,
                    ", ".join(running_on))


def plan_providers(requested: Sequence[str], device_id: int = 0) -> tuple[list[str], list[dict[str, str]]]:
    """(providers expected to load, in order; [{provider, reason}] of the requested ones that will not)."""
    available = set(ort.get_available_providers())
    gpu_wanted = [p for p in requested if p in GPU_PROVIDERS and p in available]
    if gpu_wanted:
        preload_gpu_libraries()
    chosen, fallbacks = [], []
    for name in requested:
        if name not in available:
            fallbacks.append({"provider": name, "reason": f"{NOT_IN_BUILD} (onnxruntime {ort.__version__})"})
            continue
        why = probe_provider(name, device_id) if name in GPU_PROVIDERS else None
        if why:
            fallbacks.append({"provider": name, "reason": why})
            continue
        chosen.append(name)
    if CPU not in chosen:  # onnxruntime places what the others cannot run on the CPU in any case
        chosen.append(CPU)
    return chosen, [f for f in fallbacks if f["provider"] in GPU_PROVIDERS]


# --------------------------------------------------------------------------- provider options


def graph_input_shapes(path: str | Path) -> dict[str, list[int | None]]:
    """Each graph input's dims (None where dynamic), read from the ONNX file; no session is created."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    return shapes


def tensorrt_profile(shapes: dict[str, list[int | None]], opt_batch: int, max_batch: int) -> dict[str, str]:
    """TensorRT profile options for inputs whose only dynamic axis is the batch (axis 0).

    ``{"pixels": [None, 3, 224, 224]}``, 64, 256 -> ``trt_profile_min_shapes: "pixels:1x3x224x224"``,
    ``..._opt_shapes: "pixels:64x3x224x224"``, ``..._max_shapes: "pixels:256x3x224x224"`` (inputs
    joined by commas). Raises ValueError for a dynamic axis other than the batch.
    """
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"TensorRT profile needs 1 <= opt batch ({opt_batch}) <= max batch ({max_batch})")
    parts: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for name, dims in shapes.items():
        fixed = dims[1:]
        if not dims or any(d is None for d in fixed):
            raise ValueError(f"input {name} {dims}: TensorRT profile shapes cover a dynamic batch axis only")
        tail = "".join(f"x{d}" for d in fixed)
        for key, batch in (("min", 1), ("opt", opt_batch), ("max", max_batch)):
            parts[key].append(f"{name}:{dims[0] if dims[0] is not None else batch}{tail}")
    return {f"trt_profile_{key}_shapes": ",".join(values) for key, values in parts.items()}


def provider_options(name: str, options: RuntimeOptions, cache_dir: Path, graph: Path | None = None) -> dict:
    if name == "TensorrtExecutionProvider":
        cache = Path(options.trt_cache_dir) if options.trt_cache_dir else cache_dir
        max_batch = max(options.trt_max_batch, options.trt_opt_batch)
        engines = cache / ("fp16" if options.fp16 else "fp32") / f"batch1-{options.trt_opt_batch}-{max_batch}"
        engines.mkdir(parents=True, exist_ok=True)
        out = {"device_id": options.device_id, "trt_fp16_enable": options.fp16,
               "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
        if graph is not None:
            try:
                out.update(tensorrt_profile(graph_input_shapes(graph), options.trt_opt_batch, max_batch))
            except ValueError as err:
                LOG.warning("%s: no TensorRT profile shapes (%s); TensorRT builds an engine per new input shape",
                            graph.name, err)
        return out
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


def caps_fp16_optimization(graph_name: str, providers_in_use: Sequence[str],
                           level: ort.GraphOptimizationLevel) -> bool:
    """Whether an fp16 graph must run with optimisation capped at 'extended': it runs on the CPU.

    Decided on the providers in use (the first one runs the graph), never on the request: a CUDA
    request whose libraries do not load runs on the CPU and would crash there at ORT_ENABLE_ALL.
    """
    return graph_name.endswith(".fp16.onnx") and bool(providers_in_use) and providers_in_use[0] == CPU \
        and level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


# --------------------------------------------------------------------------- sessions


class Session:
    """One graph in onnxruntime; ``run(**inputs)`` returns ``{output name: array}``.

    ``requested``: the providers asked for this graph; ``providers_in_use``: ``session.get_providers()``;
    ``fallbacks``: [{provider, reason}] of the requested GPU providers that are not in use.
    ``allow_tensorrt=False`` (the small head graphs) asks for CUDA where TensorRT was requested.

    On CUDA (and TensorRT) the inputs are bound to device memory and the outputs are allocated there
    with IO binding, then copied back once, so there are no extra host copies per call.
    """

    def __init__(self, path: str | Path, options: RuntimeOptions = RuntimeOptions(), allow_tensorrt: bool = True):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX graph not found: {path}")
        self.path, self.options, self.device_id = path, options, options.device_id
        self.requested = requested_providers(options, allow_tensorrt)
        if options.require_gpu and not any(p in GPU_PROVIDERS for p in self.requested):
            raise ProviderError(f"{path.name}: require_gpu is set but no GPU provider is requested "
                                f"({', '.join(options.providers)})")
        expected, self.fallbacks = plan_providers(self.requested, options.device_id)
        self._check_required()
        providers = [(name, provider_options(name, options, path.parent / "trt_cache", path)) for name in expected]
        self._provider_options = dict(providers)
        so = session_options(options)
        self._cap_fp16(so, expected)
        self.session = self._create(so, providers)
        in_use = self.session.get_providers()
        lost = [p for p in expected if p in GPU_PROVIDERS and p not in in_use]
        self.fallbacks += [{"provider": p, "reason": NOT_LOADED} for p in lost]
        self._check_required()
        if self._cap_fp16(so, in_use):  # the probe said it would load, but the session ended on the CPU
            self.session = self._create(so, [(p, o) for p, o in providers if p in in_use])
        self.optimization = LEVEL_NAMES[so.graph_optimization_level]
        self._set_in_use()
        for f in self.fallbacks:
            _report(path.name, f["provider"], f["reason"], self.providers_in_use)
        LOG.info("%s runs on %s (requested %s)", path.name, ", ".join(self.providers_in_use), ", ".join(self.requested))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _set_in_use(self) -> None:
        self.providers_in_use = self.session.get_providers()
        self.on_gpu = self.providers_in_use[0] in GPU_PROVIDERS

    def _check_required(self) -> None:
        if self.options.require_gpu and self.fallbacks:
            reasons = "; ".join(f"{f['provider']}: {f['reason']}" for f in self.fallbacks)
            raise ProviderError(f"{self.path.name}: require_gpu is set and a requested GPU provider is not in use "
                                f"({reasons}); install onnxruntime-gpu with its CUDA/cuDNN (pip install .[gpu]) "
                                f"and TensorRT libraries, or request fewer providers")

    def _cap_fp16(self, so: ort.SessionOptions, providers_in_use: Sequence[str]) -> bool:
        if not caps_fp16_optimization(self.path.name, providers_in_use, so.graph_optimization_level):
            return False
        LOG.warning("%s on CPU: graph optimisation capped at 'extended' (onnxruntime %s's CPU layout "
                    "passes crash on fp16 graphs; fp16 pays off on GPUs only)", self.path.name, ort.__version__)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        return True

    def _create(self, so: ort.SessionOptions, providers: list[tuple[str, dict]]) -> ort.InferenceSession:
        """The session; a GPU provider that fails to create it is dropped (a fallback) and it is tried again."""
        while True:
            try:
                return ort.InferenceSession(str(self.path), so, providers=[p for p, _ in providers],
                                            provider_options=[o for _, o in providers], enable_fallback=0)
            except Exception as err:  # noqa: BLE001  (pybind's errors are not all RuntimeError)
                gpu = [p for p, _ in providers if p in GPU_PROVIDERS]
                if not gpu:
                    raise
                self.fallbacks.append({"provider": gpu[0], "reason": f"session creation failed: {_one_line(err)}"})
                self._check_required()
                providers = [(p, o) for p, o in providers if p != gpu[0]]
                self._cap_fp16(so, [p for p, _ in providers])

    def report(self) -> dict:
        """What summary.json records of this graph."""
        return {"file": self.path.name, "requested": list(self.requested), "in_use": list(self.providers_in_use),
                "fallbacks": [dict(f) for f in self.fallbacks], "optimization": self.optimization}

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.path.name}: missing input(s) {missing}")
        if not self.on_gpu:
            return dict(zip(self.output_names, self.session.run(None, {n: inputs[n] for n in self.input_names})))
        try:
            return self._run_bound(inputs)
        except EPFail as err:
            self._drop_at_run_time(err)
            return self.run(**inputs)

    def _run_bound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name in self.input_names:
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(inputs[name]), "cuda", self.device_id)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def _drop_at_run_time(self, err: BaseException) -> None:
        """An execution provider failed while running (e.g. a TensorRT engine build): go on without it, loudly."""
        provider = self.providers_in_use[0]
        self.fallbacks.append({"provider": provider, "reason": f"failed at run time: {_one_line(err)}"})
        self._check_required()
        rest = [p for p in self.providers_in_use if p != provider]
        self.session.set_providers(rest, [self._provider_options.get(p, {}) for p in rest])
        self._set_in_use()
        _report(self.path.name, provider, self.fallbacks[-1]["reason"], self.providers_in_use)
