"""Precision and device decisions: bf16 towers with fp32 heads, one all-heads bf16 job, ds_config guards."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import _synth, tiny_config
from conftest import _run, _train, _write_config
from training import accelerator
from training.config import ConfigError
from training.validation import config_from_dict


@pytest.fixture(scope="module")
def tiny_model(retrieval_shards, tmp_path_factory):
    from training.model import build_model

    cfg = config_from_dict(tiny_config(retrieval_shards, tmp_path_factory.mktemp("p") / "run"))
    model, backbone = build_model(cfg)
    return model, backbone


def _batch(backbone, n: int = 4) -> dict:
    images = torch.randn(n, 3, 64, 64)
    return {"task": "retrieval", "image": images, "text": backbone.tokenizer([f"caption {i}" for i in range(n)]),
            "caption_id": torch.arange(n)}


def test_the_cpu_accelerator_decides_fp32_gloo_cpu():
    assert accelerator.device_type() == "cpu"
    assert accelerator.backend() == "gloo"
    assert accelerator.resolve_precision("auto") == "fp32"
    assert accelerator.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        accelerator.resolve_precision("fp16")


def test_towers_run_in_bf16_and_hand_fp32_to_the_heads(tiny_model):
    model, backbone = tiny_model
    seen: dict[str, torch.dtype] = {}
    block = model.backbone.visual.transformer.resblocks[0].mlp.c_fc
    text_block = model.backbone.transformer.resblocks[0].mlp.c_fc
    hooks = [block.register_forward_hook(lambda m, a, out: seen.__setitem__("vision_block", out.dtype)),
             text_block.register_forward_hook(lambda m, a, out: seen.__setitem__("text_block", out.dtype))]
    products: list[tuple[bool, torch.dtype]] = []  # (inside autocast, result dtype) of every a @ b
    original = torch.Tensor.__matmul__

    def recording_matmul(a, b):
        result = original(a, b)
        products.append((torch.is_autocast_enabled("cpu"), result.dtype))
        return result

    towers = accelerator.apply_precision(model, "bf16")
    assert towers is not None
    try:
        out = model.backbone(image=_batch(backbone)["image"], text=_batch(backbone)["text"])
        assert seen == {"vision_block": torch.bfloat16, "text_block": torch.bfloat16}
        assert out["image_features"].dtype == out["text_features"].dtype == torch.float32
        # the head's logits, loss and logit scale are fp32: no autocast region is open outside the towers
        torch.Tensor.__matmul__ = recording_matmul
        loss, report = model(_batch(backbone))
        torch.Tensor.__matmul__ = original
        head_products = [dtype for inside, dtype in products if not inside]
        assert head_products and set(head_products) == {torch.float32}
        assert (True, torch.bfloat16) in products  # the towers' projections ran in bf16
        assert loss.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        assert report["retrieval/logit_scale"].dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.parameters())
    finally:
        torch.Tensor.__matmul__ = original
        towers.remove()
    try:
        model.backbone(image=_batch(backbone)["image"], text=_batch(backbone)["text"])
        assert seen["vision_block"] == torch.float32  # tower hooks removed: fp32 again
    finally:
        for h in hooks:
            h.remove()


def test_bf16_towers_stay_close_to_fp32_and_backpropagate(tiny_model):
    model, backbone = tiny_model
    batch = _batch(backbone, 8)
    torch.manual_seed(0)
    fp32_loss, _ = model(batch)
    towers = accelerator.apply_precision(model, "bf16")
    try:
        bf16_loss, _ = model(batch)
        bf16_loss.backward()
    finally:
        towers.remove()
    grad = model.backbone.visual.conv1.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    assert bf16_loss.item() != fp32_loss.item()  # bf16 really ran
    assert abs(bf16_loss.item() - fp32_loss.item()) < 0.05 * abs(fp32_loss.item())


def test_apply_precision_fp32_installs_nothing(tiny_model):
    model, _ = tiny_model
    assert accelerator.apply_precision(model, "fp32") is None
    assert accelerator.apply_precision(model, "auto") is None  # auto is fp32 on the CPU accelerator


def test_the_engine_config_has_no_16_bit_section(retrieval_shards, tmp_path):
    from training.trainer import deepspeed_config

    ds = deepspeed_config(config_from_dict(tiny_config(retrieval_shards, tmp_path, deepspeed={"precision": "bf16"})))
    assert not {"bf16", "fp16", "torch_autocast"} & set(ds)


@pytest.mark.parametrize("content,message", [
    ({"bf16": {"enabled": True}}, "deepspeed.precision"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage = 3 differs"),
])
def test_ds_config_file_cannot_change_precision_or_stage(retrieval_shards, tmp_path, content, message):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps(content))
    raw = tiny_config(retrieval_shards, tmp_path, deepspeed={"config_file": str(ds_file)})
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_window_means_one_transfer():
    from training.trainer import window_means

    reports = [{"loss": torch.tensor(1.0), "a": torch.tensor(2.0)}, {"loss": torch.tensor(3.0)}, {"loss": 5.0}]
    assert window_means(reports) == {"a": 2.0, "loss": 3.0}


def test_every_head_trains_evaluates_and_exports_in_bf16(retrieval_shards, time_shards, geo_shards,
                                                         tmp_path_factory, tmp_path):
    """One 1-process job for all five heads with deepspeed.precision=bf16, then evaluate and export."""
    from safetensors.torch import load_file

    contextual = _synth(tmp_path_factory, "contextual", n_train=200, n_val=40)
    meme = _synth(tmp_path_factory, "meme", n_train=200, n_val=40)
    geo_options = {"num_cls_tokens": 2, "knowledge_corpus": str(geo_shards / "knowledge.txt"),
                   "labels_file": str(geo_shards / "labels.json"), "relevance_hidden": 32, "knowledge_top_k": 2}
    shards = {"retrieval": retrieval_shards, "time": time_shards, "geo_time": geo_shards,
              "contextual": contextual, "meme": meme}
    options = {"time": {"hidden": [32, 64]}, "geo_time": geo_options, "contextual": {"ffn_dim": 64},
               "meme": {"bert": str(meme / "bert-tiny"), "heads": 8}}
    tasks = [{"name": name, "train": str(path / "train"), "val": str(path / "val"), "options": options.get(name, {}),
              **({"micro_batch_size": 4} if name == "contextual" else {})} for name, path in shards.items()]
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, tasks=tasks, deepspeed={"precision": "bf16"}, run={"audit": True},
                      optim={"max_steps": 6, "micro_batch_size": 16, "warmup_steps": 1},
                      eval={"max_samples": 40, "batch_size": 40})
    raw["data"] = {"num_workers": 1, "shuffle_buffer": 20}
    config = _write_config(tmp_path, raw)
    proc = _train(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "precision bf16" in proc.stdout + proc.stderr
    after = json.loads((run / "metrics.json").read_text())["after"]
    assert {k.split("/")[0] for k in after} == set(shards)
    final = load_file(str(run / "final" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in final.values() if v.is_floating_point())
    bn = [k for k in final if k.startswith("heads.time.") and k.endswith("running_var")]
    assert bn, "the time head has BatchNorm statistics"

    proc = _run([sys.executable, "launch/evaluate.py", "--config", str(config), "--checkpoint", str(run),
                 "--out", str(tmp_path / "eval.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = json.loads((tmp_path / "eval.json").read_text())
    assert set(offline) == set(after)
    proc = _run([sys.executable, "launch/export.py", "--checkpoint", str(run), "--out", str(tmp_path / "onnx")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(shards)
