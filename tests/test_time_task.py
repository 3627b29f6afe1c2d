"""time (TICL) head: bin encodings, metrics and baselines on hand-made cases, TICL's query/database
retrieval, the head's defaults, shapes and loss, and a learning run that must beat the trivial baselines."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from training import metrics
from training.tasks.time_of_day import (TimeOptions, bin_inputs, chance_recall, hour_baselines, layer_dropouts,
                                        leave_one_out_recall, month_baselines, query_database_recall,
                                        score_time, time_retrieval)


def unit(rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def tiny_backbone():
    from training.config import ModelConfig
    from training.backbone import create_backbone

    from conftest import ROOT

    return create_backbone(ModelConfig(name="tiny-vit", model_config_dir=str(ROOT / "configs" / "models")))


# --------------------------------------------------------------------------- encodings, hour arithmetic


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


def test_cyclic_hour_difference_around_midnight_in_minutes():
    """TICL's evaluation: d = |q - r| in minutes, min(d, 1440 - d) / 60 <= 0.5 h. 23:50 vs 00:15 is 25 min
    across midnight; 23:45 vs 00:15 is exactly 30 min, a positive (<=), vs 00:16 it is 31 min, not."""
    q = torch.tensor([23 * 60 + 50, 23 * 60 + 45, 0]) / 60
    g = torch.tensor([15, 16, 23 * 60 + 30, 30]) / 60
    pos = metrics.cyclic_positives(q, g, 0.5, 24)
    assert pos.tolist() == [[True, True, True, False],    # 25, 26, 20, 40 min
                            [True, False, True, False],   # 30, 31, 15, 45 min
                            [True, True, True, True]]     # 15, 16, 30, 30 min


# --------------------------------------------------------------------------- classification metrics, baselines


def test_score_time_hand_made():
    # 3 images; hour logits over 24 bins predict bins 10, 0, 5; truths 10:15, 23:50, 8:00
    hour = torch.full((3, 24), -1.0)
    hour[0, 10] = hour[1, 0] = hour[2, 5] = 1.0
    hour[2, 8] = 0.5  # second choice of image 2 is right
    month = torch.zeros(3, 12)
    month[0, 0] = month[1, 11] = month[2, 6] = 1.0
    out = {"hour": hour, "minutes": torch.tensor([615, 1430, 480]), "month": month,
           "month_true": torch.tensor([0, 0, 3]), "image": unit([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])}
    r = score_time(out, TimeOptions())
    assert r["hour_top1"] == pytest.approx(1 / 3) and r["hour_top3"] == pytest.approx(2 / 3)
    # errors: |10:30-10:15|=15, |00:30-23:50|=40, |05:30-08:00|=150
    assert r["hour_mae_minutes"] == pytest.approx((15 + 40 + 150) / 3)
    assert r["hour_within_30min"] == pytest.approx(1 / 3)
    # months: 0 vs 0 -> 0, 11 vs 0 -> 1 (wrapped), 6 vs 3 -> 3
    assert r["month_top1"] == pytest.approx(1 / 3) and r["month_mae"] == pytest.approx(4 / 3)
    assert r["month_top1_baseline"] == pytest.approx(2 / 3) and r["month_top1_baseline_rule"] == "majority bin"
    # no roles, and no two images within 0.5 h of each other: no retrieval figure at all
    assert not any(k.startswith("retrieval") for k in r)


def test_hour_baselines_majority_and_best_constant_bin():
    # truths: three at 10:xx, one at 11:10, one at 23:50 (all held out)
    minutes = torch.tensor([600, 610, 659, 670, 1430])
    b = hour_baselines(minutes, 24)
    assert b["hour_top1_baseline"] == pytest.approx(3 / 5) and b["hour_top1_baseline_rule"] == "majority bin"
    assert b["hour_top3_baseline"] == pytest.approx(1.0)  # bins 10, 11, 23
    # best constant bin for MAE: bin 10 (centre 10:30): 30 + 20 + 29 + 40 + 10h40 (23:50 is 13h20 later,
    # 10h40 the other way round); bin 9 gives 30 + 40 + 89 + 100 + 580 = 839, bin 11 921
    assert b["hour_mae_minutes_baseline"] == pytest.approx((30 + 20 + 29 + 40 + 640) / 5)
    assert b["hour_mae_minutes_baseline_rule"] == "best constant bin"
    assert b["hour_within_30min_baseline"] == pytest.approx(3 / 5)
    # a tie between bins goes to the lower bin (0 vs 23, one sample each): either way 1/2
    assert hour_baselines(torch.tensor([1430, 10]), 24)["hour_top1_baseline"] == pytest.approx(0.5)


def test_month_baselines_wrap_around_the_year():
    # December, January, January, February: majority January; best constant January, MAE (1+0+0+1)/4
    m = month_baselines(torch.tensor([11, 0, 0, 1]))
    assert m["month_top1_baseline"] == pytest.approx(0.5)
    assert m["month_top3_baseline"] == pytest.approx(1.0)
    assert m["month_mae_baseline"] == pytest.approx(0.5) and m["month_mae_baseline_rule"] == "best constant month"


def test_a_constant_prediction_scores_exactly_its_baseline():
    """The baseline is what a constant prediction gets: a model predicting the majority bin ties it."""
    g = torch.Generator().manual_seed(0)
    minutes = torch.randint(0, 1440, (300,), generator=g)
    hour = torch.zeros(300, 24)
    majority = int(torch.bincount(minutes // 60, minlength=24).argmax())
    hour[:, majority] = 1.0
    r = score_time({"hour": hour, "minutes": minutes, "image": torch.randn(300, 8, generator=g)}, TimeOptions())
    assert r["hour_top1"] == pytest.approx(r["hour_top1_baseline"])
    assert r["hour_top1"] > r["hour_top1_chance"]  # a constant beats uniform chance: chance is no bar
    assert r["hour_mae_minutes"] >= r["hour_mae_minutes_baseline"] - 1e-9


# --------------------------------------------------------------------------- time-based retrieval


def test_query_database_recall_hand_made_with_ties():
    """Queries vs a disjoint database (TICL): per query, ties to the lower database index."""
    db = unit([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    db_hours = torch.tensor([12.0, 0.2, 23.9, 6.0])
    queries = unit([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    q_hours = torch.tensor([23.75, 23.6, 18.0])
    r = query_database_recall(queries, q_hours, db, db_hours, 0.5, (1, 2, 3))
    # query 0 (23:45): positives db 1 (00:12, across midnight) and db 2 (23:54); db 0 and db 1 tie at
    #   cosine 1, db 0 (12:00, a negative) ranks first -> miss at 1, hit at 2
    # query 1 (23:36): positive db 2 only, ranked first -> hit at 1
    # query 2 (18:00): no positive in the database -> left out
    assert r == {"R@1": 0.5, "R@2": 1.0, "R@3": 1.0, "num_queries": 2,
                 "R@1_chance": pytest.approx((2 / 4 + 1 / 4) / 2),
                 "R@2_chance": pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2),
                 "R@3_chance": pytest.approx((1.0 + 3 / 4) / 2)}


def test_chance_recall_is_exact():
    # G = 4, one positive: R@1 = 1/4, R@3 = 1 - C(3,3)/C(4,3) = 3/4; two positives at k=3: certain
    assert chance_recall(torch.tensor([1]), 4, (1, 3)) == pytest.approx({"R@1": 0.25, "R@3": 0.75})
    assert chance_recall(torch.tensor([2]), 4, (3, 10)) == pytest.approx({"R@3": 1.0, "R@10": 1.0})
    # agrees with metrics.chance_recall_at_1 (n_pos / G)
    pos = torch.tensor([[True, False, False], [True, True, False]])
    assert chance_recall(pos.sum(1), 3, (1,))["R@1"] == pytest.approx(metrics.chance_recall_at_1(pos))


def test_leave_one_out_excludes_self_and_blocks_agree():
    emb = unit([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    hours = torch.tensor([1.0, 1.2, 13.0, 20.0])
    r = leave_one_out_recall(emb, hours, 0.5, (1, 3))
    # queries 0 and 1 have each other as the only positive and rank it first; 2 and 3 have none
    assert {k: v for k, v in r.items() if not k.endswith("_chance")} == {"R@1": 1.0, "R@3": 1.0}
    assert r["R@1_chance"] == pytest.approx(1 / 3)
    g = torch.Generator().manual_seed(1)
    emb, hours = F.normalize(torch.randn(50, 6, generator=g), dim=1), torch.rand(50, generator=g) * 24
    whole, blocked = (leave_one_out_recall(emb, hours, 0.5, (1, 5), block=b) for b in (1000, 7))
    assert blocked == pytest.approx(whole)


def test_time_retrieval_roles_select_the_protocol():
    emb = unit([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [0.98, 0.2]])
    hours = torch.tensor([1.0, 1.2, 13.0, 13.1, 9.0])
    opts = TimeOptions(retrieval_ks=(1, 3))
    loo = time_retrieval(emb, hours, opts)
    assert set(loo) == {"retrieval_loo_R@1", "retrieval_loo_R@3", "retrieval_loo_R@1_chance", "retrieval_loo_R@3_chance"}
    # queries 0 and 2 against database 1, 3, 4: query 0's positive is db 1 (nearest), query 2's db 3 (nearest)
    roles = torch.tensor([1, 0, 1, 0, 0])
    split = time_retrieval(emb, hours, opts, roles)
    assert split["retrieval_R@1"] == 1.0 and split["retrieval_num_queries"] == 2
    assert split["retrieval_num_database"] == 3
    assert split["retrieval_R@1_chance"] == pytest.approx(1 / 3)
    assert {k: v for k, v in split.items() if k.startswith("retrieval_loo_")} == loo
    # roles present but no query (or no database): leave-one-out only
    assert time_retrieval(emb, hours, opts, torch.zeros(5, dtype=torch.long)) == loo
    assert time_retrieval(emb, hours, opts, torch.full((5,), -1)) == loo


# --------------------------------------------------------------------------- options and head


def test_ticl_defaults_dropout_schedule_and_no_adapter_bias():
    opts = TimeOptions()
    assert opts.dropout == (0.1, 0.3, 0.3, 0.1) and opts.adapter_bias is False
    assert opts.hidden == (512, 1024, 1024, 1024)
    assert layer_dropouts(opts.dropout, 4) == (0.1, 0.3, 0.3, 0.1)
    assert layer_dropouts(opts.dropout, 2) == (0.1, 0.1)
    assert layer_dropouts(opts.dropout, 3) == (0.1, 0.3, 0.1)
    assert layer_dropouts(opts.dropout, 5) == (0.1, 0.3, 0.3, 0.3, 0.1)
    assert layer_dropouts(opts.dropout, 1) == (0.1,)
    assert layer_dropouts(0.2, 3) == (0.2, 0.2, 0.2)
    assert TimeOptions(dropout=[0.0, 0.5]).dropout == (0.0, 0.5)
    for bad in (1.0, -0.1, [0.1, 1.5], []):
        with pytest.raises(ValueError):
            TimeOptions(dropout=bad)


def test_head_layers_follow_the_options():
    from training.tasks.time_of_day import TimeTask

    backbone = tiny_backbone()
    task = TimeTask(TimeOptions(), backbone)
    assert [m.p for m in task.hour_encoder.mlp if isinstance(m, torch.nn.Dropout)] == [0.1, 0.3, 0.3, 0.1]
    assert all(m.bias is None for m in task.adapter if isinstance(m, torch.nn.Linear))
    with_bias = TimeTask(TimeOptions(hidden=(16,), adapter_bias=True, dropout=0.2), backbone)
    assert all(m.bias is not None for m in with_bias.adapter if isinstance(m, torch.nn.Linear))
    assert [m.p for m in with_bias.month_encoder.mlp if isinstance(m, torch.nn.Dropout)] == [0.2]


def test_map_sample_reads_the_retrieval_role():
    from training.tasks.time_of_day import TimeTask
    from PIL import Image

    backbone = tiny_backbone()
    task = TimeTask(TimeOptions(hidden=(16,)), backbone)
    context = backbone.sample_context()
    image = Image.new("RGB", (64, 64))

    def mapped(**meta):
        return task.map_sample({"json": {"hour": 23, "minute": 59, "month": 12, **meta}, "image": image,
                                "__key__": "k"}, context, train=False)

    assert mapped()["role"] == -1
    assert mapped(retrieval_role="query")["role"] == 1 and mapped(retrieval_role="database")["role"] == 0
    assert mapped()["minutes"] == 1439 and mapped()["hour_bin"] == 23 and mapped()["month"] == 11
    with pytest.raises(ValueError, match="retrieval_role"):
        mapped(retrieval_role="gallery")


def test_head_forward_and_loss_on_tiny_backbone():
    from training.tasks.time_of_day import TimeTask

    backbone = tiny_backbone()
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


def test_converted_query_database_shards_run_ticls_protocol(tmp_path):
    """End to end: TOC-style query and database files -> one shard set with roles (shards.convert.toc)
    -> the time head's eval batches carry them -> its evaluation ranks the database for each query."""
    from PIL import Image

    from shards.convert.toc import convert_toc
    from training.data import eval_loader
    from training.tasks.time_of_day import TimeTask

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 100, 200 - 30 * i)).save(images / f"{i}.png")

    def rows(pairs):
        return json.dumps([{"ground_path": f"{i}.png", "time": f"2010-05-13 {hm}:00.0"} for i, hm in pairs])

    (tmp_path / "query_toc.json").write_text(rows([(0, "23:50"), (1, "12:00")]))
    (tmp_path / "test_database.json").write_text(rows([(2, "00:10"), (3, "12:20"), (4, "06:00"), (5, "18:00")]))
    summary = convert_toc(tmp_path / "test_database.json", images, tmp_path / "shards",
                          queries=tmp_path / "query_toc.json")
    assert summary["written"] == 6
    backbone = tiny_backbone()
    task = TimeTask(TimeOptions(hidden=(16,)), backbone).eval()
    batches = list(eval_loader(str(tmp_path / "shards"), task, backbone, 4))
    assert torch.cat([b["role"] for b in batches]).tolist() == [1, 1, 0, 0, 0, 0]
    out = task.evaluate(backbone.model.eval(), batches)
    # both queries have one positive (00:10 across midnight from 23:50; 12:20 from 12:00) among 4
    assert out["retrieval_num_queries"] == 2 and out["retrieval_num_database"] == 4
    assert out["retrieval_R@1_chance"] == pytest.approx(1 / 4) and out["retrieval_R@5"] == 1.0
    assert "retrieval_loo_R@1" in out and "hour_top1_baseline" in out


# --------------------------------------------------------------------------- learning


def test_time_head_beats_the_trivial_baselines(time_shards, tmp_path):
    """Trained with the real launcher on synthetic shards: held-out hour, month and MAE clearly better than
    the strongest constant prediction (held-out majority / best constant bin), not just than chance;
    retrieval runs the query/database protocol the synthetic val split marks, and beats random ranking."""
    from conftest import _train, _write_config, tiny_config

    run = tmp_path / "run"
    raw = tiny_config(time_shards, run, tasks=[{"name": "time", "options": {"hidden": [64, 128], "encoding": "cyclic"}}],
                      optim={"max_steps": 150, "micro_batch_size": 32, "warmup_steps": 10, "weight_decay": 0.05},
                      schedule={"log_every": 50}, eval={"max_samples": None, "batch_size": 200})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {k.split("/", 1)[1]: v for k, v in json.loads((run / "metrics.json").read_text())["after"].items()}
    print({k: v for k, v in after.items() if not isinstance(v, str)})
    assert after["hour_top1"] >= after["hour_top1_baseline"] + 0.15
    assert after["hour_top3"] >= after["hour_top3_baseline"] + 0.25
    assert after["hour_mae_minutes"] <= after["hour_mae_minutes_baseline"] - 120
    assert after["month_top1"] >= after["month_top1_baseline"] + 0.1
    assert after["month_mae"] <= after["month_mae_baseline"] - 0.5
    assert after["retrieval_num_queries"] >= 5  # the synthetic val split's query subset
    assert after["retrieval_R@1"] >= after["retrieval_R@1_chance"] + 0.1
    assert after["retrieval_loo_R@1"] >= after["retrieval_loo_R@1_chance"] + 0.1
