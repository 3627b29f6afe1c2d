"""What a task declares in its own file, and shared modules that know no task by name."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, tiny_config
from training.config import Config, ConfigError, config_from_dict
from training.registry import get_task_class, list_tasks

TASK_NAMES = list_tasks()
# shared modules that dispatch through the registries only (the rest of issue #16 extends this list)
TASK_FREE_MODULES = ["training/config.py", "training/trainer.py", "training/model.py", "training/data.py",
                     "training/evaluation.py", "training/checkpoint.py", "training/accelerator.py",
                     "training/distributed.py", "training/wise_ft.py", "launch/report.py", "launch/train.py",
                     "launch/evaluate.py", "shards/reader.py", "shards/members.py", "shards/writer.py",
                     "serving/runtime.py"]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_declares_options_headline_metrics_and_zero3_support(name):
    cls = get_task_class(name)
    assert cls.name == name
    assert isinstance(cls.Options.model_validate({}), cls.Options)  # every option has a default
    assert cls.headline_metrics and len(set(cls.headline_metrics)) == len(cls.headline_metrics)
    assert cls.zero3_unsupported is None or isinstance(cls.zero3_unsupported, str)
    assert cls.exports_onnx(), f"{name} has no Task.export_onnx"


def test_zero3_is_refused_by_the_tasks_own_flag(retrieval_shards, tmp_path):
    blocked = [n for n in TASK_NAMES if get_task_class(n).zero3_unsupported]
    assert set(blocked) == {"geo_time", "meme"}
    raw = tiny_config(retrieval_shards, tmp_path, deepspeed={"zero_stage": 3},
                      tasks=[{"name": "meme", "options": {"bert": str(tmp_path)}}])
    with pytest.raises(ConfigError, match="meme reads the text tower's positional embedding"):
        config_from_dict(raw)
    config_from_dict(tiny_config(retrieval_shards, tmp_path, deepspeed={"zero_stage": 3}))  # retrieval may


@pytest.mark.parametrize("path", TASK_FREE_MODULES)
def test_shared_module_names_no_task(path):
    text = (ROOT / path).read_text()
    named = sorted({m for m in re.findall(r"[\"']([a-z_]+)[\"']", text) if m in TASK_NAMES})
    assert not named, f"{path} names task(s) {named}: dispatch through the registry instead"


def test_report_shows_the_headline_metrics_the_run_wrote():
    import sys

    sys.path.insert(0, str(ROOT / "launch"))
    from report import task_tables

    result = {"before": {"toy/a": 0.1}, "after": {"toy/a": 0.5, "toy/b": 0.7, "toy/a_chance": 0.25},
              "headline": {"toy": ["b"]}}
    table = task_tables(result)[0]
    assert "toy/b" in table and "toy/a" not in table
    everything = task_tables({**result, "headline": {}})[0]  # a run from before the list: every metric
    assert "toy/a" in everything and "0.250" in everything and "toy/b" in everything


def _fields(model: type, prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            yield from _fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_docs_config_documents_every_field():
    from training.config import TaskConfig

    text = (ROOT / "docs" / "config.md").read_text()
    keys = [k for k in _fields(Config) if k != "tasks"] + [f"tasks[].{k}" for k in TaskConfig.model_fields]
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"docs/config.md lacks {missing}"


def test_test_modules_share_helpers_through_conftest_only():
    offenders = [f"{p.name}: {line.strip()}" for p in sorted((ROOT / "tests").glob("test_*.py"))
                 for line in p.read_text().splitlines() if re.match(r"\s*(from|import) test_\w+", line)]
    assert not offenders, offenders


def test_every_serving_module_imports_without_torch():
    """serving/ is the torch-free side (export lives in training/export). The knowledge-search kernel
    (serving/search.py) still calls torch at run time, inside its functions: issue #16."""
    import subprocess
    import sys

    script = ("import importlib, pkgutil, sys, serving\n"
              "for m in pkgutil.iter_modules(serving.__path__): importlib.import_module('serving.' + m.name)\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'open_clip', 'training', 'webdataset'}))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_the_base_install_is_the_torch_free_serving_side():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {Requirement(r).name.lower() for r in project["dependencies"]}
    training_side = {"torch", "deepspeed", "open_clip_torch", "transformers", "webdataset", "ray", "timm"}
    assert not base & training_side, base & training_side
    assert training_side <= {Requirement(r).name.lower() for r in project["optional-dependencies"]["train"]}
