"""Bad input is named, not fatal (issue #18): a task field of the wrong type costs its sample (``map_error``,
named in ``skipped/``), held-out skips are written and counted, and configs, held-out sets and checkpoints
that cannot work are refused before any work, naming the key or the file."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import _train, _write_config, tiny_config
from shards.samples import read_skip_logs
from shards.synth import get_synth, sample_rng
from shards.writer import ShardSetWriter
from training.config import ConfigError
from training.tasks.base import require_bool, require_int, require_str
from training.validation import config_from_dict

ABSENT = object()  # the field is left out of the json


# --------------------------------------------------------------------------- the shared field checks


@pytest.mark.parametrize("value,message", [
    (5, "json.label must be a string, got 5 (int)"), (None, "json.label must be a string, got None"),
    (["a"], "json.label must be a string, got ['a'] (list)"), ({"a": 1}, "(dict)"), (True, "(bool)"),
    ("", "json.label must be a non-empty string"), ("  ", "non-empty"), (ABSENT, "json.label is missing")])
def test_require_str_names_the_field_and_what_it_got(value, message):
    meta = {} if value is ABSENT else {"label": value}
    with pytest.raises(ValueError, match=re.escape(message)):
        require_str(meta, "label")


def test_require_helpers_defaults_ranges_and_choices():
    assert require_str({}, "label", "cap") == "cap" and require_str({"label": "x"}, "label") == "x"
    assert require_str({"role": None}, "role", None, nullable=True) is None
    with pytest.raises(ValueError, match=r"json.role must be one of \['a', 'b'\], got 'c'"):
        require_str({"role": "c"}, "role", choices=("a", "b"))
    assert require_int({"hour": 18}, "hour") == 18 and require_int({"hour": 18.0}, "hour") == 18  # pandas' ints
    assert require_int({}, "minute", 30) == 30
    for bad in ("18", 2.5, True, None, [1], float("nan")):
        with pytest.raises(ValueError, match="json.hour must be an integer"):
            require_int({"hour": bad}, "hour")
    with pytest.raises(ValueError, match=r"json.hour must lie in \[0, 23\], got 24"):
        require_int({"hour": 24}, "hour", low=0, high=23)
    assert require_bool({"static": False}, "static") is False and require_bool({}, "static", False) is False
    for bad in ("false", 0, 1, None):
        with pytest.raises(ValueError, match="json.static must be true or false"):
            require_bool({"static": bad}, "static")
    with pytest.raises(ValueError, match="json must be an object"):
        require_str([1], "label")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- shard sets with bad samples


# (field, value) per task: each becomes one sample whose json has that field so (ABSENT: left out). Each got
# through map_sample before and failed later (collation, the loss, the metrics) or was silently misread
# ("18" as 18, "false" as True, 2.5 as 2), unless marked "already refused".
BAD_FIELDS = {
    "retrieval": [("label", 5), ("label", None), ("label", ["red square"]), ("label", {"name": "x"}), ("label", True),
                  ("label", ""), ("caption", ""), ("caption", 7)],  # caption 7: already refused, unnamed
    "time": [("hour", "18"), ("hour", 2.5), ("hour", True), ("minute", 7.5), ("minute", False), ("month", "2"),
             ("month", None), ("hour", 24), ("retrieval_role", 1)],
    "contextual": [("target", 1.5), ("target", True), ("target", "3"), ("static", "false"), ("static", 1),
                   ("static", None), ("description", 5), ("description", ["the red one"])],
    "geo_time": [("gold_location_suggest", 5), ("gold_location_suggest", None), ("gold_time_suggest", ["1990"]),
                 ("gold_time_suggest", " ")],  # 5 and the list were read as the labels "5" and "['1990']"
    "meme": [("caption", 5), ("caption", None), ("context", None), ("emotions", "happy"), ("emotions", [1])],  # already refused
}
TASK_OPTIONS = {"geo_time": {"stage": "quantity", "num_cls_tokens": 1}, "time": {"hidden": [16]}, "contextual": {"heads": 4, "ffn_dim": 32}, "meme": {"heads": 8}}


def write_split(out: Path, task: str, good: int, bad: list[tuple[str, object]], seed: int = 0,
                drop_member: str | None = None, shard_size: int | None = None) -> list[str]:
    """``good`` synthetic samples with the ``bad`` ones among the first batch (so collation would meet them);
    ``drop_member``: one more sample, after them, lacks that image member. Returns the bad samples' keys."""
    spec = get_synth(task)
    task_meta = spec.describe(seed)
    bad_keys, index = [], 0
    with ShardSetWriter(out, shard_size=shard_size or max(8, good // 2)) as writer:
        plan = [("good", None, None)] * 2 + [("bad", f, v) for f, v in bad] + \
            ([("drop", drop_member, None)] if drop_member else []) + [("good", None, None)] * (good - 2)
        for kind, field, value in plan:
            images, fields = spec.make_sample(sample_rng(task, seed, "val", index), "val", 64, task_meta)
            meta = {"task": task, "caption": fields.pop("caption"), "label": fields.pop("label"),
                    "source": f"s{index}", **fields}
            key = f"good-{index:04d}"
            if kind == "bad":
                key = f"bad-{index:04d}-{field}"
                if value is ABSENT:
                    meta.pop(field, None)
                else:
                    meta[field] = value
                bad_keys.append(key)
            elif kind == "drop":
                key = f"bad-{index:04d}-frames"
                images.pop(field)
                bad_keys.append(key)
            writer.write(key, images, meta)
            index += 1
    return bad_keys


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from shards.synth.meme import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert-tiny")


@pytest.mark.parametrize("task", sorted(BAD_FIELDS))
def test_a_field_of_the_wrong_type_is_a_named_map_error_not_a_crash(task, tmp_path, request):
    """The real pipeline (training.data's eval loader, collation) and the task's evaluation on a held-out set
    with one bad sample per field: evaluation finishes, each bad sample is in skipped/ as map_error naming
    ``json.<field>``, none of the good ones is, and the metrics count them (``<task>/skipped_samples``)."""
    from training.evaluation import evaluate_model
    from training.model import build_model

    bad = BAD_FIELDS[task]
    drop = "9.png" if task == "contextual" else None  # a set of 9 frames, not 10: named too
    bad_keys = write_split(tmp_path / "val", task, 12, bad, drop_member=drop)
    options = dict(TASK_OPTIONS.get(task, {}))
    if task == "meme":
        options["bert"] = str(request.getfixturevalue("tiny_bert"))
    raw = tiny_config(tmp_path, tmp_path / "run", tasks=[{"name": task, "options": options}],
                      eval={"batch_size": 8, "max_samples": None})
    raw["data"]["train"] = str(tmp_path / "val")
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    model, backbone = build_model(cfg)
    skip_dir = tmp_path / "skipped"
    metrics = evaluate_model(model, backbone, cfg, skip_dir=skip_dir)
    assert metrics[f"{task}/skipped_samples"] == len(bad_keys)
    records = {r["key"]: r for r in read_skip_logs(skip_dir / task)}
    assert set(records) == set(bad_keys), "exactly the bad samples are skipped"
    for (field, _), key in zip(bad, bad_keys):
        assert records[key]["reason"] == "map_error" and f"json.{field}" in records[key]["error"], records[key]
    if drop:
        assert "has no image member '9." in records[bad_keys[-1]]["error"]
    # a second pass (the next evaluation) replaces the file: each skipped sample is listed once
    evaluate_model(model, backbone, cfg, skip_dir=skip_dir)
    assert len(read_skip_logs(skip_dir / task)) == len(bad_keys)


def test_a_run_with_bad_fields_finishes_and_names_them_train_and_held_out(retrieval_shards, tmp_path):
    """A real tiny run: ``json.label`` a number or null (and a caption a number) in training and held-out
    shards. The run finishes; skipped/ names each sample (training: skipped-rank*.jsonl; held-out:
    skipped/held_out/retrieval/), metrics.json counts both, and launch/evaluate.py does the same beside its JSON."""
    from launch.evaluate import main as evaluate_main

    bad = [("label", 5), ("label", None), ("caption", 7)]
    train_bad = write_split(tmp_path / "train", "retrieval", 40, bad, shard_size=64)  # one shard: read in order
    val_bad = write_split(tmp_path / "val", "retrieval", 20, bad + [("label", ["x"])], seed=1)
    run = tmp_path / "run"
    raw = tiny_config(tmp_path, run, data={"num_workers": 1, "shuffle_buffer": 0},
                      optim={"max_steps": 3, "micro_batch_size": 8}, eval={"batch_size": 100, "max_samples": None})
    config = _write_config(tmp_path, raw)
    proc = _train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_records = read_skip_logs(run / "skipped")
    assert {r["key"] for r in train_records} >= set(train_bad)
    assert all(r["reason"] == "map_error" and "json." in r["error"] for r in train_records)
    held_out = {r["key"]: r for r in read_skip_logs(run / "skipped" / "held_out" / "retrieval")}
    assert set(held_out) == set(val_bad)
    assert "json.label must be a string, got 5 (int)" in held_out[val_bad[0]]["error"]
    assert "json.label must be a string, got None" in held_out[val_bad[1]]["error"]
    result = json.loads((run / "metrics.json").read_text())
    skipped = result["skipped_samples"]
    assert skipped["held_out"] == {"count": 4, "by_reason": {"map_error": 4}, "by_task": {"retrieval": 4}}
    assert skipped["train"]["count"] == len(train_records) >= 3
    assert skipped["count"] == skipped["train"]["count"] + 4 and skipped["by_reason"] == {"map_error": skipped["count"]}
    assert result["before"]["retrieval/skipped_samples"] == result["after"]["retrieval/skipped_samples"] == 4
    # launch/evaluate.py: the same held-out skips, written beside its JSON and counted in it
    out = tmp_path / "scores" / "eval.json"
    assert evaluate_main(["--config", str(config), "--checkpoint", str(run), "--out", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["retrieval/skipped_samples"] == 4
    assert evaluated["retrieval/t2i_R@1"] == pytest.approx(result["after"]["retrieval/t2i_R@1"], abs=1e-6)
    assert {r["key"] for r in read_skip_logs(tmp_path / "scores" / "skipped" / "eval" / "retrieval")} == set(val_bad)


# --------------------------------------------------------------------------- refused before any work


@pytest.mark.parametrize("section,values,key", [
    ("data", {"train": []}, "data.train"), ("eval", {"max_samples": -1}, "eval.max_samples"),
    ("eval", {"max_samples": 0}, "eval.max_samples"), ("optim", {"betas": [-0.1, 0.98]}, "optim.betas.0"),
    ("optim", {"betas": [0.9, 1.0]}, "optim.betas.1"), ("optim", {"betas": [0.9]}, "optim.betas"),
    ("optim", {"eps": 0}, "optim.eps"), ("optim", {"eps": 1.0}, "optim.eps"), ("optim", {"eps": -1e-8}, "optim.eps")])
def test_values_out_of_range_are_refused_naming_the_key(tmp_path, section, values, key):
    raw = tiny_config(tmp_path, tmp_path / "run", **{section: values})
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(raw)


def _ds_file(tmp_path: Path, content) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return tiny_config(tmp_path, tmp_path / "run", deepspeed={"config_file": str(path)})


@pytest.mark.parametrize("content,named", [
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage = 3 differs from deepspeed.zero_stage = 0"),
    ({"zero_optimization": 3}, "zero_optimization must be a JSON object"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage = True differs"),
    ({"bf16": {"enabled": True}}, "['bf16'] would change the engine's precision"),
    ({"bfloat16": {"enabled": True}}, "['bfloat16'] would change"),  # DeepSpeed's older spelling
    ({"fp16": {"enabled": True}}, "['fp16']"), ({"data_types": {"grad_accum_dtype": "bf16"}}, "['data_types']"),
    ({"communication_data_type": "fp16"}, "['communication_data_type']")])
def test_ds_config_file_cannot_turn_on_zero3_or_change_precision(tmp_path, content, named):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_ds_file(tmp_path, content))
    assert "deepspeed.config_file" in str(err.value) and "ds.json" in str(err.value)
    assert named in str(err.value), str(err.value)


def test_a_held_out_set_smaller_than_the_candidate_batch_is_refused_before_work(tmp_path, capsys):
    """Retrieval's candidate-batch metrics need options.candidate_batch_size held-out samples: fewer (in the
    shards, or after eval.max_samples) used to fail at the first evaluation; now launch/train.py and
    launch/evaluate.py refuse it at start, naming the option and the shards."""
    from launch.evaluate import main as evaluate_main
    from launch.train import main as train_main
    from training.data import check_shards

    write_split(tmp_path / "val", "retrieval", 8, [])
    raw = tiny_config(tmp_path, tmp_path / "run", data={"train": str(tmp_path / "val")})
    with pytest.raises(ConfigError, match=r"data.val \(retrieval\): .*val holds 8 held-out sample\(s\), fewer than "
                                          r"the evaluation needs: tasks.0.options.candidate_batch_size = 10"):
        check_shards(config_from_dict(raw))
    raw["eval"] = {"batch_size": 4, "max_samples": 6}  # 8 in the shards, 8 read (6 rounded up to whole batches)
    raw["tasks"] = [{"name": "retrieval", "options": {"candidate_batch_size": 8}}]
    check_shards(config_from_dict(raw))
    raw["eval"] = {"batch_size": 3, "max_samples": 6}  # 6 read
    with pytest.raises(ConfigError, match=r"holds 6 held-out sample\(s\) \(eval.max_samples = 6 of 8\)"):
        check_shards(config_from_dict(raw))
    raw["eval"], raw["tasks"] = {"batch_size": 100, "max_samples": None}, [{"name": "retrieval"}]
    config = _write_config(tmp_path, raw)
    assert train_main(["--config", str(config)]) == 2
    assert "tasks.0.options.candidate_batch_size = 10" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing may be written"
    assert evaluate_main(["--config", str(config), "--zero-shot", "--out", str(tmp_path / "zs.json")]) == 2
    assert "candidate_batch_size" in capsys.readouterr().err and not (tmp_path / "zs.json").exists()
    assert evaluate_main(["--config", str(config), "--zero-shot", "--shards", str(tmp_path / "none"),
                          "--out", str(tmp_path / "zs.json")]) == 2
    assert "none" in capsys.readouterr().err


def test_fewer_candidates_after_skips_leave_the_candidate_metrics_out_not_the_run():
    """What the start-up check cannot see (samples skipped, labels outside ``classnames``) leaves the
    candidate-batch metrics out with a warning; the other retrieval metrics are still reported."""
    from training.tasks.retrieval import RetrievalOptions, score_retrieval

    g = torch.Generator().manual_seed(0)
    emb = {"image": torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1),
           "text": torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1),
           "caption": [f"c{i}" for i in range(6)], "label": ["a", "b"] * 3}
    classes = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    out = score_retrieval(emb, classes, ["a", "b"], RetrievalOptions())
    assert "t2i_R@1" in out and "zeroshot_top1" in out and not any(k.startswith("candidate_") for k in out)
    assert "candidate_f1" in score_retrieval(emb, classes, ["a", "b"], RetrievalOptions(candidate_batch_size=6))


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> Path:
    """A finished run's final/ folder of another model (tiny-vit-wide), as training writes it."""
    from training.checkpoint import write_final
    from training.model import build_model

    base = tmp_path_factory.mktemp("wide")
    raw = tiny_config(base, base / "run", model={"name": "tiny-vit-wide"})
    cfg = config_from_dict(raw)
    write_final(build_model(cfg)[0].state_dict(), base / "run" / "final", cfg.to_dict())
    return base / "run"


def test_evaluating_another_models_checkpoint_is_a_clear_error(retrieval_shards, wide_checkpoint, tmp_path, capsys):
    from launch.evaluate import main as evaluate_main

    config = _write_config(tmp_path, tiny_config(retrieval_shards, tmp_path / "run"))
    out = tmp_path / "eval.json"
    assert evaluate_main(["--config", str(config), "--checkpoint", str(wide_checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds weights of model 'tiny-vit-wide'" in err and "model.name is 'tiny-vit'" in err
    assert "Traceback" not in err and not out.exists()
    # the weights file alone (no config.json beside it): every tensor is checked, the mismatch named
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((wide_checkpoint / "final" / "model.safetensors").read_bytes())
    assert evaluate_main(["--config", str(config), "--checkpoint", str(bare), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not fit this config's model" in err and "shape mismatch" in err and "Traceback" not in err
    assert evaluate_main(["--config", str(config), "--checkpoint", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "no weights at" in capsys.readouterr().err


def test_load_weights_reshapes_only_promoted_scalars(tmp_path):
    """[1] -> [] (DeepSpeed's promoted logit scale) loads; a tensor of the same element count in another
    shape never does: [1, 1] -> [], [k] -> [a, b], [a, b] -> [b, a]."""
    from training.evaluation import load_weights
    from training.model import build_model

    cfg = config_from_dict(tiny_config(tmp_path, tmp_path / "run"))
    model = build_model(cfg)[0]
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    scalar = "heads.retrieval.logit_scale"
    assert state[scalar].shape == torch.Size([])
    matrix = next(k for k, v in state.items() if v.ndim == 2 and v.shape[0] != v.shape[1])

    def load(**changed):
        path = tmp_path / "w.safetensors"
        save_file({**state, **changed}, str(path))
        load_weights(model, path)

    load(**{scalar: state[scalar].reshape(1)})
    for name, tensor in ((scalar, state[scalar].reshape(1, 1)), (matrix, state[matrix].reshape(-1)),
                         (matrix, state[matrix].reshape(state[matrix].shape[1], state[matrix].shape[0]))):
        with pytest.raises(ConfigError, match=re.escape(f"{name}: file {list(tensor.shape)} vs model")):
            load(**{name: tensor})
