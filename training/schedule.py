"""When things happen in a run: the learning-rate schedule (linear warm-up, then cosine decay to a floor,
a pure function of step) and wall-clock checkpoints."""
from __future__ import annotations

import math
import time
from typing import Callable


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Factor applied to each parameter group's base learning rate at optimizer step ``step``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CheckpointTimer:
    """Time-based checkpoints (``schedule.checkpoint_every_minutes``): due once that long has passed since
    the run started or last saved. Rank 0's clock decides and ``agree`` hands its answer to every rank:
    DeepSpeed saves on all ranks together, and clocks that disagree by a step would hang the job."""

    def __init__(self, minutes: float, agree: Callable[[bool], bool] = lambda flag: flag,
                 clock: Callable[[], float] = time.monotonic):
        self.seconds, self.agree, self.clock = minutes * 60, agree, clock
        self.last = clock()

    def due(self) -> bool:
        if not self.seconds:
            return False  # off: no collective per step
        return self.agree(self.clock() - self.last >= self.seconds)

    def saved(self) -> None:
        self.last = self.clock()
