"""Where a run's metrics go besides the progress lines and the metrics file: TensorBoard
event files (`--tensorboard_dir`, written with tensorboardX) and Weights & Biases
(`--wandb_project`, the optional `wandb` extra). Each logger takes every logged step's
row (the metrics file's fields: loss, grad_norm, learning_rate, step_time_s,
tokens_per_s, mfu, eval_loss when evaluated) and writes it under `train/<name>`
(`eval/loss` for the validation loss). Only process 0 logs."""

from __future__ import annotations

import os
from typing import Any

from jaxmp.config import RunConfig

WANDB_MODES = ("online", "offline", "disabled")


def _tag(name: str) -> str:
    return "eval/loss" if name == "eval_loss" else f"train/{name}"


class TensorBoard:
    def __init__(self, directory: str):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard_dir needs tensorboardX: pip install tensorboardX "
                             "(or the 'tensorboard' extra)") from None
        self.writer = SummaryWriter(logdir=directory)

    def log_scalars(self, step: int, row: dict) -> None:
        for name, value in row.items():
            if name != "step" and value is not None:
                self.writer.add_scalar(_tag(name), float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, project: str, mode: str, config: dict, directory: str | None):
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb_project needs wandb: pip install -e '.[wandb]'") from None
        self.run = wandb.init(project=project, mode=mode, config=config, dir=directory,
                              reinit=True)

    def log_scalars(self, step: int, row: dict) -> None:
        self.run.log({_tag(k): v for k, v in row.items() if k != "step" and v is not None},
                     step=step)

    def close(self) -> None:
        self.run.finish()


def check(cfg: RunConfig) -> None:
    """The logging flags, before anything runs (a missing package, a bad mode)."""
    log = cfg.log
    if log.wandb_mode not in WANDB_MODES:
        raise ValueError(f"wandb_mode={log.wandb_mode!r} must be one of {', '.join(WANDB_MODES)}")
    if log.tensorboard_dir:
        from jaxmp.run.console import check_writable

        check_writable(log.tensorboard_dir, "tensorboard_dir", directory=True)
        try:
            os.makedirs(log.tensorboard_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"tensorboard_dir={log.tensorboard_dir}: cannot create it "
                             f"({e.strerror})") from None
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard_dir needs tensorboardX: pip install tensorboardX") \
                from None
    if log.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--wandb_project needs wandb: pip install -e '.[wandb]'") from None


def from_config(cfg: RunConfig) -> list[Any]:
    """The loggers the log flags ask for."""
    from jaxmp import rundir

    out: list[Any] = []
    if cfg.log.tensorboard_dir:
        out.append(TensorBoard(cfg.log.tensorboard_dir))
    if cfg.log.wandb_project:
        out.append(WandB(cfg.log.wandb_project, cfg.log.wandb_mode, rundir.config_json(cfg),
                         cfg.checkpoint.ckpt_dir))
    return out
