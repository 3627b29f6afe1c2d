"""``model.compile``: the towers' trunks compiled for training steps, eager everywhere else."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, _records, _train, _write_config, export_untrained, tiny_config


def _cfg(shards, run, **model):
    from training.validation import config_from_dict

    raw = tiny_config(shards, run)
    raw["model"].update(model)
    return config_from_dict(raw), raw


def test_compile_keeps_names_and_evaluates_eagerly(retrieval_shards, tmp_path):
    """Same parameters and state-dict names as the eager model; eval mode never enters dynamo."""
    from torch._dynamo.utils import counters

    from training.backbone import compile_targets, is_compiled, uncompile_towers
    from training.model import build_model

    torch.manual_seed(0)
    eager, _ = build_model(_cfg(retrieval_shards, tmp_path / "a")[0])
    torch.manual_seed(0)
    compiled, _ = build_model(_cfg(retrieval_shards, tmp_path / "b", compile=True)[0])
    trunks = compile_targets(compiled.backbone)
    assert sorted(trunks) == ["transformer", "visual.transformer"]  # both towers of the tiny ViT
    assert all(is_compiled(m) for m in trunks.values())
    assert not any(is_compiled(m) for m in compile_targets(eager.backbone).values())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.eval()
    image, text = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2, 32))
    frames = counters["frames"]["total"]
    out = compiled.backbone(image=image, text=text)
    assert counters["frames"]["total"] == frames, "an eval-mode forward went through torch.compile"
    ref = eager.eval().backbone(image=image, text=text)
    assert torch.equal(out["image_features"], ref["image_features"])
    uncompile_towers(compiled.backbone)
    assert not any(is_compiled(m) for m in trunks.values())


def test_compile_with_zero3_is_refused(retrieval_shards, tmp_path):
    from training.config import ConfigError
    from training.model import build_model
    from training.validation import config_from_dict

    raw = tiny_config(retrieval_shards, tmp_path / "run", deepspeed={"zero_stage": 3})
    raw["model"]["compile"] = True
    with pytest.raises(ConfigError, match="model.compile.*zero_stage 3"):
        build_model(config_from_dict(raw))


def test_export_of_compiled_model_is_eager(retrieval_shards, tmp_path):
    """ONNX export of a model built with ``compile: true`` traces the eager trunks and matches them."""
    import numpy as np
    import onnxruntime as ort

    from training.backbone import is_compiled

    cfg, _ = _cfg(retrieval_shards, tmp_path / "run", compile=True)
    backbone = export_untrained(cfg, tmp_path / "export")
    assert is_compiled(backbone.model.visual.transformer)
    graph = next((tmp_path / "export").rglob("*image*.onnx"))
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    pixels = torch.randn(2, 3, 64, 64)
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    with torch.no_grad():
        ref = backbone.model.eval().encode_image(pixels)
    np.testing.assert_allclose(onnx_out, ref.numpy(), atol=1e-5)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_loads_uncompiled(retrieval_shards, tmp_path):
    """A 1-process run with ``compile: true`` follows the eager run's loss curve, really compiles, and its
    checkpoint and final weights load into an uncompiled model. Backend aot_eager: the same dynamo capture
    and AOT autograd graphs as inductor, without its code generation (a cold inductor build of both trunks
    took 5-9 min on the 2-core machine)."""
    from training.evaluation import load_weights
    from training.model import build_model

    runs, losses = {}, {}
    for compile_ in (False, True):
        run = tmp_path / f"run-{compile_}"
        raw = tiny_config(retrieval_shards, run, optim={"max_steps": 5, "micro_batch_size": 16, "warmup_steps": 1},
                          eval={"batch_size": 50, "max_samples": 50})
        raw["model"]["compile"] = compile_
        raw["model"]["compile_backend"] = "aot_eager"  # dynamo's graphs without inductor's C++ build (minutes cold)
        (tmp_path / f"c{compile_}").mkdir()
        # graph_code: dynamo logs each graph it captures (on an inductor cache hit too); the cache is kept
        # across runs like the DeepSpeed extensions (a cold compile of both trunks takes minutes here)
        proc = _train(_write_config(tmp_path / f"c{compile_}", raw),
                      env={"TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".cache" / "torchinductor"),
                           "TORCH_LOGS": "graph_code", "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[compile_], losses[compile_] = run, [r["loss"] for r in _records(run, "train")]
        captured = proc.stderr.count("TRACED GRAPH")
        assert (captured >= 2) == compile_ and (captured == 0) != compile_, f"compile={compile_}: {captured} graphs"
    assert len(losses[True]) == 5
    assert losses[True] == pytest.approx(losses[False], rel=2e-4, abs=2e-4), (losses[True], losses[False])
    assert losses[True][-1] != losses[True][0]  # it trained

    # final weights (consolidated from the DeepSpeed checkpoint) load strictly into an uncompiled model
    model, _ = build_model(_cfg(retrieval_shards, tmp_path / "eager")[0])
    load_weights(model, runs[True] / "final" / "model.safetensors")
    eager_final = load_file(str(runs[False] / "final" / "model.safetensors"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, eager_final[name].reshape(value.shape), rtol=1e-3, atol=1e-4, msg=name)
    # the DeepSpeed checkpoint's module states carry the eager names
    (states,) = (runs[True] / "checkpoints").rglob("mp_rank_00_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert set(module) == set(model.state_dict())


def test_an_unknown_compile_backend_is_refused_by_name(retrieval_shards, tmp_path):
    from training.config import ConfigError
    from training.model import build_model
    from training.validation import config_from_dict

    raw = tiny_config(retrieval_shards, tmp_path / "run")
    raw["model"].update(compile=True, compile_backend="inductr")
    with pytest.raises(ConfigError, match="model.compile_backend: unknown torch.compile backend 'inductr'"):
        build_model(config_from_dict(raw))
