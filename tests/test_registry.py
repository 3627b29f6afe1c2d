"""What a task declares in its own file, and shared modules that know no task by name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config
from training.config import Config, ConfigError
from training.validation import config_from_dict
from training.registry import get_task_class, list_tasks

TASK_NAMES = list_tasks()
PACKAGES = ("training", "serving", "shards", "launch")


def _own_files() -> set[str]:
    """Files a task owns, found through the registries: its head, predictor, generator and converters."""
    import inspect

    from serving.predictors import get_predictor, list_predictors
    from shards.convert import get_converter, list_converters
    from shards.synth import get_synth, list_synth

    modules = [get_task_class(t) for t in TASK_NAMES] + [get_predictor(t) for t in list_predictors()]
    modules += [get_synth(t).make_sample for t in list_synth()] + [get_converter(c).convert for c in list_converters()]
    return {str(Path(inspect.getfile(m)).resolve().relative_to(ROOT)) for m in modules}


def _shared_modules() -> list[str]:
    own = _own_files()
    files = sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    return [f for f in files if f not in own and not f.startswith(RETRIEVAL_TOOLS)]


RETRIEVAL_TOOLS = ("training/retrieval/", "launch/cam.py", "launch/compare_retrievers.py")  # retrieval's own analysis tools


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


def test_shared_modules_name_no_task():
    """Outside a task's own files (found through the registries), no module names a task: they dispatch."""
    offenders = {}
    for path in _shared_modules():
        text = (ROOT / path).read_text()
        named = sorted({m for m in re.findall(r"[\"']([a-z_]+)[\"']", text) if m in TASK_NAMES})
        if named:
            offenders[path] = named
    assert not offenders, f"shared modules name tasks (dispatch through the registries instead): {offenders}"


def test_every_task_has_its_own_files_in_every_registry():
    from serving.predictors import list_predictors
    from shards.synth import list_synth

    for registry, names in (("predictor (serving/predictors)", list_predictors()), ("generator (shards/synth)", list_synth())):
        missing = sorted(set(TASK_NAMES) - set(names))
        assert not missing, f"task(s) {missing} have no {registry}"


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
    with_baseline = task_tables({**result, "after": {**result["after"], "toy/b_baseline": 0.41,
                                                     "toy/b_baseline_rule": "majority label"}})[0]
    row = next(line for line in with_baseline.splitlines() if line.startswith("toy/b "))
    assert "0.410 (majority label)" in row and "baseline" in with_baseline.splitlines()[1]


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
    """serving/ (its subpackages and every task's predictor included) is the torch-free side."""
    import subprocess
    import sys

    script = ("import importlib, pkgutil, sys, serving\n"
              "for m in pkgutil.walk_packages(serving.__path__, 'serving.'): importlib.import_module(m.name)\n"
              "from serving.predictors import list_predictors; assert len(list_predictors()) >= 5\n"
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


# the registry comes before the tasks: they register with its decorator, it imports them on first lookup
IMPORT_ORDER = ["training.config", "training.backbone", "training.registry", "training.tasks.base", "training.model",
                "training.validation", "training.trainer"]


def test_training_imports_form_a_dag_in_the_documented_order():
    """Importing a module of the chain loads none that come after it (no cycle hidden in a function).

    One fresh interpreter imports the chain in order and checks after each import: a module whose import
    pulled in a later one is caught at its own step, as it would be in an interpreter of its own."""
    import subprocess
    import sys

    script = (f"import importlib, sys\nchain = {IMPORT_ORDER!r}\n"
              "for i, m in enumerate(chain[:-1]):\n"
              "    importlib.import_module(m)\n"
              "    print(m, sorted(set(chain[i + 1:]) & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.splitlines() == [f"{m} []" for m in IMPORT_ORDER[:-1]], proc.stdout


def test_shards_import_nothing_from_training():
    import subprocess
    import sys

    script = ("import importlib, pkgutil, sys, shards\n"
              "for m in pkgutil.walk_packages(shards.__path__, 'shards.'):\n"
              "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'training'))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-1500:]
