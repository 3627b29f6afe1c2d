"""geo_time (QR-CLIP): TARA metrics on hand-made labels, exact knowledge search, the extra [CLS] ViT."""
from __future__ import annotations

import pytest
import torch

from shards.corpus import read_corpus
from training import knowledge, metrics


@pytest.mark.parametrize("label,expected", [
    ("2017-5-23", "May 23, 2017"), ("2017-5", "May, 2017"), ("2017", "2017"), ("1999-12", "December, 1999")])
def test_time_label_rewriting(label, expected):
    from serving.predictors.geo_time import rewrite_time_label

    assert rewrite_time_label(label) == expected


@pytest.mark.parametrize("bad", ["2017-13", "2017-5-32", "May 2017", "", "2017-5-3-1"])
def test_bad_time_labels_raise(bad):
    with pytest.raises(ValueError):
        metrics.time_hierarchy(bad)


def test_time_hierarchy_levels():
    assert metrics.time_hierarchy("2017") == {"century:21", "decade:2010", "year:2017"}
    assert metrics.time_hierarchy("2017-5") == {"century:21", "decade:2010", "year:2017", "month:2017-5"}
    assert len(metrics.time_hierarchy("2017-5-23")) == 5
    assert "century:20" in metrics.time_hierarchy("2000") and "decade:2000" in metrics.time_hierarchy("2000")


@pytest.mark.parametrize("label,parts", [
    ("France", ["France"]),
    ("Paris, France", ["Paris", "France"]),
    ("Brooklyn, New York, United States", ["Brooklyn", "New York", "United States"]),
    ("Park Slope, Brooklyn, New York, United States", ["Park Slope, Brooklyn", "New York", "United States"]),
    ("A, B, C, D, E", ["A, B, C", "D", "E"]),
])
def test_location_hierarchy_split_rule(label, parts):
    levels = metrics.location_hierarchy(label)
    assert sorted(v.split(":", 1)[1] for v in levels) == sorted(parts)


def test_example_f1_hand_made():
    # time: pred 2017-5 vs gold 2017-5-23 -> |P|=4, |G|=5, overlap 4 -> 8/9
    assert metrics.example_f1(["2017-5"], ["2017-5-23"], metrics.time_hierarchy) == pytest.approx(8 / 9)
    # time: 1995 vs 2017 -> share nothing but... century 20 vs 21, decade, year differ -> 0
    assert metrics.example_f1(["1995"], ["2017"], metrics.time_hierarchy) == 0.0
    # location: same country and state, other city -> 2*2/(3+3) = 2/3; exact -> 1; mean of both
    preds = ["Queens, New York, United States", "Paris, France"]
    golds = ["Brooklyn, New York, United States", "Paris, France"]
    assert metrics.example_f1(preds, golds, metrics.location_hierarchy) == pytest.approx((2 / 3 + 1) / 2)
    # levels align from the end: "New York, United States" vs the 3-part gold shares 2 -> 2*2/(2+3)
    assert metrics.example_f1(["New York, United States"], [golds[0]], metrics.location_hierarchy) == pytest.approx(0.8)


def test_blocked_search_equals_full_sort():
    torch.manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(1000, 16), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(7, 16), dim=1)
    scores, ids = knowledge.search(queries, corpus, k=5, block_size=64)
    full = queries @ corpus.T
    ref_scores, ref_ids = full.topk(5, dim=1)
    assert torch.equal(ids, ref_ids) and torch.allclose(scores, ref_scores)
    # ties go to the lower id, across block boundaries too
    dup = torch.cat([corpus[:1]] * 3)
    _, tie_ids = knowledge.search(corpus[:1], dup, k=3, block_size=2)
    assert tie_ids.tolist() == [[0, 1, 2]]


def test_read_corpus_formats(tmp_path):
    (tmp_path / "c.txt").write_text("first\n\nsecond\n")
    (tmp_path / "c.csv").write_text("id,text\n1,first\n2,second\n")
    (tmp_path / "c.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n')
    for name in ("c.txt", "c.csv", "c.jsonl"):
        assert read_corpus(tmp_path / name) == ["first", "second"]
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "missing.txt")


def test_extra_cls_tokens_start_as_copies_of_cls():
    """With no extra tokens the forward is open_clip's own; new tokens start as copies of [CLS] (same
    input, same projection), so at initialisation their outputs equal the [CLS] output of that forward."""
    from training.config import ModelConfig
    from training.backbone import create_backbone
    from training.tasks.geo_time import GeoTimeOptions, GeoTimeTask, vit_with_extra_tokens

    from conftest import ROOT

    backbone = create_backbone(ModelConfig(name="tiny-vit", model_config_dir=str(ROOT / "configs" / "models")))
    model = backbone.model.eval()
    images = torch.randn(3, 3, 64, 64)
    image, _ = vit_with_extra_tokens(model.visual, images, torch.empty(0, model.visual.class_embedding.shape[0]))
    assert torch.allclose(image, model.encode_image(images), atol=1e-5)
    task = GeoTimeTask(GeoTimeOptions(num_cls_tokens=2, stage="quantity"), backbone).eval()
    image, tokens = task.encode(model, images)
    assert image.shape == (3, backbone.embed_dim) and tokens["location"].shape == (3, 2, backbone.embed_dim)
    for quantity in ("location", "time"):
        for k in range(2):
            assert torch.allclose(tokens[quantity][:, k], image, atol=1e-5)
