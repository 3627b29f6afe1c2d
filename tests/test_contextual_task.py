"""contextual (ImageCoDe): the ContextualCLIP head's structure; real training runs, the second beating zero-shot."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import tiny_config
from conftest import _records, _run, _write_config
from training.tasks.contextual import ContextualHead, ContextualOptions

STAGE2_STEPS = 300
MARGIN = 0.04  # 40 of the 1,000 held-out sets
# Measured before issue #17 with the old head (init zero_shot, LayerNorm eps 1e-5, dropout after GELU):
# stage 2 0.389 vs 0.329 zero-shot. Default (original) head, stage 1: 0.335 (video 0.299, static 0.409) vs
# zero-shot 0.319, best constant index 0.154 ("index 0"), chance 0.1; stage 2 with it: 0.388 at 300 steps,
# 0.365 at 150 (session 10: a margin of 0.046, too close to MARGIN to halve the test's time); 0.382 without
# the evaluation before training (the held-out loader no longer draws its seed from the shared RNG first).
# Stage 1 keeps its evaluation before training: without it (the same RNG shift) stage 1 scored 0.306 and
# stage 2 0.339 (session 11), thinner margins for no gain in what is tested.
# These figures predate session 12's loader seeds (no longer drawn from the global RNG), which moved every
# trajectory; the assertions were re-run with them and pass.
TRAIN_TIMEOUT = 1800  # s per training run: conftest's 600 s default is too short on a loaded 2-core machine
BASELINE_MARGIN = 0.1  # over the best constant-index rule (the synthetic video sets end on frame 0 or 9 often)


def _head(**options) -> ContextualHead:
    torch.manual_seed(0)
    head = ContextualHead(16, ContextualOptions(heads=4, ffn_dim=32, dropout=0.0, fusion_scale=32.0, **options))
    with torch.no_grad():
        head.positions.normal_(std=1.0)  # large enough that ignoring or using it shows
        head.score.weight.normal_()  # a trained scorer, not the zero-shot start (which ignores the layers)
    return head.eval()


def test_head_defaults_follow_the_original():
    """ImageCoDe's head: nn.Embedding positions (N(0, 1)), a default nn.Linear scorer, BERT's LayerNorm
    eps 1e-12, and no dropout between the FFN's GELU and its second linear (only on attention and outputs)."""
    torch.manual_seed(0)
    head = ContextualHead(64, ContextualOptions(heads=4, ffn_dim=32), initial_scale=14.0)
    assert 0.85 < float(head.positions.detach().std()) < 1.15  # 640 draws of N(0, 1)
    bound = 1 / 64 ** 0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight and bias
    w = head.score.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.std()) > 0.5 * bound / 3 ** 0.5
    assert abs(float(head.score.bias.detach())) <= bound and float(head.score.bias.detach()) != 0.0
    for layer in head.layers:
        assert layer.norm1.eps == layer.norm2.eps == 1e-12
        assert isinstance(layer.dropout, torch.nn.Identity)  # after GELU
        assert layer.dropout1.p == layer.dropout2.p == layer.self_attn.dropout == 0.1
    ours = ContextualHead(64, ContextualOptions(heads=4, ffn_dim=32, ffn_dropout=True, layer_norm_eps=1e-5))
    assert isinstance(ours.layers[0].dropout, torch.nn.Dropout) and ours.layers[0].dropout.p == 0.1
    assert ours.layers[0].norm1.eps == 1e-5


def test_dropout_after_gelu_is_off_by_default():
    """In training mode with dropout only on attention and sublayer outputs, an FFN with identical inputs and
    dropout1/dropout2 disabled is deterministic; switched on, the GELU dropout makes it random."""
    x = torch.randn(2, 10, 16)
    for ffn_dropout, deterministic in ((False, True), (True, False)):
        torch.manual_seed(0)
        layer = ContextualHead(16, ContextualOptions(heads=4, ffn_dim=32, dropout=0.5, ffn_dropout=ffn_dropout)).layers[0]
        layer.train()
        layer.dropout1, layer.dropout2 = torch.nn.Identity(), torch.nn.Identity()
        assert torch.equal(layer._ff_block(x), layer._ff_block(x)) is deterministic


def test_zero_shot_init_starts_as_the_zero_shot_scorer():
    """With init=zero_shot (ours), the untrained head scores initial_scale * cosine, whatever its layers and
    positions do."""
    torch.manual_seed(0)
    head = ContextualHead(16, ContextualOptions(heads=4, ffn_dim=32, fusion_scale=50.0, init="zero_shot"),
                          initial_scale=14.0).eval()
    assert float(head.positions.detach().std()) < 0.05
    images = torch.nn.functional.normalize(torch.randn(3, 10, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    expected = 14.0 * torch.einsum("bcd,bd->bc", images, text)
    assert torch.allclose(head(images, text, torch.tensor([False, True, False])), expected, atol=1e-4)


@pytest.mark.parametrize("fusion", ["multiply", "concat"])
def test_static_sets_ignore_frame_order_video_sets_do_not(fusion):
    head = _head(fusion=fusion)
    images = torch.nn.functional.normalize(torch.randn(2, 10, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    for static, equivariant in ((True, True), (False, False)):
        flags = torch.tensor([static, static])
        scores = head(images, text, flags)
        permuted = head(images[:, perm], text, flags)
        assert scores.shape == (2, 10)
        assert torch.allclose(permuted, scores[:, perm], atol=1e-5) is equivariant


def test_width_must_split_into_heads():
    with pytest.raises(ValueError, match="heads"):
        ContextualHead(20, ContextualOptions(heads=8))


@pytest.fixture(scope="module")
def contextual_shards(tmp_path_factory):
    from shards.synth import generate

    out = tmp_path_factory.mktemp("synth") / "contextual"
    generate(out, task="contextual", n_train=1600, n_val=1000, seed=0, shard_size=200, image_size=64)
    return out


@pytest.fixture(scope="module")
def joint_run(contextual_shards, tmp_path_factory):
    """Stage 1: the ContextualCLIP head and the backbone trained together from scratch (in-batch CLIP loss on)."""
    root = tmp_path_factory.mktemp("contextual_joint")
    run = root / "run"
    options = {"mode": "contextual", "ffn_dim": 256, "clip_loss_weight": 1.0, "fusion_scale": 50.0}
    raw = tiny_config(contextual_shards, run, tasks=[{"name": "contextual", "options": options}],
                      optim={"max_steps": 150, "micro_batch_size": 16, "warmup_steps": 10, "weight_decay": 0.05},
                      schedule={"log_every": 50}, eval={"max_samples": None, "batch_size": 100})
    config = _write_config(root, raw)
    proc = _run([sys.executable, "launch/train.py", "--config", str(config)], timeout=TRAIN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, run


def test_contextual_head_learns_well_above_chance(joint_run, tmp_path):
    """Trained jointly with the backbone from scratch, the head beats chance on held-out sets.

    Against the same backbone's frame-by-frame cosine it is only level here: the CLIP loss moves the
    zero-shot scorer as fast as the head learns. The stage-2 test below measures the head's own gain.
    """
    config, run = joint_run
    result = json.loads((run / "metrics.json").read_text())
    before, after = result["before"], result["after"]
    print("stage 1:", {k: after[k] for k in sorted(after) if k.startswith("contextual/")})
    assert before["contextual/accuracy"] <= 0.25  # an untrained model is near chance
    assert after["contextual/accuracy"] >= after["contextual/accuracy_chance"] + 0.15
    assert after["contextual/accuracy_baseline"] > after["contextual/accuracy_chance"]  # the positional prior
    assert after["contextual/accuracy_baseline_rule"].startswith("index ")
    assert after["contextual/accuracy"] >= after["contextual/accuracy_baseline"] + BASELINE_MARGIN
    assert {"contextual/accuracy_video", "contextual/accuracy_static", "contextual/zeroshot_accuracy",
            "contextual/zeroshot_accuracy_video", "contextual/zeroshot_accuracy_static"} <= set(after)

    out = tmp_path / "eval.json"  # launch/evaluate.py scores the saved weights to the same numbers
    proc = _run([sys.executable, "launch/evaluate.py", "--config", str(config), "--checkpoint", str(run), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["contextual/accuracy"] == pytest.approx(after["contextual/accuracy"], abs=1e-6)


def test_head_on_frozen_backbone_beats_zero_shot(joint_run, contextual_shards, tmp_path):
    """Stage 2 (the paper's setting): the head alone on the frozen stage-1 backbone beats that backbone's
    zero-shot cosine on held-out sets by a clear margin, mostly on what one frame cannot tell (which frame
    is furthest, which comes just before or after the odd one)."""
    _, stage1 = joint_run
    run = tmp_path / "run"
    options = {"mode": "contextual", "ffn_dim": 256, "fusion_scale": 50.0}
    raw = tiny_config(contextual_shards, run, tasks=[{"name": "contextual", "options": options}],
                      model={"init_weights": str(stage1 / "final" / "model.safetensors")},
                      optim={"max_steps": STAGE2_STEPS, "micro_batch_size": 32, "warmup_steps": 10,
                             "weight_decay": 0.05, "freeze_backbone": True, "lr_backbone": 0.0,
                              "lr_head": 3e-3},
                      schedule={"log_every": 50},  # no "before": stage 1's "after" scored the same weights
                      eval={"max_samples": None, "batch_size": 100, "before_training": False})
    proc = _run([sys.executable, "launch/train.py", "--config", str(_write_config(tmp_path, raw))],
                timeout=TRAIN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "metrics.json").read_text())
    after = result["after"]
    assert result["before"] is None and [r["step"] for r in _records(run, "eval")] == [STAGE2_STEPS]
    stage1_after = json.loads((stage1 / "metrics.json").read_text())["after"]
    print("stage 2:", {k: after[k] for k in sorted(after) if k.startswith("contextual/")})
    # the backbone is frozen: its zero-shot scorer is stage 1's (which "after" scored the same weights)
    assert after["contextual/zeroshot_accuracy"] == pytest.approx(stage1_after["contextual/zeroshot_accuracy"], abs=1e-6)
    assert after["contextual/accuracy"] >= after["contextual/zeroshot_accuracy"] + MARGIN
    assert after["contextual/accuracy"] >= after["contextual/accuracy_chance"] + 0.2
    assert after["contextual/accuracy"] >= after["contextual/accuracy_baseline"] + BASELINE_MARGIN
