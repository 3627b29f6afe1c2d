"""meme (CLIP4Meme): metrics on hand-made cases, the converter, the tiny BERT round trip, the head."""
from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT
from shards.convert import main as convert_main
from shards.synth.meme import REACTIONS, describe_meme, make_meme_sample, write_tiny_bert
from training.config import ConfigError
from serving.predictors.meme import meme_fields
from training.losses import symmetric_infonce
from training.tasks.meme import (FrozenEmotionEncoder, branch_scores, caption_id, choose_alpha,
                                 encode_text_with_tokens, score_meme)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert-tiny")


# --------------------------------------------------------------------------- metrics


def test_score_meme_recall_and_precision_on_a_hand_made_gallery():
    captions = ["cat joy", "cat joy", "dog rage"]  # items 0 and 1 share a query: positives of each other
    sim = torch.tensor([[0.1, 0.9, 0.5],   # query 0: top-1 is item 1 (positive)
                        [0.2, 0.1, 0.8],   # query 1: item 2 (negative), then item 0 (positive)
                        [0.9, 0.3, 0.1]])  # query 2: its only positive (itself) is last
    out = score_meme({"qi": sim}, captions, ks=(1, 2, 3))
    assert out["qi_R@1"] == pytest.approx(1 / 3)
    assert out["qi_R@2"] == pytest.approx(2 / 3)
    assert out["qi_R@3"] == pytest.approx(1.0)
    assert out["qi_P@1"] == pytest.approx(1 / 3)
    assert out["qi_P@2"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)  # one positive in the top 2 of queries 0, 1
    assert out["qi_P@3"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    assert out["R@1_chance"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    assert out["num_samples"] == 3


def test_case_variant_captions_are_not_positives_and_ties_go_to_the_lower_index():
    # exact strings, as the original's caption_to_indices: "Cat joy" and "cat joy" are different queries
    captions = ["Cat joy", "cat joy", "dog rage", "dog rage"]
    sim = torch.tensor([[0.5, 0.9, 0.1, 0.1],   # q0: top-1 is its case variant (a miss), itself second
                        [0.7, 0.7, 0.2, 0.2],   # q1: tie of items 0 and 1 -> item 0 (lower index) first: a miss
                        [0.3, 0.3, 0.3, 0.3],   # q2: all tied -> 0, 1, 2, 3: first positive at rank 3
                        [0.0, 0.0, 0.4, 0.4]])  # q3: item 2 first (tie with 3), a hit
    out = score_meme({"fused": sim}, captions, ks=(1, 2, 3))
    assert out["fused_R@1"] == pytest.approx(1 / 4)
    assert out["fused_R@2"] == pytest.approx(3 / 4)
    assert out["fused_R@3"] == pytest.approx(1.0)
    assert out["fused_P@1"] == pytest.approx(1 / 4)
    assert out["fused_P@2"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 1) / 4)
    assert out["fused_P@3"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 3 + 2 / 3) / 4)
    # uniform chance: n_pos / G for R@1 and every P@k; R@2 = 1 - C(G - n, 2) / C(G, 2)
    assert out["R@1_chance"] == pytest.approx((1 + 1 + 2 + 2) / 4 / 4)
    assert out["P@3_chance"] == pytest.approx(out["R@1_chance"])
    assert out["R@2_chance"] == pytest.approx((2 * (1 - 3 / 6) + 2 * (1 - 1 / 6)) / 4)
    # caption-frequency prior: R@k ranks one item per caption by frequency (2, 0, 1, then 3);
    # P@k ranks by frequency alone (2, 3, 0, 1)
    assert out["R@1_baseline"] == pytest.approx(2 / 4) and out["R@2_baseline"] == pytest.approx(3 / 4)
    assert out["R@3_baseline"] == pytest.approx(1.0)
    assert out["P@1_baseline"] == pytest.approx(2 / 4) and out["P@2_baseline"] == pytest.approx(2 / 4)
    assert out["P@3_baseline"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 0) / 4)
    assert "caption-frequency" in out["R@1_baseline_rule"]


def test_loss_positives_are_exact_caption_strings():
    assert caption_id("cat joy") == caption_id("cat joy")
    assert caption_id("Cat joy") != caption_id("cat joy") and caption_id("cat joy ") != caption_id("cat joy")
    ids = torch.tensor([caption_id(c) for c in ["cat joy", "Cat joy", "cat joy"]])
    a = torch.eye(3)
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logits = 2.0 * a @ b.T  # rows 0 and 2 are positives of each other, row 1 only of itself
    log_p, log_pt = logits.log_softmax(1), logits.T.log_softmax(1)
    positives = [[0, 2], [1], [0, 2]]
    expected = sum(-log_p[i, p].mean() - log_pt[i, p].mean() for i, p in enumerate(positives)) / 6
    assert torch.allclose(symmetric_infonce(a, b, ids, torch.tensor(2.0)), expected)


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_shared_scale_fusion_weights_the_cosines_by_alpha_alone():
    # query [1, 0]: cos = the first coordinate. cos_QI = [0.9, 0.6], cos_QC = [0.1, 0.5]
    emb = {"query": _unit([1.0, 0.0]), "qi": _unit([0.9, 0.19 ** 0.5], [0.6, 0.8]),
           "context": _unit([0.1, 0.99 ** 0.5], [0.5, 0.75 ** 0.5])}
    shared = branch_scores(emb, {"fusion": "shared_scale", "logit_scale": 10.0, "alpha": 0.5})
    # (0.5 * cos_QI + 0.5 * cos_QC) / T: item 0 0.5, item 1 0.55
    assert torch.allclose(shared["fused"], torch.tensor([[5.0, 5.5]]), atol=1e-5)
    assert torch.allclose(shared["qi"], torch.tensor([[9.0, 6.0]]), atol=1e-5)
    assert int(shared["fused"].argmax()) == 1
    # separate scales 70 and 10: alpha 0.5 weights QI 70 / 80 = 0.875, so item 0 wins (the old behaviour)
    separate = branch_scores(emb, {"fusion": "separate_scales", "qi_logit_scale": 70.0, "qc_logit_scale": 10.0,
                                   "alpha": 0.5})
    assert torch.allclose(separate["fused"], torch.tensor([[0.5 * 63 + 0.5 * 1, 0.5 * 42 + 0.5 * 5]]), atol=1e-4)
    assert int(separate["fused"].argmax()) == 0
    alpha_one = branch_scores(emb, {"fusion": "shared_scale", "logit_scale": 10.0, "alpha": 1.0})
    assert torch.equal(alpha_one["fused"], alpha_one["qi"])


def test_fused_score_can_beat_both_branches():
    # QI knows the feeling (item 0 over 1), QC the object (item 0 over 2); only the mix ranks item 0 first
    emb = {"query": torch.tensor([[1.0, 0.0]]),
           "qi": torch.tensor([[0.9, 0.436], [0.0, 1.0], [1.0, 0.0]]),
           "context": torch.tensor([[0.9, 0.436], [1.0, 0.0], [0.0, 1.0]])}
    scores = branch_scores(emb, {"logit_scale": 2.0, "alpha": 0.5})  # fusion defaults to shared_scale
    top = {name: int(s.argmax()) for name, s in scores.items()}
    assert top == {"qi": 2, "qc": 1, "fused": 0}


def test_auto_alpha_is_the_best_grid_alpha_with_ties_to_the_one_nearest_half():
    # QI right, QC inverted: fused R@1 is 1 for alpha > 0.5, 0.5 at 0.5 (tie -> item 0), 0 below
    emb = {"query": _unit([1.0, 0.0], [0.0, 1.0]), "qi": _unit([1.0, 0.0], [0.0, 1.0]),
           "context": _unit([0.0, 1.0], [1.0, 0.0])}
    meta = {"fusion": "shared_scale", "logit_scale": 5.0}
    assert choose_alpha(emb, ["a", "b"], meta) == pytest.approx(0.55)
    # both branches perfect: every alpha ties, so 0.5
    perfect = {**emb, "context": emb["qi"]}
    assert choose_alpha(perfect, ["a", "b"], meta) == pytest.approx(0.5)


def test_auto_alpha_needs_a_validation_split():
    from pydantic import ValidationError

    from training.tasks.meme import MemeOptions

    with pytest.raises(ValidationError, match="alpha_validation"):
        MemeOptions(alpha="auto")
    assert MemeOptions(alpha="auto", alpha_validation="data/tune").alpha == "auto"
    defaults = MemeOptions()
    assert (defaults.fusion, defaults.co_attention, defaults.emotion_add) == ("shared_scale", "parallel", "raw")


# --------------------------------------------------------------------------- converter


def _image(path: Path) -> None:
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)


@pytest.fixture()
def meme_files(tmp_path) -> dict[str, Path]:
    """Records shaped like the published CLIP4Meme files, with every case the original's loader decides."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("m1.jpg", "m2.png", "m3.jpg", "m4.jpg", "notitle.jpg"):
        _image(images / name)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    emotions = tmp_path / "emotions.json"
    emotions.write_text(json.dumps([
        {"video_id": "m1", "emotion": [{"person_1": "Happy"}, {"person_2": "sad"}]},  # not lower-cased
        {"video_id": "m2", "emotion": ["angry"]},
        {"video_id": "m2", "emotion": [{"person_1": "Furious"}]},   # repeated entry: the last copy wins
        {"video_id": "m4", "emotion": ["sad"]},
        {"video_id": "gone", "emotion": ["sad"]},
        {"video_id": "broken", "emotion": ["sad"]},
        {"video_id": "notitle", "emotion": []},                    # an entry, though empty: kept
        {"emotion": [{"person_1": "ignored: no id"}]},
    ]))                                                            # m3: no entry at all
    train = tmp_path / "train.json"
    train.write_text(json.dumps({
        "sentences": [
            {"video_id": "m1", "caption": "when the code works"},  # duplicate_meme_id: superseded below
            {"video_id": "m1", "caption": "Monday Again"},         # the last caption of m1 is kept, as written
            {"video_id": "m2", "caption": "so mad"},               # found as m2.png
            {"video_id": "m3", "caption": "no emotions entry"},    # missing_emotions
            {"video_id": "gone", "caption": "image missing"},      # missing_image
            {"video_id": "broken", "caption": "image corrupt"},    # corrupt_image
            {"video_id": "m4", "caption": "  "},                   # missing_query
            {"video_id": "notitle", "caption": "no context"},      # kept with context ""
            {"caption": "no id"},                                  # bad_row
            "not an object",                                       # bad_row
        ],
        "titles": {"m1": ["a cat at a laptop", "second title unused"], "m2": ["An Angry Man"], "m3": ["a dog"],
                   "m4": ["x"], "gone": ["x"], "broken": ["y"], "notitle": []},
    }))
    test = tmp_path / "test.json"
    test.write_text(json.dumps({
        "m1": {"gt": "when the code works", "titles": ["a cat at a laptop"]},
        "m2": {"gt": "", "titles": ["an angry man"]},              # missing_query
        "m3": {"gt": "dog day", "titles": ["a dog"]},              # missing_emotions
        "notitle": {"gt": "Dog Day", "titles": [""]},              # empty title: empty context, kept
        "gone": {"gt": "nothing", "titles": ["z"]},                # missing_image
    }))
    return {"images": images, "emotions": emotions, "train": train, "test": test}


def _samples(out: Path) -> list[dict]:
    metas = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return metas


def _convert(files, layout: str, out: Path) -> dict:
    return convert_main(["meme", "--annotations", str(files[layout]), "--emotions", str(files["emotions"]),
                         "--images", str(files["images"]), "--out", str(out)])


def test_converter_keeps_the_original_loaders_items_and_counts_drops_by_reason(meme_files, tmp_path):
    summary = _convert(meme_files, "train", tmp_path / "out")
    assert summary == {"read": 10, "written": 3, "skipped": {
        "bad_row": 2, "corrupt_image": 1, "duplicate_meme_id": 1, "missing_emotions": 1, "missing_image": 1,
        "missing_query": 1}}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    by_id = {s["video_id"]: s for s in _samples(tmp_path / "out")}
    assert set(by_id) == {"m1", "m2", "notitle"}  # one item per meme id
    m1 = by_id["m1"]
    assert m1["caption"] == "Monday Again" and m1["label"] == "Monday Again"  # last caption, case kept
    assert m1["task"] == "meme" and m1["source"] == "m1.jpg"
    assert m1["context"] == "a cat at a laptop" and m1["emotions"] == ["Happy", "sad"]
    assert by_id["m2"]["emotions"] == ["Furious"] and by_id["m2"]["source"] == "m2.png"
    assert by_id["m2"]["context"] == "An Angry Man"
    assert by_id["notitle"]["context"] == "" and by_id["notitle"]["emotions"] == []
    assert meme_fields(by_id["notitle"]) == ("no context", "", [])  # an empty context is a valid sample


def test_converter_reads_the_test_layout(meme_files, tmp_path):
    summary = _convert(meme_files, "test", tmp_path / "out")
    assert summary == {"read": 5, "written": 2, "skipped": {"missing_emotions": 1, "missing_image": 1,
                                                            "missing_query": 1}}
    by_id = {s["video_id"]: s for s in _samples(tmp_path / "out")}
    assert by_id["m1"]["caption"] == "when the code works" and by_id["m1"]["context"] == "a cat at a laptop"
    assert by_id["m1"]["emotions"] == ["Happy", "sad"]
    assert by_id["notitle"]["caption"] == "Dog Day" and by_id["notitle"]["context"] == ""


def test_meme_fields_allows_an_empty_context_but_not_an_empty_caption():
    assert meme_fields({"caption": "So Mad", "context": "", "emotions": ["Angry"]}) == ("So Mad", "", ["Angry"])
    with pytest.raises(ValueError, match="json.caption"):
        meme_fields({"caption": " ", "context": "a dog"})
    with pytest.raises(ValueError, match="json.context"):
        meme_fields({"caption": "so mad"})


def test_converter_rejects_an_unknown_layout_naming_the_file(meme_files, tmp_path):
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"video_id": "m1"}]))
    meme_files["odd"] = odd
    with pytest.raises(ValueError, match="odd.json"):
        _convert(meme_files, "odd", tmp_path / "out")
    meme_files["emotions"].write_text("{broken")
    with pytest.raises(ValueError, match="emotions.json"):
        _convert(meme_files, "train", tmp_path / "out2")


# --------------------------------------------------------------------------- tiny BERT


def test_tiny_bert_round_trip_through_from_pretrained(tiny_bert):
    from transformers import BertModel, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(tiny_bert))
    assert tokenizer.tokenize("Happy calm") == ["happy", "calm"]  # whole emotion words, lower-cased
    assert "[UNK]" not in tokenizer.tokenize("grumpy")           # anything else falls back to letters
    model = BertModel.from_pretrained(str(tiny_bert)).eval()
    encoder = FrozenEmotionEncoder(str(tiny_bert), max_length=16)
    tokens = tokenizer(["happy"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**tokens).last_hidden_state.mean(dim=1)
    got = encoder.encode(["happy", "sad", "happy"], torch.device("cpu"))
    assert torch.allclose(got[0], expected[0], atol=1e-6) and torch.equal(got[0], got[2])
    assert not torch.allclose(got[0], got[1])
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert set(encoder.cache) == {"happy", "sad"}  # each distinct text ran through BERT once


def test_missing_bert_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="options.bert"):
        FrozenEmotionEncoder(str(tmp_path / "no-such-bert"), max_length=8)


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_queries_need_the_emotion_and_the_object():
    meta = describe_meme(0)
    held_out = {tuple(t) for t in meta["held_out"]}
    seen = set()
    for i in range(300):
        _, fields = make_meme_sample(random.Random(f"t/{i}"), "train", 64, meta)
        emotion = fields["emotion"]
        assert fields["emotions"][0] == emotion and fields["caption"].startswith(REACTIONS[emotion])
        assert not any(word in fields["context"] for word in REACTIONS)  # the context never names a feeling
        assert not any(word in fields["caption"].split() for word in REACTIONS)  # nor does the query
        colour_shape = " ".join(fields["caption"].split()[-2:])
        assert colour_shape in fields["context"]  # the context names the main object
        assert not fields["held_out"]
        seen.add((emotion, *fields["caption"].split()[-2:]))
    assert not seen & held_out
    assert len(held_out) == 32


# --------------------------------------------------------------------------- the head


@pytest.fixture(scope="module")
def backbone():
    from training.config import ModelConfig
    from training.backbone import create_backbone

    torch.manual_seed(0)
    return create_backbone(ModelConfig(name="tiny-vit", model_config_dir=str(ROOT / "configs" / "models")))


def test_token_states_pool_to_open_clip_text_embedding_and_mask_padding(backbone):
    model = backbone.model.eval()
    text = backbone.tokenizer(["a red circle", "pure joy about the blue cross at the top"])
    pooled, states, padding = encode_text_with_tokens(model, text)
    with torch.no_grad():
        assert torch.allclose(pooled, model.encode_text(text), atol=1e-5)
    assert states.shape[:2] == text.shape and padding.shape == text.shape
    assert padding[0].tolist() == [False] * 5 + [True] * (text.shape[1] - 5)  # sot a red circle eot


def test_meme_head_trains_both_branches_and_stages_freeze(backbone, tiny_bert):
    from torch.utils.data import default_collate

    from training.tasks.meme import MemeOptions, MemeTask

    meta = describe_meme(0)
    samples = []
    for i in range(6):
        images, fields = make_meme_sample(random.Random(f"h/{i}"), "train", 64, meta)
        image = Image.open(__import__("io").BytesIO(images["jpg"])).convert("RGB")
        samples.append({"__key__": f"k{i}", "image": image, "json": {**fields, "task": "meme"}})
    task = MemeTask(MemeOptions(bert=str(tiny_bert), heads=4), backbone)
    mapped = [task.map_sample(s, backbone, train=True) for s in samples]
    for m in mapped:
        m.pop("task")
    batch = default_collate(mapped)
    losses, report = task.training_forward(backbone.model.train(), batch)
    assert set(losses) == {"qi_loss", "qc_loss"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert task.qi.gate.grad is not None and task.qi.co_attention.image_attn.in_proj_weight.grad is not None
    assert task.logit_scale.grad is not None and "gate" in report  # one scale shared by both losses
    assert not hasattr(task, "qi_logit_scale") and not hasattr(task.qi.co_attention, "text_attn")
    assert mapped[0]["query_id"] == caption_id(samples[0]["json"]["caption"])
    qc_stage = MemeTask(MemeOptions(bert=str(tiny_bert), heads=4, stage="qc"), backbone)
    assert not any(p.requires_grad for p in qc_stage.qi.parameters()) and qc_stage.logit_scale.requires_grad
    assert set(qc_stage.training_forward(backbone.model, batch)[0]) == {"qc_loss"}
    with pytest.raises(ValueError, match="json.caption"):
        task.map_sample({**samples[0], "json": {**samples[0]["json"], "caption": ""}}, backbone, train=False)
    assert task.map_sample({**samples[0], "json": {**samples[0]["json"], "context": ""}}, backbone, train=False)
    metrics = task.evaluate(backbone.model.eval(), [batch])
    assert {"qi_R@1", "qc_R@100", "fused_P@50", "R@1_chance", "R@10_baseline", "alpha"} <= set(metrics)
    assert task.score_meta(0.7) == {"fusion": "shared_scale", "alpha": 0.7,
                                    "logit_scale": pytest.approx(float(task.logit_scale.exp()))}
    old = MemeTask(MemeOptions(bert=str(tiny_bert), heads=4, fusion="separate_scales", co_attention="sequential",
                               emotion_add="normalised"), backbone)
    losses, _ = old.training_forward(backbone.model.train(), batch)
    sum(losses.values()).backward()
    assert old.qi_logit_scale.grad is not None and old.qc_logit_scale.grad is not None
    assert old.qi.co_attention.text_attn.in_proj_weight.grad is not None
    assert set(old.score_meta(0.5)) == {"fusion", "alpha", "qi_logit_scale", "qc_logit_scale"}


def test_parallel_co_attention_reads_the_raw_text_and_sequential_the_updated_one():
    from training.tasks.meme import CoAttentionBlock

    torch.manual_seed(0)
    image, text = torch.randn(2, 1, 8), torch.randn(2, 5, 8)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    block = CoAttentionBlock(8, 2, 0.0, "parallel").eval()
    with torch.no_grad():
        x = block.image_norms[0](image + block.image_attn(image, text, text, key_padding_mask=padding)[0])
        expected = block.image_norms[1](x + block.image_ffn(x))
        assert torch.allclose(block(image, text, padding), expected, atol=1e-6)
        sequential = CoAttentionBlock(8, 2, 0.0, "sequential").eval()
        sequential.load_state_dict(block.state_dict(), strict=False)  # same image stream, plus a text stream
        assert not torch.allclose(sequential(image, text, padding), expected, atol=1e-4)


class _Identity(torch.nn.Module):
    def forward(self, v, context, padding):
        return v


@pytest.mark.parametrize("emotion_add", ["raw", "normalised"])
def test_emotion_vector_is_added_to_the_raw_image_embedding_by_default(emotion_add):
    from training.tasks.meme import MemeOptions, QIHead

    torch.manual_seed(0)
    head = QIHead(8, 6, 4, MemeOptions(bert="unused", heads=2, emotion_add=emotion_add)).eval()
    head.co_attention = _Identity()  # look at v itself
    image, emotion = 10 * torch.nn.functional.normalize(torch.randn(3, 8), dim=-1), torch.randn(3, 4)
    with torch.no_grad():
        e = torch.nn.functional.normalize(head.emotion_proj(emotion), dim=-1)
        got = head(image, emotion, torch.randn(3, 5, 6), torch.zeros(3, 5, dtype=torch.bool))
        if emotion_add == "raw":  # |image| = 10: the emotion's share is 0.1 / 10 = 1 %
            expected = torch.nn.functional.normalize(image + 0.1 * e, dim=-1)
        else:  # on the unit image vector: 0.1, ten times more
            expected = torch.nn.functional.normalize(torch.nn.functional.normalize(image, dim=-1) + 0.1 * e, dim=-1)
        assert torch.allclose(got, expected, atol=1e-6)
