"""Sharded Orbax checkpoints that restore onto any mesh.

Layout of one checkpoint directory (one per step, written by orbax's CheckpointManager):

    <ckpt_dir>/<step>/params/   the parameters (each process writes only its own shards)
    <ckpt_dir>/<step>/train/    optimizer state, step counter, RNG key
    <ckpt_dir>/<step>/meta/     JSON sidecar: model config, mesh, rules, layer order, data
                                position, parameter shapes, versions

Orbax writes into a temporary directory and renames it only when every item is complete,
so a save killed half-way is never listed; restore takes the newest complete step.
Restoring reads straight into the target shardings (each device reads its own slice).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxmp.sharding import path_str
from jaxmp.train import TrainState


class CheckpointError(ValueError):
    """A checkpoint directory or checkpoint that cannot be used."""


def param_shapes(params: Any) -> dict[str, list[int]]:
    return {path_str(p): list(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def check_shapes(saved: dict[str, list[int]], params: Any, where: str) -> None:
    """Error naming the first parameter whose shape differs from the checkpoint's."""
    wanted = param_shapes(params)
    for path in sorted(set(saved) | set(wanted)):
        a, b = saved.get(path), wanted.get(path)
        if a != b:
            raise CheckpointError(
                f"{where} holds a different model: parameter '{path}' has shape "
                f"{tuple(a) if a else 'none'} in the checkpoint but {tuple(b) if b else 'none'} in "
                "the requested model; use the model flags it was trained with")


def permute_layers(tree: Any, stacked: str, saved_order: Sequence[int],
                   target_order: Sequence[int], shardings: Any) -> Any:
    """Reorder the stacked-layer axis from the saved storage order to the target's."""
    if list(saved_order) == list(target_order):
        return tree
    where = {layer: q for q, layer in enumerate(saved_order)}
    idx = jnp.asarray([where[layer] for layer in target_order])
    n = len(idx)

    def fix(path: tuple, x: Any) -> Any:
        hit = any(getattr(k, "key", None) == stacked for k in path)
        return x[idx] if hit and np.ndim(x) and x.shape[0] == n else x
    return jax.jit(lambda t: jax.tree_util.tree_map_with_path(fix, t),
                   out_shardings=shardings)(tree)


class Checkpoints:
    """Save / restore TrainStates under one directory (orbax CheckpointManager)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        if keep is not None and keep < 1:
            raise CheckpointError(f"--keep_checkpoints={keep} must be >= 1")
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist; "
                                  "pass the --ckpt_dir a training run wrote")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=create,
            cleanup_tmp_directories=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "train", "meta"))

    # ------------------------------------------------------------ queries
    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def resolve(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}; train with "
                                  f"--ckpt_dir={self.directory} first")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}; "
                                  f"complete steps: {steps}")
        return step

    def meta(self, step: int | None = None) -> dict:
        step = self.resolve(step)
        out = self._restore(step, meta=ocp.args.JsonRestore())
        return dict(out["meta"])

    # ------------------------------------------------------------ save
    def save(self, state: TrainState, meta: dict, *, wait: bool = False) -> int:
        """Start saving `state` at its step (asynchronously unless wait=True)."""
        step = int(jax.device_get(state.step))
        meta = {**meta, "step": step, "param_shapes": param_shapes(state.params)}
        train = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self.wait()
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------ restore
    def _restore(self, step: int, **items: Any) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except Exception as e:  # unreadable / truncated files
            earlier = [s for s in self.steps() if s < step]
            hint = (f"try the previous one with --step={earlier[-1]}" if earlier
                    else "no earlier checkpoint exists")
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                  f"{hint}") from e

    def restore(self, abstract: TrainState, *, step: int | None = None,
                layer_order: Sequence[int] | None = None, stacked: str = "blocks") -> TrainState:
        """The full TrainState, read into `abstract`'s shardings (any mesh)."""
        step = self.resolve(step)
        meta = self.meta(step)
        check_shapes(meta["param_shapes"], abstract.params, f"checkpoint step {step}")
        train_abs = {"opt_state": abstract.opt_state, "step": abstract.step, "rng": abstract.rng}
        out = self._restore(step, params=ocp.args.StandardRestore(abstract.params),
                            train=ocp.args.StandardRestore(train_abs))
        state = TrainState(out["train"]["step"], out["params"], out["train"]["opt_state"],
                           out["train"]["rng"])
        if layer_order is not None and meta.get("layer_order"):
            shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
            state = permute_layers(state, stacked, meta["layer_order"], layer_order, shardings)
        return state

    def restore_params(self, abstract_params: Any, *, step: int | None = None,
                       layer_order: Sequence[int] | None = None, stacked: str = "blocks") -> Any:
        """Parameters only (the optimizer state is not read)."""
        step = self.resolve(step)
        meta = self.meta(step)
        check_shapes(meta["param_shapes"], abstract_params, f"checkpoint step {step}")
        params = self._restore(step, params=ocp.args.StandardRestore(abstract_params))["params"]
        if layer_order is not None and meta.get("layer_order"):
            shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract_params)
            params = permute_layers(params, stacked, meta["layer_order"], layer_order, shardings)
        return params


def export_params(src: str, dst: str, *, step: int | None = None,
                  dtype: str | None = None) -> int:
    """Write a params-only checkpoint (optionally cast, e.g. to bfloat16) for deployment.

    The copy keeps the sidecar, so `Server` loads it like a training checkpoint."""
    source = Checkpoints(src, create=False)
    step = source.resolve(step)
    meta = source.meta(step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target: dict = {}
    for path, shape in meta["param_shapes"].items():  # rebuild the tree from the sidecar
        *parents, leaf = path.split("/")
        node = target
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(shape), jnp.float32, sharding=device)
    params = source.restore_params(target, step=step)
    if dtype:
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    out = ocp.CheckpointManager(os.path.abspath(dst), options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False), item_names=("params", "meta"))
    out.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({**meta, "params_only": True, "param_dtype": dtype or "float32"})),
        force=True)
    out.wait_until_finished()
    out.close()
    source.close()
    return step
