"""Feature-caching gradient accumulation (``optim.accum_mode: features``; open_clip's ``--accum-freq``, GradCache).

Plain accumulation keeps the contrastive batch at micro batch x ranks. Here one optimizer step's
micro batches form one contrastive batch of micro x grad_accum x ranks:

1. every micro batch is embedded without gradients (``Task.training_features``), the RNG state before
   each one saved;
2. the loss is taken once over all cached features (``Task.features_loss``, which gathers across ranks
   as the plain loss does), and autograd gives its gradient with respect to every cached feature and to
   the parameters the loss reads directly (a logit scale, a bias);
3. each micro batch runs again through ``engine(batch)`` with gradients, from its saved RNG state (the
   same dropout as in pass 1), and ``engine.backward`` receives the surrogate
   ``sum(fresh * cached_grad) (+ sum(param * param_grad) on the first micro batch)``, whose gradient is
   the big batch's gradient and whose value is reported as the big batch's loss.

DeepSpeed divides every ``engine.backward`` by ``gradient_accumulation_steps``; the surrogates already add
up to the whole gradient, so :func:`accumulate` hands it ``loss * grad_accum``. (Not ``scale_wrt_gas=False``:
DeepSpeed 0.19.8 then still divides, in the gradient hook ``engine(batch)`` put on the same output tensor, which
runs before ``engine.backward`` has registered the graph as already scaled.) ``engine.step()``
still runs after every micro batch, so the engine's own counter decides the boundary (all-reduce, step).
See docs/design.md, "Feature-caching accumulation".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from training.registry import get_task_class, list_tasks
from training.tasks.base import CACHE_KEY, Task

if TYPE_CHECKING:
    from training.config import Config

Features = dict[str, torch.Tensor]  # per-sample tensors, batch first (floating ones get gradients)


def config_problems(cfg: Config) -> list[str]:
    """Why ``cfg`` cannot run with ``accum_mode: features`` (empty: it can); checked at validation."""
    if cfg.optim.accum_mode != "features":
        return []
    names = [t.name for t in cfg.tasks]
    if len(names) > 1:
        return [f"features needs exactly one task (a step's micro batches form one contrastive batch), got {names}; "
                "use accum_mode: gradients for a mixed-task job"]
    problems = []
    for name in names:
        if name in list_tasks() and not get_task_class(name).supports_feature_cache():
            problems.append(f"features: task {name!r} does not split into training_features + features_loss; "
                            "use accum_mode: gradients")
    return problems


# --------------------------------------------------------------------------- random state


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# --------------------------------------------------------------------------- one step's cache


@dataclass
class CachedStep:
    """The cached features of one optimizer step and, once taken, the loss's gradient with respect to them."""

    features: list[Features]  # one dict per micro batch, no gradients
    rng: list[tuple[torch.Tensor, torch.Tensor | None]]  # RNG state before each micro batch's first pass
    device: torch.device
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # the big batch's losses (detached)
    report: dict[str, Any] = field(default_factory=dict)
    grads: list[Features] | None = None  # d loss / d features, per micro batch
    param_grads: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)

    def recompute(self, task: Task, backbone: nn.Module, batch: dict[str, Any], micro: int):
        """Micro batch ``micro`` again with gradients: ``({loss key: surrogate}, report)`` for the engine."""
        if self.grads is None:  # inside the head's forward: ZeRO-3 has gathered its parameters
            self._take_loss(task)
        _set_rng_state(self.rng[micro], self.device)
        fresh = task.training_features(backbone, batch)
        assert self.grads is not None
        surrogate = sum((fresh[k].float() * g).sum() for k, g in self.grads[micro].items())
        if micro == 0:  # the parameters the loss reads directly get their gradient once per step
            surrogate = surrogate + sum((p * g).sum() for p, g in self.param_grads)
        losses = dict(self.losses)
        first = next(k for k in losses if k.endswith("_loss"))
        # the big batch's value, the surrogate's gradient
        losses[first] = losses[first] + (surrogate - surrogate.detach())
        return losses, self.report

    def _take_loss(self, task: Task) -> None:
        """The loss over every cached feature, and its gradient w.r.t. those features and the head's parameters."""
        joined = {k: torch.cat([f[k] for f in self.features]) for k in self.features[0]}
        leaves = {k: v.detach().float().requires_grad_(True) for k, v in joined.items() if v.is_floating_point()}
        losses, report = task.features_loss({**joined, **leaves})
        total = sum(v for k, v in losses.items() if k.endswith("_loss"))
        params = [p for p in task.parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, [*leaves.values(), *params], allow_unused=True)
        sizes = [len(next(iter(f.values()))) for f in self.features]
        per_key = [torch.split(g if g is not None else torch.zeros_like(v), sizes)  # a feature the loss ignores: 0
                   for v, g in zip(leaves.values(), grads)]
        self.grads = [dict(zip(leaves, parts)) for parts in zip(*per_key)]
        self.param_grads = [(p, g) for p, g in zip(params, grads[len(leaves):]) if g is not None]
        self.losses = {k: v.detach() for k, v in losses.items()}
        self.report = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in report.items()}
        self.features = []  # the cache has served: free it before the recomputes


@torch.no_grad()
def cache_features(module: nn.Module, batches: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Pass 1: embed every micro batch without gradients; returns the batches, each carrying the step's cache.

    ``module`` is the engine's :class:`~training.model.MultiTaskModel` (``backbone`` + ``heads``).
    """
    names = {b["task"] for b in batches}
    if len(names) != 1:  # config validation refuses mixed jobs; this guards direct callers
        raise ValueError(f"accum_mode features: one task per step, got micro batches of {sorted(names)}")
    task = module.heads[names.pop()]
    rng, features = [], []
    for batch in batches:
        rng.append(_rng_state(device))
        features.append(task.training_features(module.backbone, batch))
    step = CachedStep(features, rng, device)
    return [{**batch, CACHE_KEY: (step, micro)} for micro, batch in enumerate(batches)]


def accumulate(engine, draw: Callable[[int], dict[str, Any]], micro_batches: int, mode: str,
               device: torch.device) -> Iterator[tuple[dict[str, Any], torch.Tensor, dict[str, Any]]]:
    """One optimizer step of ``micro_batches`` micro batches (``draw(i)`` gives the i-th): forward,
    ``engine.backward``, ``engine.step`` each; yields ``(batch, loss, report)`` after each backward,
    before its ``engine.step()`` (at the boundary the averaged gradients are still there to read).

    ``mode``: ``gradients`` (DeepSpeed's accumulation: a batch is drawn when it is trained on) or
    ``features`` (all are drawn and embedded first, :func:`cache_features`).
    """
    features = mode == "features"
    cached = cache_features(engine.module, [draw(i) for i in range(micro_batches)], device) if features else None
    for i in range(micro_batches):
        batch = cached[i] if cached is not None else draw(i)
        loss, report = engine(batch)
        engine.backward(loss * micro_batches if features else loss)  # the engine divides by micro_batches
        yield batch, loss, report
        engine.step()
