"""A training run: build it from its config tree, check it, resume it, and take its steps
with the loop's parts as hooks.

    from jaxmp.run import train, every
    result = train(cfg)                                   # jaxmp.config.RunConfig
    result = train(cfg, hooks=[every(100, lambda info: print(info.metrics()["loss"]))])

Modules: build (the run from its config), checks (before any compute), resume (the
resume policy), hooks (the loop's parts), loop (the steps), loggers (TensorBoard, W&B),
console (progress lines, writable paths).
"""

from jaxmp.run.build import Run, layout, make_trainer, model_config, prepare
from jaxmp.run.hooks import Hook, NonFiniteLoss, StepInfo, every
from jaxmp.run.loop import PeerLost, RunResult, execute, train

__all__ = ["Hook", "NonFiniteLoss", "PeerLost", "Run", "RunResult", "StepInfo", "every",
           "execute", "layout", "make_trainer", "model_config", "prepare", "train"]
