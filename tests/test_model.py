"""The backbone is built only through open_clip, and saved weights load back the same way."""
from __future__ import annotations

import open_clip
import torch
from safetensors.torch import save_file

from training.config import ModelConfig
from training.model import MultiTaskModel, create_backbone, param_groups, register_model_configs

from conftest import ROOT


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(name="tiny-vit", model_config_dir=str(ROOT / "configs" / "models"), **kw)


def test_tiny_configs_register_with_open_clip():
    register_model_configs(ROOT / "configs" / "models")
    for path in (ROOT / "configs" / "models").glob("*.json"):
        assert path.stem in open_clip.list_models()


def test_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    first = create_backbone(_tiny())
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in first.model.state_dict().items()}, str(path))
    again = create_backbone(_tiny(pretrained=str(path)))  # the same code path as a real checkpoint
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    # and through open_clip's own API, as a user of final/open_clip.safetensors would
    direct = open_clip.create_model("tiny-vit", pretrained=str(path))
    assert torch.equal(direct.visual.conv1.weight, first.model.visual.conv1.weight)


def test_param_groups_separate_lrs_and_no_decay():
    backbone = create_backbone(_tiny())
    head = torch.nn.Linear(4, 4)
    model = MultiTaskModel(backbone.model, {"h": head}, {"h": 1.0})
    groups = {g["name"]: g for g in param_groups(model, 1e-5, 1e-3, 0.1, freeze_backbone=False)}
    assert groups["backbone/decay"]["lr"] == 1e-5 and groups["heads/decay"]["lr"] == 1e-3
    assert all(p.ndim < 2 for p in groups["backbone/no_decay"]["params"])
    assert groups["heads/no_decay"]["weight_decay"] == 0.0
    frozen = {g["name"] for g in param_groups(model, 1e-5, 1e-3, 0.1, freeze_backbone=True)}
    assert frozen == {"heads/decay", "heads/no_decay"}
