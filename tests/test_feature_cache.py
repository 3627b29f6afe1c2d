"""Feature-caching accumulation (``optim.accum_mode: features``): one step with grad_accum = k through the real
DeepSpeed engine gives the gradients of one big batch of micro x k x ranks (1 process, and 2 ranks through the
deepspeed launcher over gloo), plain ``gradients`` accumulation does not, dropout is replayed, unsupported jobs
are refused at validation, and a tiny real run learns.

This file is also the rank program: ``python tests/test_feature_cache.py OUT SHARDS CASES`` (one process) or
``deepspeed --num_gpus 2 tests/test_feature_cache.py ...`` runs each case's engine step and writes rank 0's
gradients to ``OUT/<case>.pt``; the tests compare them with a single-process big-batch reference.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEEPSPEED, _free_port, _run, _train, _write_config, tiny_config

MICRO, K = 4, 3  # micro batch per rank, micro batches per step
MODEL_DIR = "feature_cache_models"  # under the test's tmp folder: tiny-vit with patch dropout (randomness to replay)
DROPOUT_MODEL = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "patch_size": 8,
                                                 "head_width": 32, "patch_dropout": 0.5},
                 "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def case_raw(shards: Path, run_dir: Path, case: str) -> dict:
    """Config of a case ``mode-loss-zero<stage>-<precision>[-dropout]``, e.g. ``features-siglip-zero2-fp32``."""
    mode, loss, zero, precision, *extra = case.split("-")
    raw = tiny_config(shards, run_dir, tasks=[{"name": "retrieval", "options": {
        "loss": loss, "init_logit_scale": math.log(5.0), "init_logit_bias": -2.0}}],  # away from saturation
        optim={"micro_batch_size": MICRO, "grad_accum": K, "accum_mode": mode, "grad_clip": 0.0},
        deepspeed={"zero_stage": int(zero.removeprefix("zero")), "precision": precision})
    if "dropout" in extra:
        raw["model"] = {"name": "tiny-vit-dropout", "model_config_dir": str(run_dir.parent / MODEL_DIR)}
    return raw


def micro_batches(cfg, backbone, task, count: int) -> list[dict]:
    """The first ``count`` micro batches of the held-out shards (deterministic: the same in every process)."""
    from training.data import eval_loader

    loader = iter(eval_loader(cfg.val_shards("retrieval"), task, backbone, MICRO))
    return [next(loader) for _ in range(count)]


def build(cfg):
    """Model and backbone as the trainer builds them (seeded, scalar parameters promoted, precision applied)."""
    from training import accelerator
    from training.model import build_model
    from training.trainer import seed_everything
    from training.zero3 import promote_scalar_parameters

    seed_everything(cfg.run.seed)
    model, backbone = build_model(cfg)
    promote_scalar_parameters(model)
    return model, backbone, accelerator.resolve_precision(cfg.deepspeed.precision)


# --------------------------------------------------------------------------- the rank program


def engine_step_gradients(cfg, dist_info) -> tuple[dict[str, torch.Tensor], float]:
    """One optimizer step of K micro batches through the real engine and :func:`training.feature_cache.accumulate`
    (as the trainer runs it); returns the averaged gradients at the boundary (before the update) and the loss."""
    import deepspeed

    from training import accelerator, feature_cache
    from training.data import to_device
    from training.params import param_groups
    from training.trainer import deepspeed_config
    from training.zero3 import register_zero3_external_parameters

    model, backbone, precision = build(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.lr_backbone, cfg.optim.lr_head, 0.0, False))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    if dist_info.world_size == 1 and cfg.deepspeed.zero_stage == 0:
        engine.enable_backward_allreduce = False  # as the trainer does
    if cfg.deepspeed.zero_stage == 3:
        register_zero3_external_parameters(engine.module)
    accelerator.apply_precision(engine.module, precision)
    batches = micro_batches(cfg, backbone, engine.module.heads["retrieval"], dist_info.world_size * K)
    mine = batches[dist_info.rank * K:(dist_info.rank + 1) * K]  # rank-major: the order the gather concatenates
    torch.manual_seed(1234)  # the dropout case's reference starts from the same state
    grads, losses = {}, []
    for _, loss, _ in feature_cache.accumulate(engine, lambda i: to_device(mine[i], dist_info.device, None),
                                               K, cfg.optim.accum_mode, dist_info.device):
        losses.append(loss.item())
        if engine.is_gradient_accumulation_boundary():
            grads = full_gradients(engine.module)
    return grads, losses[-1]


def full_gradients(module) -> dict[str, torch.Tensor]:
    """Every parameter's whole averaged gradient, at any ZeRO stage (collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, param in module.named_parameters():
        grad = safe_get_full_grad(param)
        if grad is not None:
            out[name] = grad.detach().float().clone().reshape(getattr(param, "ds_shape", param.shape))
    return out


def rank_main(out: Path, shards: Path, cases: list[str]) -> None:
    from training.distributed import init_distributed
    from training.validation import config_from_dict

    dist_info = init_distributed()
    for case in cases:
        cfg = config_from_dict(case_raw(shards, out / case, case))
        grads, loss = engine_step_gradients(cfg, dist_info)
        mean = torch.tensor(loss / dist_info.world_size)  # SigLIP's per-rank losses differ; their mean: the big batch's
        torch.distributed.all_reduce(mean)
        loss = mean.item()
        if dist_info.is_main:
            torch.save({"grads": grads, "loss": loss}, out / f"{case}.pt")
    torch.distributed.barrier()


# --------------------------------------------------------------------------- the reference


def big_batch_reference(shards: Path, tmp_path: Path, case: str, ranks: int, sequential: bool = False):
    """Gradients and loss of one forward/backward over all ``ranks * K`` micro batches at once, in this process.

    ``sequential``: the features of each micro batch from its own forward, in order from the same seed (what
    the dropout case must reproduce: the same masks as the cached pass), then one loss over all of them."""
    from training import accelerator
    from training.validation import config_from_dict

    raw = case_raw(shards, tmp_path / "reference", case)
    raw["optim"] = {**raw["optim"], "grad_accum": 1, "accum_mode": "gradients"}
    cfg = config_from_dict(raw)
    model, backbone, precision = build(cfg)
    accelerator.apply_precision(model, precision)
    task = model.heads["retrieval"]
    batches = micro_batches(cfg, backbone, task, ranks * K)
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): bf16 CPU kernels round differently per thread count
    try:
        return _reference_step(model, task, batches, sequential)
    finally:
        torch.set_num_threads(threads)


def _reference_step(model, task, batches: list[dict], sequential: bool):
    if sequential:
        parts = [task.training_features(model.backbone, b) for b in batches]
        losses, _ = task.features_loss({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        loss = sum(v for k, v in losses.items() if k.endswith("_loss"))
    else:
        big = {k: (torch.cat([b[k] for b in batches]) if isinstance(batches[0][k], torch.Tensor)
                   else sum((list(b[k]) for b in batches), []) if isinstance(batches[0][k], list) else batches[0][k])
               for k in batches[0]}
        loss, _ = model(big)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, loss.item()


def gradient_gap(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest per-tensor ``max|got - want| / max|want|``; a gradient only ``got`` has must be zero (the
    engine's all-reduce fills parameters the loss never reached, such as the backbone's unused logit scale)."""
    assert set(want) <= set(got), sorted(set(want) - set(got))
    assert all(not got[n].any() for n in set(got) - set(want)), sorted(set(got) - set(want))
    return max(((got[n] - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-12)).item() for n in want)


def run_cases(tmp_path: Path, shards: Path, cases: list[str], ranks: int) -> dict[str, dict]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    script = [str(Path(__file__)), str(out), str(shards), ",".join(cases)]
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(_free_port()), *script]
    proc = _run(cmd, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {case: torch.load(out / f"{case}.pt") for case in cases}


@pytest.fixture
def dropout_model(tmp_path) -> None:
    (tmp_path / "out" / MODEL_DIR).mkdir(parents=True)
    (tmp_path / "out" / MODEL_DIR / "tiny-vit-dropout.json").write_text(json.dumps(DROPOUT_MODEL))


# --------------------------------------------------------------------------- tests


def test_one_process_features_step_equals_the_big_batch_and_gradients_mode_does_not(retrieval_shards, tmp_path):
    """InfoNCE without ZeRO, SigLIP on ZeRO-3 (parameters gathered per module: the head's scale and bias too)."""
    cases = ["features-infonce-zero0-fp32", "features-siglip-zero3-fp32", "gradients-infonce-zero0-fp32"]
    got = run_cases(tmp_path, retrieval_shards, cases, ranks=1)
    for case in cases[:2]:
        want, want_loss = big_batch_reference(retrieval_shards, tmp_path, case, ranks=1)
        result = got[case]
        assert gradient_gap(result["grads"], want) < 1e-4, case
        assert result["loss"] == pytest.approx(want_loss, rel=1e-5), "the reported loss is the big batch's"
        assert "heads.retrieval.logit_scale" in want and "backbone.visual.conv1.weight" in want  # head and backbone
    want, _ = big_batch_reference(retrieval_shards, tmp_path, "features-infonce-zero0-fp32", ranks=1)
    assert gradient_gap(got["gradients-infonce-zero0-fp32"]["grads"], want) > 1e-2, "plain accumulation differs"


@pytest.mark.slow  # the launcher, 2 ranks and 3 engines: ~100 s on the shared 2-core machine
def test_two_ranks_features_step_equals_the_big_batch_of_both_ranks(retrieval_shards, tmp_path):
    """Micro x K x 2 ranks through the deepspeed launcher (gloo): InfoNCE on ZeRO 0 in fp32; SigLIP on ZeRO 2 with
    bf16 towers, against the bf16 reference that embeds micro batch by micro batch (one bf16 forward over the
    whole big batch rounds differently: the vision LayerNorm gradients then differ by O(1) relative, whatever
    the accumulation)."""
    cases = ["features-infonce-zero0-fp32", "features-siglip-zero2-bf16", "gradients-infonce-zero0-fp32"]
    got = run_cases(tmp_path, retrieval_shards, cases, ranks=2)
    for case, sequential in (("features-infonce-zero0-fp32", False), ("features-siglip-zero2-bf16", True)):
        want, want_loss = big_batch_reference(retrieval_shards, tmp_path, case, ranks=2, sequential=sequential)
        assert gradient_gap(got[case]["grads"], want) < (2e-3 if sequential else 1e-4), case
        assert got[case]["loss"] == pytest.approx(want_loss, rel=1e-5), case
    want, _ = big_batch_reference(retrieval_shards, tmp_path, "features-infonce-zero0-fp32", ranks=2)
    assert gradient_gap(got["gradients-infonce-zero0-fp32"]["grads"], want) > 1e-1, "plain accumulation differs"


def test_the_recompute_replays_the_cached_pass_dropout(retrieval_shards, tmp_path, dropout_model):
    """Patch dropout draws from the RNG: the recompute must see the masks of the no-gradient pass."""
    case = "features-infonce-zero0-fp32-dropout"
    got = run_cases(tmp_path, retrieval_shards, [case], ranks=1)[case]
    want, want_loss = big_batch_reference(retrieval_shards, tmp_path / "out", case, ranks=1, sequential=True)
    assert gradient_gap(got["grads"], want) < 1e-4
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)


def test_validation_refuses_features_with_a_mixed_job_or_an_unsupported_task(retrieval_shards, tmp_path):
    from training.config import ConfigError
    from training.validation import config_from_dict

    optim = {"grad_accum": 2, "accum_mode": "features"}
    time_task = {"name": "time"}  # validation reads no shards: the retrieval ones stand in
    with pytest.raises(ConfigError, match=r"optim.accum_mode: .*task 'time' does not split"):
        config_from_dict(tiny_config(retrieval_shards, tmp_path, tasks=[time_task], optim=optim))
    with pytest.raises(ConfigError, match=r"optim.accum_mode: features needs exactly one task.*'retrieval', 'time'"):
        config_from_dict(tiny_config(retrieval_shards, tmp_path, tasks=[{"name": "retrieval"}, time_task], optim=optim))
    assert config_from_dict(tiny_config(retrieval_shards, tmp_path, optim=optim)).optim.accum_mode == "features"


def test_tiny_features_run_learns(retrieval_shards, tmp_path):
    """The real trainer (launch/train.py) with accum_mode features: contrastive batch 64 from micro batches of 16."""
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, optim={"max_steps": 40, "micro_batch_size": 16, "grad_accum": 4,
                                                    "accum_mode": "features", "warmup_steps": 4},
                      schedule={"log_every": 10}, eval={"max_samples": None, "batch_size": 200})
    proc = _train(_write_config(tmp_path, raw), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "metrics.json").read_text())
    after, before = result["after"], result["before"]
    assert after["retrieval/t2i_R@1"] >= 3 * after["retrieval/t2i_R@1_chance"]
    assert after["retrieval/t2i_R@1"] >= before["retrieval/t2i_R@1"] + 0.05
    train = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train if r["kind"] == "train"]
    assert losses[0] > math.log(16) + 0.5, "the first steps' loss is over 64 samples (ln 64 = 4.16), not 16 (2.77)"
    assert losses[-1] < losses[0] - 1.0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    rank_main(Path(args[0]), Path(args[1]), args[2].split(","))
