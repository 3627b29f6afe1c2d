"""The backbone is built only through open_clip, and saved weights load back the same way."""
from __future__ import annotations

import open_clip
import torch
from safetensors.torch import save_file

from training.config import ModelConfig
from training.backbone import create_backbone, register_model_configs
from training.model import MultiTaskModel
from training.elastic import place_adam_steps
from training.params import adamw_kernel, build_optimizer, param_groups

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


def _tiny_model_and_groups():
    torch.manual_seed(0)
    backbone = create_backbone(_tiny())
    model = MultiTaskModel(backbone.model, {"h": torch.nn.Linear(4, 4)}, {"h": 1.0})
    return model, param_groups(model, 1e-3, 1e-2, 0.1, freeze_backbone=False)


def test_fused_adamw_gives_the_loop_s_update():
    """optim.fused reaches torch's fused kernel, with the same betas, eps and groups as the default loop:
    three steps on identical gradients end within float rounding of each other, and far from the start."""
    finals = {}
    for fused in (False, True):
        model, groups = _tiny_model_and_groups()
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = build_optimizer(groups, (0.9, 0.98), 1e-6, fused=fused)
        assert adamw_kernel(optimizer).startswith("fused" if fused else "default")
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        finals[fused] = [p.detach().clone() for p in model.parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(finals[False], start))
    gap = max((a - b).abs().max().item() for a, b in zip(finals[False], finals[True]))
    assert moved > 1e-2 and gap < 1e-6, (moved, gap)


def test_universal_adam_steps_are_placed_as_adamw_expects():
    """A step tensor as a universal load leaves it (float64 here) becomes float32: on the parameter's
    device for the fused kernel, on the CPU for the loop; values are kept."""
    for fused in (False, True):
        model, groups = _tiny_model_and_groups()
        optimizer = build_optimizer(groups, (0.9, 0.98), 1e-6, fused=fused)
        param = optimizer.param_groups[0]["params"][0]
        optimizer.state[param]["step"] = torch.tensor(8, dtype=torch.float64)
        place_adam_steps(optimizer)
        step = optimizer.state[param]["step"]
        assert step.dtype == torch.float32 and step.item() == 8.0 and step.device == param.device


def test_init_weights_take_the_backbone_of_another_tasks_run(tmp_path):
    """A head can start on another task's trained backbone; heads it does not have are ignored.

    Full loads (evaluation, export) stay strict: there a foreign head means the wrong run.
    """
    import pytest

    from training.config import ConfigError
    from training.evaluation import load_weights

    torch.manual_seed(0)
    source = MultiTaskModel(create_backbone(_tiny()).model, {"a": torch.nn.Linear(4, 4)}, {"a": 1.0})
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = MultiTaskModel(create_backbone(_tiny()).model, {"b": torch.nn.Linear(4, 2)}, {"b": 1.0})
    load_weights(target, path, allow_missing_heads=True)
    assert torch.equal(target.backbone.visual.conv1.weight, source.backbone.visual.conv1.weight)
    with pytest.raises(ConfigError, match="unexpected"):
        load_weights(target, path)
    # a head both models have must still fit exactly: a clear error naming the tensor, not a traceback
    clash = MultiTaskModel(create_backbone(_tiny()).model, {"a": torch.nn.Linear(4, 2)}, {"a": 1.0})
    with pytest.raises(ConfigError, match=r"shape mismatch.*heads\.a\.(bias|weight): file \[4"):
        load_weights(clash, path, allow_missing_heads=True)


def test_weights_must_match_shapes_exactly_not_just_element_counts(tmp_path):
    """A [2, 6] tensor never loads into a [4, 3] parameter; only scalars may change shape ([] <-> [1])."""
    import pytest

    from training.config import ConfigError
    from training.evaluation import load_weights

    register_model_configs(ROOT / "configs" / "models")
    backbone = create_backbone(ModelConfig(name="tiny-vit", model_config_dir=str(ROOT / "configs" / "models")))
    model = MultiTaskModel(backbone.model, {}, {})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in state.items() if v.ndim == 2 and v.shape[0] != v.shape[1])
    state["backbone.logit_scale"] = state["backbone.logit_scale"].reshape(1)  # promoted scalar: fine
    save_file(state, str(tmp_path / "ok.safetensors"))
    load_weights(model, tmp_path / "ok.safetensors")
    state[name] = state[name].reshape(state[name].shape[1], state[name].shape[0])  # same count, other shape
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match=f"shape mismatch.*{name}"):
        load_weights(model, tmp_path / "bad.safetensors")
