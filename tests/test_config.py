"""Configs are validated completely, with every problem named, before any work starts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from training.config import ConfigError

from training.validation import config_from_dict, load_config
from training.registry import get_task_class, list_tasks

from conftest import ROOT, tiny_config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    """A stage-2 config starts from a stage-1 run's weights: those must be another shipped config's output."""
    stage1 = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_weights")
    cfg = load_config(path, ["model.init_weights=null"] if stage1 else [])
    assert cfg.tasks
    if stage1:
        outputs = {yaml.safe_load(p.read_text())["run"]["output_dir"] for p in (ROOT / "configs").glob("*.yaml")}
        assert any(stage1.startswith(f"{out}/") for out in outputs), stage1


def test_unknown_keys_and_bad_values_are_all_reported(tmp_path):
    raw = tiny_config(tmp_path, tmp_path / "run")
    raw["optim"]["micro_batchsize"] = 8  # typo
    raw["optim"]["max_steps"] = "many"
    raw["deepspeed"] = {"zero_stage": 5}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="x.yaml")
    msg = str(err.value)
    assert "x.yaml" in msg
    assert "optim.micro_batchsize" in msg
    assert "optim.max_steps" in msg
    assert "deepspeed.zero_stage" in msg


def test_task_options_and_names_are_checked(tmp_path):
    raw = tiny_config(tmp_path, tmp_path / "run", tasks=[{"name": "retrieval", "options": {"templatez": []}},
                                                         {"name": "nope"}])
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert "tasks.0.options.templatez" in str(err.value)
    assert "unknown task 'nope'" in str(err.value)


def test_model_name_and_checkpoint_path_are_checked(tmp_path):
    raw = tiny_config(tmp_path, tmp_path / "run", model={"name": "no-such-model"})
    with pytest.raises(ConfigError, match="no-such-model"):
        config_from_dict(raw)
    raw = tiny_config(tmp_path, tmp_path / "run", model={"pretrained": str(tmp_path / "missing.safetensors")})
    with pytest.raises(ConfigError, match="missing.safetensors"):
        config_from_dict(raw)
    raw = tiny_config(tmp_path, tmp_path / "run", model={"name": "ViT-B-32", "pretrained": "not-a-tag"})
    with pytest.raises(ConfigError, match="not-a-tag"):
        config_from_dict(raw)


def test_overrides_and_yaml_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, tmp_path / "run")))
    cfg = load_config(path, ["optim.max_steps=7", "deepspeed.zero_stage=2"])
    assert cfg.optim.max_steps == 7 and cfg.deepspeed.zero_stage == 2
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["optim.max_steps"])
    path.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_registry_lists_and_rejects():
    assert "retrieval" in list_tasks()
    with pytest.raises(KeyError, match="known tasks"):
        get_task_class("nope")
    from training.registry import register_task

    with pytest.raises(ValueError, match="already registered"):
        register_task("retrieval")(type("Dup", (), {}))


def test_overrides_reach_list_items(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, tmp_path / "run")))
    cfg = load_config(path, ["tasks.0.loss_weight=2.5", "tasks.0.options.candidate_batch_size=5"])
    assert cfg.tasks[0].loss_weight == 2.5 and cfg.tasks[0].options.candidate_batch_size == 5
    from training.tasks.retrieval import RetrievalOptions

    assert isinstance(cfg.tasks[0].options, RetrievalOptions)  # typed once validated, everywhere after
    with pytest.raises(ConfigError, match="not an index"):
        load_config(path, ["tasks.3.loss_weight=1"])


def test_ds_config_file_is_merged_and_batch_keys_are_derived(tmp_path):
    import json

    from training.trainer import deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True}))
    raw = tiny_config(tmp_path, tmp_path / "run", deepspeed={"config_file": str(ds), "zero_stage": 2},
                      optim={"micro_batch_size": 8, "grad_accum": 4})
    merged = deepspeed_config(config_from_dict(raw))
    # sections merge key by key: the typed stage stays beside the file's own ZeRO settings
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True} and merged["wall_clock_breakdown"]
    assert merged["train_micro_batch_size_per_gpu"] == 8 and merged["gradient_accumulation_steps"] == 4
    assert "train_batch_size" not in merged  # DeepSpeed derives it from micro batch x accumulation x world
    ds.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="derived"):
        deepspeed_config(config_from_dict(raw))
    raw["deepspeed"]["config_file"] = str(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="absent.json"):
        config_from_dict(raw)


@pytest.mark.parametrize("override,key", [
    ("data.train=[]", "data.train"), ("eval.max_samples=-1", "eval.max_samples"), ("eval.max_samples=0", "eval.max_samples"),
    ("optim.betas=[0.9,1.5]", "optim.betas"), ("optim.eps=0", "optim.eps"), ("tasks.0.train=['']", "tasks.0.train")])
def test_values_that_would_fail_after_start_up_are_refused_naming_the_key(tmp_path, override, key):
    raw = tiny_config(tmp_path, tmp_path / "run")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(path, [override])
