"""SigLIP's sigmoid loss for the retrieval head (``options.loss: siglip``): the loss against a hand-written
reference, its cross-rank exchange (2 gloo ranks) against the single-process loss of the concatenated batch,
and a tiny real training run that learns."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import _free_port, _train, _write_config, export_untrained, tiny_config
from training.losses import sigmoid_pair_loss
from training.tasks.retrieval import RetrievalOptions, RetrievalTask

WORLD, LOCAL, DIM = 2, 4, 8


def reference_loss(image, text, ids, scale, bias):
    """-mean over images of the sum over texts of logsigmoid(label * logit), written out pair by pair."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    total = 0.0
    for i in range(len(image)):
        for j in range(len(text)):
            label = 1.0 if ids[i] == ids[j] else -1.0
            total = total + F.logsigmoid(label * (scale * image[i] @ text[j] + bias))
    return -total / len(image)


def _batch(seed: int = 0):
    """WORLD * LOCAL random features; samples 1 (rank 0) and 6 (rank 1) share a caption."""
    g = torch.Generator().manual_seed(seed)
    image, text = torch.randn(WORLD * LOCAL, DIM, generator=g), torch.randn(WORLD * LOCAL, DIM, generator=g)
    ids = torch.arange(WORLD * LOCAL) + 100
    ids[6] = ids[1]
    return image, text, ids


class _Identity(nn.Module):
    """A stand-in backbone: the batch's features are its outputs, so gradients land on them."""

    def forward(self, image, text):
        return {"image_features": image, "text_features": text}


def _head(**options) -> RetrievalTask:
    return RetrievalTask(RetrievalOptions(loss="siglip", **options), SimpleNamespace(tokenizer=None))


def _head_loss(head, image, text, ids):
    losses, report = head(_Identity(), {"image": image, "text": text, "caption_id": ids.tolist()})
    return losses["contrastive_loss"], report


def test_options_default_to_infonce_and_siglip_starts_from_its_own_scale_and_bias():
    assert RetrievalOptions().loss == "infonce"
    head = _head()
    assert head.logit_scale.item() == pytest.approx(math.log(10)) and head.logit_bias.item() == -10.0
    assert _head(init_logit_scale=1.0, init_logit_bias=-3.0).logit_bias.item() == -3.0
    from training.params import is_no_decay

    assert is_no_decay("retrieval.logit_bias", head.logit_bias)


def test_loss_and_gradients_equal_the_hand_written_reference():
    image, text, ids = _batch()
    image.requires_grad_(True), text.requires_grad_(True)
    head = _head(init_logit_scale=math.log(3.0), init_logit_bias=-1.5)  # away from saturation: gradients bite
    loss, report = _head_loss(head, image, text, ids)
    grads = torch.autograd.grad(loss, [image, text, head.logit_scale, head.logit_bias])

    scale, bias = torch.tensor(math.log(3.0), requires_grad=True), torch.tensor(-1.5, requires_grad=True)
    ref = reference_loss(image, text, ids, scale.exp(), bias)
    ref_grads = torch.autograd.grad(ref, [image, text, scale, bias])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert report["logit_bias"].item() == -1.5
    # the loss function alone, on a diagonal: matches too (one positive per row, as open_clip's SigLipLoss)
    a, b = F.normalize(image.detach(), dim=-1), F.normalize(text.detach(), dim=-1)
    plain = sigmoid_pair_loss(a, b, torch.eye(len(a), dtype=torch.bool), torch.tensor(3.0), torch.tensor(-1.5))
    assert plain.item() == pytest.approx(reference_loss(a, b, torch.arange(len(a)), 3.0, -1.5).item(), rel=1e-5)


def _rank_main(rank: int, port: int, out: str):
    """One gloo rank: its slice of the batch through the real head, gradients as DeepSpeed would average them."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        image, text, ids = _batch()
        part = slice(rank * LOCAL, (rank + 1) * LOCAL)
        image, text = image[part].clone().requires_grad_(True), text[part].clone().requires_grad_(True)
        head = _head(init_logit_scale=math.log(3.0), init_logit_bias=-1.5)
        loss, _ = _head_loss(head, image, text, ids[part])
        (loss / WORLD).backward()  # DeepSpeed: mean of the ranks' gradients
        for p in (head.logit_scale, head.logit_bias):  # its all-reduce of the head's own parameters
            dist.all_reduce(p.grad)
        torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad,
                    "scale": head.logit_scale.grad, "bias": head.logit_bias.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_the_single_process_loss_of_the_concatenated_batch(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    image, text, ids = _batch()
    image.requires_grad_(True), text.requires_grad_(True)
    scale, bias = torch.tensor(math.log(3.0), requires_grad=True), torch.tensor(-1.5, requires_grad=True)
    ref = reference_loss(image, text, ids, scale.exp(), bias)
    ref_image, ref_text, ref_scale, ref_bias = torch.autograd.grad(ref, [image, text, scale, bias])

    # sum over ranks of (per-rank loss * local batch) / global batch == the concatenated batch's loss
    assert sum(r["loss"].item() * LOCAL for r in ranks) / (WORLD * LOCAL) == pytest.approx(ref.item(), rel=1e-5)
    for rank, r in enumerate(ranks):
        part = slice(rank * LOCAL, (rank + 1) * LOCAL)
        torch.testing.assert_close(r["image"], ref_image[part], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["text"], ref_text[part], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["scale"], ref_scale, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["bias"], ref_bias, rtol=1e-5, atol=1e-6)


def test_a_siglip_head_exports_like_the_default_one(retrieval_shards, tmp_path):
    """The bias is training-only: the export carries the same retrieval metadata (cosine ranking)."""
    from training.validation import config_from_dict

    raw = tiny_config(retrieval_shards, tmp_path / "run", tasks=[{"name": "retrieval", "options": {"loss": "siglip"}}])
    export_untrained(config_from_dict(raw), tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "manifest.json").read_text())["tasks"]["retrieval"]
    assert meta.get("graphs", []) == [] and "logit_bias" not in json.dumps(meta)


def test_tiny_siglip_run_learns_well_above_chance(retrieval_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, tasks=[{"name": "retrieval", "options": {"loss": "siglip"}}],
                      optim={"max_steps": 120, "micro_batch_size": 32, "warmup_steps": 10},
                      schedule={"log_every": 20}, eval={"max_samples": None, "batch_size": 200})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "metrics.json").read_text())
    after, before = result["after"], result["before"]
    assert after["retrieval/t2i_R@1"] >= 5 * after["retrieval/t2i_R@1_chance"]
    assert after["retrieval/t2i_R@1"] >= before["retrieval/t2i_R@1"] + 0.1
    final = load_file(str(run / "final" / "model.safetensors"))
    assert final["heads.retrieval.logit_bias"].item() != -10.0, "the bias is trained and saved"
