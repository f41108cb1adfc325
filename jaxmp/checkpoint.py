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

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxmp.mesh import format_mesh
from jaxmp.pipeline import PipelineSpec
from jaxmp.sharding import Rules, path_str
from jaxmp.stack import LayerStack, reorder
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


TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's name for a save in progress


def remove_leftovers(directory: str) -> list[str]:
    """Delete what killed saves left behind (never a complete step: orbax renames a step
    into place only when every item is written). Returns the names removed."""
    if not os.path.isdir(directory):
        return []
    gone = sorted(e for e in os.listdir(directory) if TMP_MARK in e)
    for entry in gone:
        shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    return gone


def _versions() -> dict[str, str]:
    import flax
    import orbax.checkpoint

    import jaxmp

    return {"jaxmp": jaxmp.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "orbax": orbax.checkpoint.__version__}


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint needs to rebuild its model with no training flags: the `meta` item.
    Its JSON keeps the names of the first format ("model" for the family, "stacked" for the
    stack), so checkpoints written before this class existed read the same."""
    family: str
    config: dict                  # the family's config, as JSON
    mesh: str                     # the training mesh
    rules: dict
    pipeline: dict                # stages, microbatches, repeats
    layer_order: list[int]        # storage order of the stacked layers
    stack: str                    # the parameter subtree that is the LayerStack
    data: dict = dataclasses.field(default_factory=dict)  # source, seed, batch_size
    versions: dict = dataclasses.field(default_factory=_versions)
    step: int | None = None
    param_shapes: dict | None = None
    params_only: bool = False
    param_dtype: str = "float32"
    tokenizer: dict | None = None   # the JSON of the tokenizer.json the data was made with
    hf_config: dict | None = None   # config.json of the Hugging Face model it started from
    run_config: dict | None = None  # the training run's whole config (jaxmp.config.RunConfig)
    chat: dict | None = None        # the chat template and special tokens (jaxmp.chat)

    @classmethod
    def create(cls, family: str, stack: str, config: Any, mesh: Any, rules: Rules,
               pipeline: PipelineSpec, data: dict | None = None, **extra: Any
               ) -> CheckpointRecord:
        order = LayerStack(config.num_layers, pipeline).order
        return cls(family, config.to_json(), format_mesh(mesh), rules.to_json(),
                   dataclasses.asdict(pipeline), order, stack, dict(data or {}), **extra)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"], d["stacked"] = d.pop("family"), d.pop("stack")
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_json(cls, d: dict) -> CheckpointRecord:
        d = dict(d)
        from jaxmp.models.registry import DEFAULT

        d["family"], d["stack"] = d.pop("model", DEFAULT), d.pop("stacked", "blocks")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def reorder_stack(tree: Any, stack: str, saved_order: Sequence[int],
                  target_order: Sequence[int], shardings: Any) -> Any:
    """Every leaf under a `stack` key (parameters, Adam moments) from the saved storage
    order to the target's, laid out with `shardings`."""
    if list(saved_order) == list(target_order):
        return tree
    n = len(target_order)

    def fix(path: tuple, x: Any) -> Any:
        hit = any(getattr(k, "key", None) == stack for k in path)
        return reorder(x, saved_order, target_order) if hit and np.ndim(x) and x.shape[0] == n else x
    return jax.jit(lambda t: jax.tree_util.tree_map_with_path(fix, t),
                   out_shardings=shardings)(tree)


class Checkpoints:
    """Save / restore TrainStates under one directory (orbax CheckpointManager)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        if keep is not None and keep < 1:
            raise CheckpointError(f"keep_checkpoints={keep} must be >= 1")
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist; "
                                  "pass the ckpt_dir a training run wrote")
        if create and jax.process_index() == 0:
            remove_leftovers(self.directory)
        # Leftovers are removed above, synchronously: orbax's own clean-up runs in a thread
        # that can outlive a short program and print a traceback at interpreter exit.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=create,
            cleanup_tmp_directories=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "train", "meta"))

    # ------------------------------------------------------------ queries
    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def delete(self, steps: Sequence[int]) -> None:
        """Delete these steps (only ever on the user's explicit request: --overwrite)."""
        for step in steps:
            self.manager.delete(step)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def resolve(self, step: int | None) -> int:
        if step is not None and (not isinstance(step, (int, np.integer)) or isinstance(step, bool)):
            raise CheckpointError(f"step={step!r} must be an integer (a saved step) or None "
                                  "(the newest)")
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}; train with "
                                  f"ckpt_dir={self.directory} first")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}; "
                                  f"complete steps: {steps}")
        return step

    def record(self, step: int | None = None) -> CheckpointRecord:
        """The record (model, layout, layer order, ...) saved with a step."""
        step = self.resolve(step)
        return CheckpointRecord.from_json(self._restore(step, meta=ocp.args.JsonRestore())["meta"])

    # ------------------------------------------------------------ save
    def save(self, state: TrainState, record: CheckpointRecord, *, wait: bool = False) -> int:
        """Start saving `state` at its step (asynchronously unless wait=True)."""
        step = int(jax.device_get(state.step))
        meta = dataclasses.replace(record, step=step,
                                   param_shapes=param_shapes(state.params)).to_json()
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
            hint = (f"try the previous one with step={earlier[-1]}" if earlier
                    else "no earlier checkpoint exists")
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                  f"{hint}") from e

    def restore(self, abstract: TrainState, *, step: int | None = None,
                layer_order: Sequence[int] | None = None) -> TrainState:
        """The full TrainState, read into `abstract`'s shardings (any mesh); with
        `layer_order` the stacked layers (and their Adam moments) come back in that order."""
        step = self.resolve(step)
        record = self.record(step)
        check_shapes(record.param_shapes, abstract.params, f"checkpoint step {step}")
        train_abs = {"opt_state": abstract.opt_state, "step": abstract.step, "rng": abstract.rng}
        out = self._restore(step, params=ocp.args.StandardRestore(abstract.params),
                            train=ocp.args.StandardRestore(train_abs))
        state = TrainState(out["train"]["step"], out["params"], out["train"]["opt_state"],
                           out["train"]["rng"])
        return self._reordered(state, abstract, record, layer_order)

    def restore_params(self, abstract_params: Any, *, step: int | None = None,
                       layer_order: Sequence[int] | None = None) -> Any:
        """Parameters only (the optimizer state is not read)."""
        step = self.resolve(step)
        record = self.record(step)
        check_shapes(record.param_shapes, abstract_params, f"checkpoint step {step}")
        params = self._restore(step, params=ocp.args.StandardRestore(abstract_params))["params"]
        return self._reordered(params, abstract_params, record, layer_order)

    @staticmethod
    def _reordered(tree: Any, abstract: Any, record: CheckpointRecord,
                   layer_order: Sequence[int] | None) -> Any:
        if layer_order is None or not record.layer_order:
            return tree
        shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
        return reorder_stack(tree, record.stack, record.layer_order, layer_order, shardings)


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def export_params(src: str, dst: str, *, step: int | None = None,
                  dtype: str | None = None) -> int:
    """Write a params-only checkpoint (optionally cast, e.g. to bfloat16) for deployment.

    The copy keeps the sidecar, so `Server` loads it like a training checkpoint. Only
    floating-point dtypes: a cast to an integer type rounds every weight to zero."""
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} cannot hold the parameters; use one of "
                         f"{', '.join(EXPORT_DTYPES)} (integer casts would round every weight "
                         "to zero)")
    source = Checkpoints(src, create=False)
    step = source.resolve(step)
    record = source.record(step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target: dict = {}
    for path, shape in record.param_shapes.items():  # rebuild the tree from the record
        *parents, leaf = path.split("/")
        node = target
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(shape), jnp.float32, sharding=device)
    params = source.restore_params(target, step=step)
    source.close()
    if dtype:
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    save_params(dst, step, params, record)
    return step


def save_params(dst: str, step: int, params: Any, record: CheckpointRecord) -> None:
    """A params-only checkpoint (no optimizer state) that Server and --init_from read like
    a training checkpoint."""
    dtype = str(jax.tree_util.tree_leaves(params)[0].dtype)
    meta = dataclasses.replace(record, step=step, params_only=True, param_dtype=dtype,
                               param_shapes=param_shapes(params))
    out = ocp.CheckpointManager(os.path.abspath(dst), options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False), item_names=("params", "meta"))
    out.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                           meta=ocp.args.JsonSave(meta.to_json())), force=True)
    out.wait_until_finished()
    out.close()
