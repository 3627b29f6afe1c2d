"""geo_time (QR-CLIP): TARA metrics on hand-made labels, exact knowledge search, the extra [CLS] ViT."""
from __future__ import annotations

import json

import pytest
import torch

from shards.corpus import read_corpus
from training import knowledge, metrics


@pytest.mark.parametrize("label,expected", [
    ("2017-5-23", "May 23, 2017"), ("2017-5", "May, 2017"), ("2017", "2017"), ("1999-12", "December, 1999"),
    ("1990s", "1990s"), ("20 century", "20 century")])  # one-part labels stay, as TARA's time_label_2natural
def test_time_label_rewriting(label, expected):
    from serving.predictors.geo_time import rewrite_time_label

    assert rewrite_time_label(label) == expected


@pytest.mark.parametrize("bad", ["2017-13", "2017-5-32", "May 2017", "", "2017-5-3-1"])
def test_bad_time_labels_raise(bad):
    with pytest.raises(ValueError):
        metrics.time_hierarchy(bad)


def test_time_hierarchy_levels():
    # TARA's scorer's level names: "N century", "YYY0s", "YYYY", "YYYY-M", "YYYY-M-D"
    assert metrics.time_hierarchy("2017") == {"21 century", "2010s", "2017"}
    assert metrics.time_levels("2017-5") == ["21 century", "2010s", "2017", "2017-5"]
    assert len(metrics.time_hierarchy("2017-5-23")) == 5
    assert metrics.time_levels("2000")[:2] == ["20 century", "2000s"]  # 2000 closes the 20th century
    assert metrics.time_levels("2001")[0] == "21 century" and metrics.time_levels("100")[0] == "1st century"
    assert metrics.time_levels("0050")[:2] == ["1st century", "50s"]


def test_decade_and_century_labels_as_the_scorer_reads_them():
    assert metrics.time_levels("1990s") == ["20 century", "1990s"]  # [century, decade]
    assert metrics.time_levels("2000s") == ["20 century", "2000s"]
    assert metrics.time_levels("20 century") == ["20 century"]  # a century is one level
    assert metrics.time_levels("a photo taken in 1st century") == ["1st century"]
    f1 = metrics.example_f1
    # decade vs a year in it: share century and decade -> 2*2/(2+3)
    assert f1(["1990s"], ["1995"], metrics.time_hierarchy) == pytest.approx(0.8)
    # century vs a month: share the century -> 2*1/(1+4)
    assert f1(["20 century"], ["1995-5"], metrics.time_hierarchy) == pytest.approx(0.4)
    assert f1(["21 century"], ["20 century"], metrics.time_hierarchy) == 0.0
    # neighbouring years across a decade: only the century -> 2*1/(3+3)
    assert f1(["2000"], ["1999"], metrics.time_hierarchy) == pytest.approx(1 / 3)


def test_padded_and_prompt_form_dates():
    assert metrics.time_levels("2017-05-03") == metrics.time_levels("2017-5-3") == metrics.time_levels("May 3, 2017")
    assert metrics.time_levels("a photo taken in May, 2017") == ["21 century", "2010s", "2017", "2017-5"]
    assert metrics.example_f1(["2017-05-03"], ["2017-5-3"], metrics.time_hierarchy) == 1.0


@pytest.mark.parametrize("label,parts", [
    ("France", ["France"]),
    ("Paris, France", ["Paris", "France"]),
    ("Brooklyn, New York, United States", ["Brooklyn", "New York", "United States"]),
    ("Park Slope, Brooklyn, New York, United States", ["Park Slope, Brooklyn", "New York", "United States"]),
    ("A, B, C, D, E", ["A, B, C", "D", "E"]),
    ("a photo taken in Brooklyn, New York, United States", ["Brooklyn", "New York", "United States"]),
])
def test_location_hierarchy_split_rule(label, parts):
    assert metrics.location_levels(label) == parts
    assert metrics.location_hierarchy(label) == set(parts)
    assert sorted(v.split(":", 1)[1] for v in metrics.location_hierarchy(label, depth_aware=True)) == sorted(parts)


def test_example_f1_hand_made():
    # time: pred 2017-5 vs gold 2017-5-23 -> |P|=4, |G|=5, overlap 4 -> 8/9
    assert metrics.example_f1(["2017-5"], ["2017-5-23"], metrics.time_hierarchy) == pytest.approx(8 / 9)
    # time: 1995 vs 2017 -> century 20 vs 21, decade, year differ -> 0
    assert metrics.example_f1(["1995"], ["2017"], metrics.time_hierarchy) == 0.0
    # location: same country and state, other city -> 2*2/(3+3) = 2/3; exact -> 1; mean of both
    preds = ["Queens, New York, United States", "Paris, France"]
    golds = ["Brooklyn, New York, United States", "Paris, France"]
    assert metrics.example_f1(preds, golds, metrics.location_hierarchy) == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.example_f1(["New York, United States"], [golds[0]], metrics.location_hierarchy) == pytest.approx(0.8)


def test_location_names_match_across_levels_as_the_scorer_does():
    """The scorer compares plain names: "Georgia" the country and "Georgia" the state's level both count."""
    loc, depth = metrics.location_hierarchy, metrics.location_hierarchy_depth_aware
    pred, gold = "Georgia, United States", "Tbilisi, Georgia"
    assert metrics.example_f1([pred], [gold], loc) == pytest.approx(0.5)  # 2*1/(2+2)
    assert metrics.example_f1([pred], [gold], depth) == 0.0  # the depth-aware option
    # the prompt prefix the scorer leaves glued to the first part ("a photo taken in Georgia") is dropped
    prompted = [f"a photo taken in {pred}"], [f"a photo taken in {gold}"]
    assert metrics.example_f1(*prompted, loc) == pytest.approx(0.5)


def test_repeated_names_count_once():
    """The scorer intersects sets but divides by list lengths: an identical label with a repeated name
    scores 2*2/(3+3) = 2/3 against itself there. Here both sides are sets."""
    ny = "New York, New York, United States"
    assert metrics.example_f1([ny], [ny], metrics.location_hierarchy) == 1.0
    # P = {New York, United States}, G = {Brooklyn, New York, United States}: 2*2/(2+3)
    assert metrics.example_f1([ny], ["Brooklyn, New York, United States"], metrics.location_hierarchy) == \
        pytest.approx(0.8)
    assert metrics.example_f1([ny], [ny], metrics.location_hierarchy_depth_aware) == 1.0  # depths tell them apart


def test_time_prompts_keep_decades_and_centuries():
    from training.tasks.geo_time import prompt_text

    assert prompt_text("a photo taken in {}", "time", "1990s") == "a photo taken in 1990s"
    assert prompt_text("a photo taken in {}", "time", "20 century") == "a photo taken in 20 century"
    assert prompt_text("a photo taken in {}", "time", "2017-05-03") == "a photo taken in May 3, 2017"


def test_trivial_baselines_and_ties():
    from training.tasks.geo_time import most_common, prior_rules, score_with_baselines

    assert most_common(["b", "a", "b", "a", "c"]) == "a"  # a tie goes to the first in sorted order
    golds = ["A, X, R"] * 3 + ["B, X, R"] + ["C, Y, R"] * 2 + ["D, Y, R"] * 2
    rules = prior_rules("location", golds)
    assert rules["majority"] == ["A, X, R"] * 8
    # parent prior: country X -> its common city A; country Y: C and D tie -> C
    assert rules["parent prior"] == ["A, X, R"] * 4 + ["C, Y, R"] * 4
    candidates = sorted(set(golds))
    result = score_with_baselines("location", {"base": golds, "knowledge": ["A, X, R"] * 8}, golds, candidates,
                                  unseen={"B, X, R"})
    assert result["location_top1_base"] == 1.0 and result["location_top1_knowledge"] == 3 / 8
    assert result["location_top1_base_chance"] == 1 / 4
    assert result["location_top1_base_baseline"] == 5 / 8  # 3 A + 2 C
    assert result["location_top1_base_baseline_rule"] == "parent prior"
    # Example-F1 of majority: A 1 (x3), B 2/3, C and D 1/3 (x4) -> 5/8; of the parent prior: 7/8
    assert result["location_example_f1_base_baseline"] == pytest.approx(7 / 8)
    assert result["location_example_f1_knowledge"] == pytest.approx(5 / 8)
    # chance F1: mean over the 4 candidates; for gold A: (1 + 2/3 + 1/3 + 1/3) / 4
    per_gold = {"A": (1 + 2 / 3 + 2 / 3) / 4, "B": (1 + 2 / 3 + 2 / 3) / 4, "C": (1 + 2 / 3 + 2 / 3) / 4,
                "D": (1 + 2 / 3 + 2 / 3) / 4}
    assert result["location_example_f1_base_chance"] == pytest.approx(sum(per_gold.values()) / 4)
    # the unseen label: the priors, fitted on all held-out labels, never answer it
    assert result["location_top1_base_unseen"] == 1.0 and result["location_top1_knowledge_unseen"] == 0.0
    assert result["location_top1_base_unseen_baseline"] == 0.0 and result["location_examples_unseen"] == 1
    assert result["location_top1_base_seen"] == 1.0 and result["location_examples_seen"] == 7
    # time: the parent prior reads the year of a month label, the decade of a year label
    times = ["2017-5", "2017-5", "2017-6", "2017", "2012", "2012"]
    assert prior_rules("time", times)["parent prior"] == ["2017-5", "2017-5", "2017-5", "2012", "2012", "2012"]


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


def test_open_world_cities_known_only_from_the_corpus(tmp_path):
    """QR-CLIP's claim on the synthetic world: held-out photos of the knowledge-only cities (never in
    training, described in knowledge.txt like every other city). Two stages as QR-CLIP trains; every
    figure is compared with the strongest trivial baseline, not with uniform chance. The relevance stage
    trains against the training set's labels only (QR-CLIP's protocol: labels.json's ``unseen`` labels are
    left out of the training candidates), evaluation scores all the held-out labels.

    What holds and is asserted: on the seen cities the relevance module with the retrieved texts beats
    the quantity module, and overall it beats the majority label; the label priors (majority, parent
    prior: the country's common city) score 0 on the unseen cities, as they only answer labels they have
    seen, while the relevance module does answer some (0.224; 0.084 with the unseen labels among the
    training candidates, ``train_on_unseen_candidates``, whose cross-entropy pushes them down; with
    run.seed 1: 0.047 vs 0.037, the quantity module 0.121, so the figure depends on stage 1's luck; the
    protocol costs the seen cities 0.614 -> 0.519, seed 1 0.706 -> 0.628, as unseen candidates are no
    longer pushed down).
    What does NOT hold at this size, so it is not asserted (measured on these 400 held-out photos, 107 of
    unseen cities): that the knowledge helps on the unseen cities. Top-1 there: knowledge 0.224, the
    no-knowledge control 0.178, the quantity module 0.271, the priors 0.0. The blocker is retrieval: the
    from-scratch towers put a photo's location tokens at cosine ~0.4-0.5 from its own label prompt while
    distractor texts sit at ~0.6, so the top-4 texts per token include the gold city's text for 0 of the
    107 unseen-city photos (recall@16 with the world's ``knowledge_prompt_form`` texts: 0.075), and the
    retrieved texts add nothing the control lacks
    (seen 0.519 vs 0.560). Nor does it reach the parent prior overall (0.440 vs 0.713), a rule that reads
    the country from the gold label.
    Compositional unseen cities do not change it (``describe_geo(0, borrowed_landmarks=True)``: each shows a
    common seen city's landmark, from another region, under its own flag, and every city has a signature
    text naming landmark and flag; the training photos, hence the seen figures, are the default world's).
    Unseen top-1 base / knowledge / control: 0.252 / 0.187 / 0.168 with these options; 0.056 / 0.028 /
    0.019 with ``description_field: description`` + ``retrieve_with_image`` (seen 0.549 / 0.652 / 0.648).
    Gold-text recall@4 of unseen photos: 0.000 (tokens and image) here, 0.047 (tokens) / 0.009 (image)
    with description training. A second blocker shows there: the from-scratch text tower does not read
    a name it never trained on. Of the 24 corpus texts naming an unseen city, those whose nearest of the
    18 candidate prompts is that city's own: 8 here, 2 with description training; an unseen city's prompt
    finds none of its own texts among its top 4 with description training (0-1 of 4 here). So a retrieved text would not point at its label either;
    matching the photo's retrieved texts against each candidate prompt's own retrieved texts gives at
    best 0.318 unseen here for 0.215 seen (base 0.252 / 0.355). Time cannot gain: the world has no
    knowledge-only times (a time label pairs a year's car with a month's ground, which the corpus
    describes in separate texts; see ``shards.synth.geo_time.labels_of``).
    (Figures measured before session 12's loader seeds, which moved every trajectory; the assertions pass
    with them.)
    """
    from conftest import _train, _write_config, tiny_config
    from shards.synth import write_split
    from shards.synth.geo_time import describe_geo, write_geo_extras

    data = tmp_path / "geo"
    meta = {**describe_geo(0), "unseen_val_weight": 0.3}  # about a quarter of the held-out photos
    write_split(data / "train", "geo_time", 2400, 0, 200, 64, meta, "train", False)
    write_split(data / "val", "geo_time", 400, 0, 200, 64, meta, "val", False)
    write_geo_extras(data, meta, 0)
    options = {"num_cls_tokens": 2, "knowledge_corpus": str(data / "knowledge.txt"),
               "labels_file": str(data / "labels.json"), "relevance_hidden": 64}
    quantity, relevance = tmp_path / "quantity", tmp_path / "relevance"
    raw = tiny_config(data, quantity, tasks=[{"name": "geo_time", "options": {**options, "stage": "quantity"}}],
                      optim={"max_steps": 150, "micro_batch_size": 32, "warmup_steps": 10},
                      schedule={"log_every": 50}, eval={"max_samples": None, "batch_size": 200})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = tiny_config(data, relevance, tasks=[{"name": "geo_time", "options": {**options, "stage": "relevance"}}],
                      model={"init_weights": str(quantity / "final" / "model.safetensors")},
                      optim={"max_steps": 100, "micro_batch_size": 32, "warmup_steps": 2, "freeze_backbone": True},
                      schedule={"log_every": 10}, eval={"max_samples": None, "batch_size": 200})
    proc = _train(_write_config(tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage1, stage2 = (json.loads((run / "metrics.json").read_text()) for run in (quantity, relevance))
    # stage 2 starts from stage 1's weights: the quantity module's predictions are unchanged
    assert stage2["before"]["geo_time/location_top1_base"] == stage1["after"]["geo_time/location_top1_base"]
    assert stage2["after"]["geo_time/location_top1_base"] == stage1["after"]["geo_time/location_top1_base"]
    assert (relevance / "final" / "model.safetensors").is_file()
    after = {k.removeprefix("geo_time/"): v for k, v in stage2["after"].items()}
    assert after["location_examples_unseen"] >= 60
    for name in ("base", "knowledge", "no_knowledge"):
        assert after[f"location_top1_{name}_unseen_baseline"] == 0.0  # priors never answer an unseen label
        assert after[f"location_top1_{name}_baseline_rule"] == "parent prior"
    # seen cities: knowledge beats the quantity module (measured 0.614 vs 0.355, 293 photos)
    assert after["location_top1_knowledge_seen"] >= after["location_top1_base_seen"] + 0.1
    # unseen cities: the relevance module answers some, the priors none (measured 0.224; run.seed 1: 0.047)
    assert after["location_top1_knowledge_unseen"] > 0.0
    # all held-out photos: knowledge beats the majority label (measured 0.472 vs majority below 0.2);
    # the parent prior, which reads the country from the gold label, stays ahead (0.713)
    import webdataset as wds
    from shards.samples import expand_urls
    from training.tasks.geo_time import prior_rules

    golds = [json.loads(s["json"])["gold_location"]
             for s in wds.WebDataset(expand_urls(str(data / "val")), shardshuffle=False)]
    majority = sum(p == g for p, g in zip(prior_rules("location", golds)["majority"], golds)) / len(golds)
    assert majority < 0.25 and after["location_top1_knowledge"] >= majority + 0.15
    assert after["location_top1_knowledge_baseline"] > majority  # the reported baseline is the stronger rule


def test_relevance_training_candidates_leave_out_unseen_labels(tmp_path):
    """QR-CLIP's protocol: the relevance module trains against the training set's labels; labels.json's
    ``unseen`` labels are no training target nor candidate unless ``train_on_unseen_candidates``."""
    from training.config import ModelConfig
    from training.backbone import create_backbone
    from training.tasks.geo_time import GeoTimeOptions, GeoTimeTask

    from conftest import ROOT

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"location": ["A, X, R", "B, X, R", "C, X, R"], "time": ["2017", "2017-5"],
                                  "unseen": {"location": ["C, X, R"], "time": []}}))
    corpus = tmp_path / "knowledge.txt"
    corpus.write_text("a photo taken in C, X, R shows its tall red tower\nsomething else\n")
    backbone = create_backbone(ModelConfig(name="tiny-vit", model_config_dir=str(ROOT / "configs" / "models")))
    common = {"num_cls_tokens": 1, "stage": "relevance", "labels_file": str(labels), "knowledge_corpus": str(corpus)}
    task = GeoTimeTask(GeoTimeOptions(**common), backbone)
    assert task.train_labels == {"location": ["A, X, R", "B, X, R"], "time": ["2017", "2017-5"]}
    assert task.labels["location"] == ["A, X, R", "B, X, R", "C, X, R"]  # exported / served candidates
    task.prepare(backbone.model, cache=False)
    assert task.candidate_emb["location"].shape[0] == 2
    with pytest.raises(ValueError, match="marked unseen"):
        task._candidate_index("location", ["C, X, R"], "cpu")
    keep = GeoTimeTask(GeoTimeOptions(**common, train_on_unseen_candidates=True), backbone)
    assert keep.train_labels["location"] == task.labels["location"]
    assert keep._candidate_index("location", ["C, X, R"], "cpu").tolist() == [2]
