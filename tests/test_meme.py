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
from training.tasks.meme import FrozenEmotionEncoder, branch_scores, encode_text_with_tokens, score_meme


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


def test_fused_score_is_the_alpha_mix_and_can_beat_both_branches():
    # QI knows the feeling (item 0 over 1), QC the object (item 0 over 2); only the mix ranks item 0 first
    emb = {"query": torch.tensor([[1.0, 0.0]]),
           "qi": torch.tensor([[0.9, 0.436], [0.0, 1.0], [1.0, 0.0]]),
           "context": torch.tensor([[0.9, 0.436], [1.0, 0.0], [0.0, 1.0]])}
    scores = branch_scores(emb, qi_scale=2.0, qc_scale=2.0, alpha=0.5)
    assert torch.allclose(scores["qi"], 2.0 * emb["query"] @ emb["qi"].T)
    assert torch.allclose(scores["fused"], 0.5 * scores["qi"] + 0.5 * scores["qc"])
    top = {name: int(s.argmax()) for name, s in scores.items()}
    assert top == {"qi": 2, "qc": 1, "fused": 0}
    alpha_one = branch_scores(emb, 2.0, 2.0, alpha=1.0)
    assert torch.equal(alpha_one["fused"], alpha_one["qi"])


# --------------------------------------------------------------------------- converter


def _image(path: Path) -> None:
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)


@pytest.fixture()
def meme_files(tmp_path) -> dict[str, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("m1.jpg", "m2.png", "m3.jpg"):
        _image(images / name)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    emotions = tmp_path / "emotions.json"
    emotions.write_text(json.dumps([
        {"video_id": "m1", "emotion": [{"person_1": "Happy"}, {"person_2": "sad"}]},
        {"video_id": "m2", "emotion": ["angry"]},
        {"emotion": [{"person_1": "ignored: no id"}]},
    ]))
    train = tmp_path / "train.json"
    train.write_text(json.dumps({
        "sentences": [
            {"video_id": "m1", "caption": "when the code works"},
            {"video_id": "m1", "caption": "monday again"},          # a second query for the same meme
            {"video_id": "m2", "caption": "so mad"},               # found as m2.png
            {"video_id": "m3", "caption": "no emotions entry"},    # kept with emotions []
            {"video_id": "gone", "caption": "image missing"},      # missing_image
            {"video_id": "broken", "caption": "image corrupt"},    # corrupt_image
            {"video_id": "m1", "caption": "  "},                   # missing_query
            {"video_id": "notitle", "caption": "no context"},      # missing_context
            {"caption": "no id"},                                  # bad_row
            "not an object",                                       # bad_row
        ],
        "titles": {"m1": ["a cat at a laptop", "second title unused"], "m2": ["an angry man"], "m3": ["a dog"],
                   "gone": ["x"], "broken": ["y"], "notitle": []},
    }))
    test = tmp_path / "test.json"
    test.write_text(json.dumps({
        "m1": {"gt": "when the code works", "titles": ["a cat at a laptop"]},
        "m2": {"gt": "", "titles": ["an angry man"]},              # missing_query
        "m3": {"gt": "dog day", "titles": [""]},                   # missing_context
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


def test_converter_reads_the_training_layout_and_counts_skips(meme_files, tmp_path):
    summary = _convert(meme_files, "train", tmp_path / "out")
    assert summary == {"read": 10, "written": 4, "skipped": {"bad_row": 2, "corrupt_image": 1, "missing_context": 1,
                                                             "missing_image": 1, "missing_query": 1}}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    samples = _samples(tmp_path / "out")
    by_query = {s["caption"]: s for s in samples}
    assert set(by_query) == {"when the code works", "monday again", "so mad", "no emotions entry"}
    first = by_query["when the code works"]
    assert first["task"] == "meme" and first["label"] == first["caption"]
    assert first["context"] == "a cat at a laptop" and first["emotions"] == ["happy", "sad"]
    assert first["video_id"] == "m1" and first["source"] == "m1.jpg"
    assert by_query["so mad"]["emotions"] == ["angry"] and by_query["so mad"]["source"] == "m2.png"
    assert by_query["no emotions entry"]["emotions"] == []


def test_converter_reads_the_test_layout(meme_files, tmp_path):
    summary = _convert(meme_files, "test", tmp_path / "out")
    assert summary == {"read": 4, "written": 1, "skipped": {"missing_context": 1, "missing_image": 1,
                                                            "missing_query": 1}}
    (sample,) = _samples(tmp_path / "out")
    assert sample["caption"] == "when the code works" and sample["context"] == "a cat at a laptop"
    assert sample["emotions"] == ["happy", "sad"]


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
    assert task.qc_logit_scale.grad is not None and "gate" in report
    qc_stage = MemeTask(MemeOptions(bert=str(tiny_bert), heads=4, stage="qc"), backbone)
    assert not any(p.requires_grad for p in qc_stage.qi.parameters())
    assert set(qc_stage.training_forward(backbone.model, batch)[0]) == {"qc_loss"}
    with pytest.raises(ValueError, match="json.context"):
        task.map_sample({**samples[0], "json": {**samples[0]["json"], "context": ""}}, backbone, train=False)
    metrics = task.evaluate(backbone.model.eval(), [batch])
    assert {"qi_R@1", "qc_R@100", "fused_P@50", "R@1_chance"} <= set(metrics)
