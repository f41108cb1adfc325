"""The optimizer of a run: AdamW with warm-up + cosine decay and global-norm clipping
(`OptConfig`, the `optimizer` section of the config tree) and which parameters it decays."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx


def _field(default: Any, help: str, flag: bool = True) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """AdamW with warm-up + cosine decay and global-norm clipping (the `optimizer` section of
    the run's config tree: each field is also a command-line flag)."""
    learning_rate: float = _field(1e-3, "Peak learning rate.")
    warmup_steps: int = _field(20, "Linear warm-up steps before cosine decay.")
    total_steps: int = _field(100, "Length of the schedule (a run sets it to --steps).",
                              flag=False)
    weight_decay: float = _field(0.1, "AdamW weight decay of the matrices (not biases, norms).")
    clip_norm: float = _field(1.0, "Clip gradients to this global norm.")
    b1: float = _field(0.9, "Adam beta1.")
    b2: float = _field(0.95, "Adam beta2.")
    eps: float = _field(1e-8, "Adam epsilon.")
    min_lr_ratio: float = _field(0.1, "Learning rate at the end of the schedule, as a fraction "
                                 "of the peak.")
    grad_accum_steps: int = _field(1, "Gradient accumulation steps per update.")

    def schedule(self) -> optax.Schedule:
        warm = max(0, min(self.warmup_steps, self.total_steps - 1))
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, warm, max(self.total_steps, warm + 1),
            self.learning_rate * self.min_lr_ratio)

    def validate(self) -> None:
        """Every setting in range (a nan or a zero here would train nonsense, not fail)."""
        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
        checks = [
            ("learning_rate", finite(self.learning_rate) and self.learning_rate > 0, "a number > 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("total_steps", self.total_steps >= 1, ">= 1"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            ("clip_norm", finite(self.clip_norm) and self.clip_norm > 0, "a number > 0"),
            ("b1", finite(self.b1) and 0 <= self.b1 < 1, "in [0, 1)"),
            ("b2", finite(self.b2) and 0 <= self.b2 < 1, "in [0, 1)"),
            ("eps", finite(self.eps) and self.eps > 0, "a number > 0"),
            ("min_lr_ratio", finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)} must be {want}")

    def optimizer(self, decay_mask: Any = None) -> optax.GradientTransformation:
        """AdamW with warmup + cosine decay and global-norm clipping. `decay_mask` (a tree
        of bools like the params) says what is decayed; default: arrays of >= 2 dims."""
        self.validate()
        if decay_mask is None:
            decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps,
                        weight_decay=self.weight_decay, mask=decay_mask))


def decay_mask(params: nnx.State) -> dict:
    """Which parameters AdamW decays: matrices, i.e. >= 2 dimensions besides the stacking
    `layers` axis (a stacked bias or norm scale is (layers, d)), unless the parameter's
    metadata says weight_decay=False (jaxmp's biases and norm parameters, see layers.param;
    user models may set it too)."""
    def rule(v: nnx.Variable) -> bool:
        meta = v.get_metadata()
        names = meta.get("logical_axes") or (None,) * np.ndim(v[...])
        return bool(meta.get("weight_decay", True)) and sum(n != "layers" for n in names) >= 2
    flat = jax.tree_util.tree_map(rule, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(flat) if isinstance(flat, nnx.State) else flat
