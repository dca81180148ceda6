"""Optimiser, learning-rate schedules and the multi-task "stop-and-go" controller of the reference."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")
SCHEDULERS = ("warmup_linear", "warmup_constant", "cosine", "mannul")


def parameter_groups(model: torch.nn.Module, base_lr: float, vil_lr: float, weight_decay: float = 0.01) -> list[dict]:
    """The reference's grouping: `vil_` heads (vil_prediction*, vil_logit, vil_binary_prediction,
    vil_tri_prediction; not vision_logit) at `vil_lr`, everything else at the base rate; no weight decay on
    biases and LayerNorm. Parameters are grouped by (lr, decay) rather than one group each."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied decoder/embedding counted once
            continue
        seen.add(id(param))
        lr = vil_lr if "vil_" in name else base_lr
        decay = 0.0 if any(marker in name for marker in NO_DECAY) else weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def build_optimizer(model: torch.nn.Module, base_lr: float, vil_lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(parameter_groups(model, base_lr, vil_lr, weight_decay), lr=base_lr, eps=1e-6,
                             fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int,
                    steps_per_epoch: int) -> LambdaLR:
    """warmup_linear: linear warm-up then linear decay to 0 (pytorch_transformers WarmupLinearSchedule);
    warmup_constant; cosine (after warm-up); mannul: x0.2 at epochs 5 and 7 (stepped per iteration here)."""
    total_steps = max(1, total_steps)

    def warmup(step: int) -> float | None:
        return step / max(1, warmup_steps) if step < warmup_steps else None

    if name == "warmup_linear":
        def factor(step: int) -> float:
            w = warmup(step)
            return w if w is not None else max(0.0, (total_steps - step) / max(1.0, total_steps - warmup_steps))
    elif name == "warmup_constant":
        def factor(step: int) -> float:
            w = warmup(step)
            return w if w is not None else 1.0
    elif name == "cosine":
        def factor(step: int) -> float:
            w = warmup(step)
            if w is not None:
                return w
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    elif name == "mannul":
        def factor(step: int) -> float:
            epoch = step // max(1, steps_per_epoch)
            return 0.2 ** sum(epoch >= e for e in (5, 7))
    else:
        raise ValueError(f"unknown lr scheduler {name!r} (supported: {', '.join(SCHEDULERS)})")
    return LambdaLR(optimizer, factor)


class StopOnPlateau:
    """Per-task switch of the reference's MultiTaskStopOnPlateau (mode max): after more than `patience`
    non-improving validations the task is "stopped" (trained only every train_iter_gap-th iteration); a stopped
    task whose score falls below best x (1 - continue_threshold) is switched back on."""

    def __init__(self, patience: int = 1, threshold: float = 1e-3, cooldown: int = 1, continue_threshold: float = 5e-3):
        self.patience, self.threshold, self.cooldown = patience, threshold, cooldown
        self.continue_threshold = continue_threshold
        self.reset()

    def reset(self) -> None:
        self.best = -math.inf
        self.num_bad = 0
        self.cooldown_counter = 0
        self.in_stop = False

    def step(self, score: float) -> None:
        # "rel" threshold in mode max, as torch's ReduceLROnPlateau, from which the reference's class derives.
        improved = score > self.best * (1 + self.threshold) if self.best > 0 else score > self.best
        if improved:
            self.best = score
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            self.in_stop = True
            self.cooldown_counter = self.cooldown
            self.num_bad = 0
        if self.in_stop and score < self.best * (1 - self.continue_threshold):
            self.in_stop = False

    def state_dict(self) -> dict:
        return {"best": self.best, "num_bad": self.num_bad, "cooldown_counter": self.cooldown_counter,
                "in_stop": self.in_stop}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.num_bad = float(state["best"]), int(state["num_bad"])
        self.cooldown_counter, self.in_stop = int(state["cooldown_counter"]), bool(state["in_stop"])
