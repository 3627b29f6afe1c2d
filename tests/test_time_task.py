"""time (TICL) head: bin encodings, metrics on hand-made cases, the head's shapes and loss."""
from __future__ import annotations

import math

import pytest
import torch

from training import metrics
from training.tasks.time_of_day import TimeOptions, bin_inputs, score_time, time_retrieval


def test_bin_inputs_onehot_and_cyclic():
    assert torch.equal(bin_inputs(4, "onehot"), torch.eye(4))
    cyc = bin_inputs(24, "cyclic")
    assert cyc.shape == (24, 2)
    # 23:30 and 00:30 are as close as 00:30 and 01:30
    assert torch.dist(cyc[23], cyc[0]) == pytest.approx(float(torch.dist(cyc[0], cyc[1])), abs=1e-6)


def test_time_of_day_errors_wrap_around_midnight():
    # bin 23 of 24 has its centre at 23:30; truth 00:10 -> 40 min apart across midnight
    err = metrics.time_of_day_errors(torch.tensor([23, 0, 12]), torch.tensor([10, 30, 0]), 24)
    assert err.tolist() == [40.0, 0.0, 720.0 - 30.0]


def test_cyclic_positives():
    pos = metrics.cyclic_positives(torch.tensor([23.8, 12.0]), torch.tensor([0.2, 23.0, 12.5, 11.4]), 0.5, 24)
    assert pos.tolist() == [[True, False, False, False], [False, False, True, False]]


def test_score_time_hand_made():
    # 3 images; hour logits over 24 bins predict bins 10, 0, 5; truths 10:15, 23:50, 8:00
    hour = torch.full((3, 24), -1.0)
    hour[0, 10] = hour[1, 0] = hour[2, 5] = 1.0
    hour[2, 8] = 0.5  # second choice of image 2 is right
    month = torch.zeros(3, 12)
    month[0, 0] = month[1, 11] = month[2, 6] = 1.0
    out = {"hour": hour, "minutes": torch.tensor([615, 1430, 480]), "month": month,
           "month_true": torch.tensor([0, 0, 3]),
           "image": torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)}
    r = score_time(out, TimeOptions())
    assert r["hour_top1"] == pytest.approx(1 / 3) and r["hour_top3"] == pytest.approx(2 / 3)
    # errors: |10:30-10:15|=15, |00:30-23:50|=40, |05:30-08:00|=150
    assert r["hour_mae_minutes"] == pytest.approx((15 + 40 + 150) / 3)
    assert r["hour_within_30min"] == pytest.approx(1 / 3)
    # months: 0 vs 0 -> 0, 11 vs 0 -> 1 (wrapped), 6 vs 3 -> 3
    assert r["month_top1"] == pytest.approx(1 / 3) and r["month_mae"] == pytest.approx(4 / 3)


def test_time_retrieval_per_query_excludes_self():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]]), dim=1)
    hours = torch.tensor([1.0, 1.2, 13.0, 20.0])
    r = time_retrieval(emb, hours, TimeOptions(retrieval_ks=(1, 3)))
    # queries 0 and 1 have each other as the only positive and rank it first; 2 and 3 have none
    assert r == {"retrieval_R@1": 1.0, "retrieval_R@3": 1.0}


def test_head_forward_and_loss_on_tiny_backbone():
    from training.config import ModelConfig
    from training.backbone import create_backbone
    from training.tasks.time_of_day import TimeTask

    from conftest import ROOT

    backbone = create_backbone(ModelConfig(name="tiny-vit", model_config_dir=str(ROOT / "configs" / "models")))
    # logit scale exp(0) = 1: logits are cosines in [-1, 1], so CE lies within log(24) +- 2
    task = TimeTask(TimeOptions(hidden=(32,), encoding="cyclic", init_logit_scale=0.0), backbone)
    batch = {"image": torch.randn(4, 3, 64, 64), "hour_bin": torch.tensor([0, 5, 23, 12]),
             "month": torch.tensor([0, 11, 3, 6])}
    losses, report = task(backbone.model, batch)
    assert set(losses) == {"hour_loss", "month_loss"}
    assert abs(losses["hour_loss"].item() - math.log(24)) <= 2
    assert abs(losses["month_loss"].item() - math.log(12)) <= 2
    (losses["hour_loss"] + losses["month_loss"]).backward()
    assert task.hour_encoder.mlp[0].weight.grad is not None
