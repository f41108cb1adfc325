"""TrainState, the optimizer, and the one jitted train step.

`Trainer` takes any Flax NNX model whose parameters carry logical names and a
`loss_fn(model, batch) -> loss`, and compiles `train_step(state, batch) -> (state, metrics)`
once, with explicit in/out shardings for the whole state and the batch, the state donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmp.mesh import batch_shards
from jaxmp.optim import OptConfig, decay_mask  # noqa: F401  (OptConfig: re-exported)
from jaxmp.pipeline import differentiated
from jaxmp.sharding import (
    DEFAULT_RULES,
    Plan,
    Rules,
    activation_sharding,
    bytes_per_device,
    logical_axes,
    mapped_axes,
    named,
    param_specs,
    per_replica,
    plan,
    spec_for,
    spread_spec,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array       # () int32: optimizer steps taken
    params: Any           # pure dict of float32 arrays
    opt_state: Any
    rng: jax.Array        # raw key data, split per step; seeds the model's random streams


def _mirror_shardings(tree: Any, params: Any, param_shardings: Any,
                      default: NamedSharding) -> Any:
    """Shardings for optimizer state: a leaf whose key path ends with a parameter's path
    (and has its shape) is laid out like that parameter; anything else is replicated."""
    by_path = {}
    for (path, p), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree_util.tree_leaves(param_shardings)):
        by_path[tuple(map(str, path))] = (p.shape, sh)

    def pick(path: tuple, leaf: Any) -> NamedSharding:
        keys = tuple(map(str, path))
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit and hit[0] == leaf.shape:
                return hit[1]
        return default
    return jax.tree_util.tree_map_with_path(pick, tree)


def settle(mesh: Mesh, tree: Any) -> Any:
    """On simulated CPU meshes, wait for a collective program to finish before the next
    one is dispatched. XLA's CPU runtime (seen with jaxlib 0.10.2) can deadlock in its
    collective rendezvous when several executions of programs with collectives are in
    flight at once (devices interleave the runs). Accelerators keep asynchronous dispatch."""
    if mesh.size > 1 and mesh.devices.flat[0].platform == "cpu":
        jax.block_until_ready(tree)
    return tree


LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], Any]


def _check_pipeline(model: nnx.Module, mesh: Mesh) -> None:
    """A mesh with a `pipe` axis needs the model's layer stacks built for that many stages
    (otherwise the layers would only be split over `pipe`, run one after another on every
    device: no pipeline, silently)."""
    from jaxmp.pipeline import PipelineError
    from jaxmp.stack import LayerStack

    pipe = mesh.shape.get("pipe", 1)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LayerStack) and node.pipeline.stages != pipe and (
                pipe > 1 or node.pipeline.enabled):
            raise PipelineError(
                f"the mesh has pipe={pipe} but the model's layer stack was built for "
                f"{node.pipeline.stages} pipeline stage(s); build the model with "
                f"PipelineSpec(stages={pipe}, microbatches=...) (or use a mesh without pipe)")


class Trainer:
    """Compiles the train step of `model` (an NNX module, or a function building one)
    on `mesh` under `rules`. Batches are dicts of arrays whose leading axis is the batch."""

    def __init__(self, model: nnx.Module | Callable[[], nnx.Module], loss_fn: LossFn,
                 mesh: Mesh, *, rules: Rules = DEFAULT_RULES,
                 optimizer: OptConfig | None = None, seed: int = 0, shard_state: bool = True):
        optimizer = optimizer or OptConfig()
        self.mesh, self.rules, self.loss_fn, self.opt = mesh, rules, loss_fn, optimizer
        self.shard_state = shard_state
        self._factory = model if not isinstance(model, nnx.Module) else None
        abstract = nnx.eval_shape(model) if self._factory else model
        _check_pipeline(abstract, mesh)
        self.graphdef, abs_params, self.rest = nnx.split(abstract, nnx.Param, ...)
        if self._factory and jax.tree_util.tree_leaves(self.rest):
            # Variables other than nnx.Param (RNG streams, statistics) ride along unchanged;
            # build their values (not the parameters') once, on the default device.
            self.rest = jax.jit(lambda: nnx.split(self._factory(), nnx.Param, ...)[2])()
        self.abstract_params = nnx.to_pure_dict(abs_params)
        self.axes = logical_axes(abs_params)
        self.param_specs = param_specs(self.abstract_params, self.axes, mesh, rules)
        # param_shardings: the layout the model computes with. At rest (in the state), with
        # shard_state, parameters and optimizer moments are also split over `data` and
        # `fsdp` (ZeRO-1 with sharded master weights): the step gathers the compute copy
        # once and reduce-scatters the gradients once.
        self.param_shardings = named(mesh, self.param_specs)
        rest = (jax.tree_util.tree_map(lambda sp, a: spread_spec(sp, a.shape, mesh),
                                       self.param_specs, self.abstract_params,
                                       is_leaf=lambda x: isinstance(x, PartitionSpec))
                if shard_state else self.param_specs)
        rest_shardings = named(mesh, rest)
        self.tx = optimizer.optimizer(decay_mask(abs_params))
        self.seed = seed
        self._model = None if self._factory else model
        replicated = NamedSharding(mesh, PartitionSpec())
        abs_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        opt_sh = _mirror_shardings(abs_opt, self.abstract_params, rest_shardings, replicated)
        self.state_shardings = TrainState(replicated, rest_shardings, opt_sh, replicated)
        self._steps: dict[Any, Any] = {}
        self.replicated = replicated
        self._has_random_streams = any(isinstance(v, nnx.RngStream)
                                       for _, v in nnx.iter_graph(abstract))
        # the zero-bubble schedule runs the data replicas inside its own shard_map
        # (jaxmp.zerobubble), so accumulation does not vmap over them around it
        from jaxmp.stack import LayerStack
        self._zero_bubble = any(isinstance(v, LayerStack) and v.pipeline.enabled
                                and v.pipeline.schedule == "zb"
                                for _, v in nnx.iter_graph(abstract))

    # ------------------------------------------------------------ state
    def plan(self) -> Plan:
        return plan(self.abstract_params, self.axes, self.mesh, self.rules)

    def state_bytes_per_device(self) -> int:
        """Bytes one device holds of the train state between steps (parameters, optimizer
        state, step and key), in the layout the state is kept in."""
        return bytes_per_device(jax.eval_shape(self._init_state_fn()), self.state_shardings)

    def abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs with their shardings (for restoring)."""
        shapes = jax.eval_shape(self._init_state_fn())
        return jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            shapes, self.state_shardings)

    def _init_state_fn(self) -> Callable[[], TrainState]:
        factory, model = self._factory, self._model

        def init() -> TrainState:
            m = factory() if factory else model
            params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
            rng = jax.random.key_data(jax.random.key(self.seed))
            return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), rng)
        return init

    def init_state(self) -> TrainState:
        """Parameters initialised directly in their shards (never whole on one device)."""
        with activation_sharding(self.mesh, self.rules):
            state = jax.jit(self._init_state_fn(), out_shardings=self.state_shardings)()
        return settle(self.mesh, state)

    def state_from_params(self, params: Any) -> TrainState:
        """A fresh state (step 0, new optimizer moments) around given parameters (laid out
        like `param_shardings`): fine-tuning from pretrained weights."""
        def init(p: Any) -> TrainState:
            rng = jax.random.key_data(jax.random.key(self.seed))
            return TrainState(jnp.zeros((), jnp.int32), p, self.tx.init(p), rng)
        jitted = jax.jit(init, in_shardings=(self.param_shardings,),
                         out_shardings=self.state_shardings)
        return settle(self.mesh, jitted(params))

    # ------------------------------------------------------------ batches
    def batch_sharding(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        return {k: NamedSharding(self.mesh, self.batch_spec(v)) for k, v in batch.items()}

    def batch_spec(self, x: Any) -> PartitionSpec:
        shards, label = batch_shards(self.mesh)
        b = x.shape[0]
        per_accum = b // self.opt.grad_accum_steps
        if b % self.opt.grad_accum_steps or per_accum % shards:
            raise ValueError(
                f"global batch {b} must split into grad_accum_steps={self.opt.grad_accum_steps} "
                f"parts each divisible by {label}={shards}; use a batch size divisible by "
                f"{self.opt.grad_accum_steps * shards}")
        names = ("batch",) + (None,) * (len(x.shape) - 1)
        return spec_for(names, x.shape, self.mesh, self.rules.activations, strict=True)

    # ------------------------------------------------------------ the step
    def _loss(self, params: Any, batch: Mapping[str, jax.Array],
              key: jax.Array) -> tuple[jax.Array, Any]:
        # a fresh copy of the non-parameter variables, made in this trace: the random
        # streams are re-seeded (mutated) below
        model = nnx.merge(self.graphdef, params, jax.tree_util.tree_map(jnp.asarray, self.rest))
        _reseed(model, key)
        with differentiated():
            out = self.loss_fn(model, batch)
        loss, aux = out if isinstance(out, tuple) else (out, {})
        return loss.astype(jnp.float32), aux

    def _grads(self, params: Any, batch: Mapping[str, jax.Array],
               rng: jax.Array) -> tuple[jax.Array, Any, Any]:
        """Mean loss, the loss function's metrics (a dict of scalars, averaged the same
        way) and gradients over the batch, in grad_accum_steps parts if asked (the one
        gradient path of the step and of `grads`); `rng` (raw key data) seeds the model's
        random streams (dropout), part i with fold_in(key, i).
        Call under activation_sharding."""
        accum = self.opt.grad_accum_steps
        key = jax.random.wrap_key_data(rng)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if accum == 1:
            (loss, aux), grads = grad_fn(params, batch, key)
            return loss, aux, grads

        def accumulate(p: Any, rows: Mapping[str, jax.Array]) -> tuple[jax.Array, Any, Any]:
            def body(carry, xs):
                i, part = xs
                (part_loss, aux), g = grad_fn(p, part, jax.random.fold_in(key, i))
                return jax.tree_util.tree_map(jnp.add, carry, (part_loss, aux, g)), None

            parts = _accumulation_parts(rows, accum)
            first = jax.tree_util.tree_map(lambda x: x[0], parts)
            aux_shape = jax.eval_shape(grad_fn, p, first, key)[0][1]
            zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                          (jnp.zeros((), jnp.float32), aux_shape, p))
            (loss, aux, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum), parts))
            return jax.tree_util.tree_map(lambda x: x / accum, (loss, aux, grads))

        d = self.mesh.shape["data"]
        b = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if d == 1 or self._has_random_streams or self._zero_bubble or b % (d * accum):
            return accumulate(params, batch)
        # Each data replica accumulates its own rows' gradients (a leading replica axis split
        # over `data`) and the replicas are summed once, after the last part: one gradient
        # reduction per step instead of one per part. (Not with random streams: a vmapped
        # dropout would draw the same mask for every replica, unlike one device.)
        names = {k: ("batch",) + (None,) * (np.ndim(x) - 1) for k, x in batch.items()}
        reps, rows = per_replica(params, self.axes, dict(batch), names, d, "data")
        with mapped_axes("data"):
            out = jax.vmap(accumulate, spmd_axis_name="data")(reps, rows)
        return jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), out)

    def _compute_params(self, params: Any) -> Any:
        """The compute copy of parameters stored at rest (one all-gather per step over the
        axes the state adds; a no-op without shard_state)."""
        return jax.lax.with_sharding_constraint(params, self.param_shardings)

    def _step(self, state: TrainState, batch: Mapping[str, jax.Array]):
        with activation_sharding(self.mesh, self.rules):
            loss, aux, grads = self._grads(self._compute_params(state.params), batch,
                                           state.rng)
            # reduce-scatter: each device keeps the gradient rows its state holds
            grads = jax.lax.with_sharding_constraint(grads, self.state_shardings.params)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step is not applied: the state stays finite (and checkpointable)
        # and the host stops with an error naming the step.
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b),
                                                       new, old)
        new_state = TrainState(state.step + 1, keep(params, state.params),
                               keep(opt_state, state.opt_state),
                               jax.random.key_data(jax.random.split(
                                   jax.random.wrap_key_data(state.rng))[0]))
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": self.opt.schedule()(state.step), "finite": finite,
                   **{k: v for k, v in aux.items() if k not in ("loss", "grad_norm")}}
        return new_state, metrics

    def _eval(self, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Mean loss of a batch with the model in evaluation mode (no dropout), in the
        step's accumulation parts (the same activation memory as training). `params` are
        laid out as the state holds them."""
        params = self._compute_params(params)

        def loss(part: Mapping[str, jax.Array]) -> jax.Array:
            model = nnx.merge(self.graphdef, params,
                              jax.tree_util.tree_map(jnp.asarray, self.rest))
            model.eval()
            out = self.loss_fn(model, part)  # the language-model loss where it is reported
            value = out[1].get("lm_loss", out[0]) if isinstance(out, tuple) else out
            return value.astype(jnp.float32)
        with activation_sharding(self.mesh, self.rules):
            accum = self.opt.grad_accum_steps
            if accum == 1:
                return loss(batch)
            return jnp.mean(jax.lax.map(loss, _accumulation_parts(batch, accum)))

    def compiled_eval(self, batch: Mapping[str, Any]):
        """The jitted evaluation (state params, batch) -> mean loss, for batches like `batch`."""
        key = ("eval",) + tuple(sorted((k, tuple(v.shape), str(v.dtype))
                                       for k, v in batch.items()))
        if key not in self._steps:
            jitted = jax.jit(self._eval, in_shardings=(self.state_shardings.params,
                                                       self.batch_sharding(batch)),
                             out_shardings=self.replicated)
            self._steps[key] = _Settled(jitted, self.mesh)
        return self._steps[key]

    def compiled_step(self, batch: Mapping[str, Any]):
        """The jitted step for batches shaped like `batch` (compiled once per shape)."""
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        if key not in self._steps:
            jitted = jax.jit(
                self._step,
                in_shardings=(self.state_shardings, self.batch_sharding(batch)),
                out_shardings=(self.state_shardings, self.replicated),
                donate_argnums=0)
            self._steps[key] = _Settled(jitted, self.mesh)
        return self._steps[key]

    def grads(self, params: Any, batch: Mapping[str, Any],
              rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """(loss, gradients) of one batch as the step computes them (accumulation
        included), sharded like the parameters (no update). `params` in either layout (the
        state's or the compute one). `rng`: raw key data for the model's random streams
        (default: the first step's)."""
        rng = jax.random.key_data(jax.random.key(self.seed)) if rng is None else rng

        def fn(p, b, r):
            with activation_sharding(self.mesh, self.rules):
                loss, _, grads = self._grads(self._compute_params(p), b, r)
                return loss, grads
        jitted = jax.jit(fn, in_shardings=(None, self.batch_sharding(batch),
                                           self.replicated),
                         out_shardings=(self.replicated, self.param_shardings))
        return settle(self.mesh, jitted(params, batch, rng))

    def step(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
        return self.compiled_step(batch)(state, batch)

    def lower(self, batch: Mapping[str, Any]):
        """The lowered step for abstract batch shapes (for memory / HLO analysis)."""
        abs_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        return self.compiled_step(batch).lower(self.abstract_state(), abs_batch)

    def model(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)

    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Place a host batch (the same on every process) with the batch sharding."""
        sh = self.batch_sharding(batch)
        return {k: jax.make_array_from_callback(v.shape, sh[k], lambda idx, v=v: v[idx])
                for k, v in batch.items()}


def _accumulation_parts(batch: Mapping[str, jax.Array], accum: int) -> dict:
    """(B, ...) -> (A, B/A, ...), rows interleaved so every part keeps the batch's data
    sharding."""
    return jax.tree_util.tree_map(
        lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
        dict(batch))


def _reseed(model: nnx.Module, key: jax.Array) -> None:
    """Give every random stream of the model (nnx.Rngs held by e.g. nnx.Dropout) a key
    derived from this step's: a stream per name, the same on every mesh (JAX's random bits
    do not depend on the sharding)."""
    tags = sorted({s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
    if tags:
        nnx.reseed(model, **{t: jax.random.fold_in(key, i) for i, t in enumerate(tags)})


class _Settled:
    """A jitted function that settles (see `settle`) after each call; `.lower` passes through."""

    def __init__(self, fn: Any, mesh: Mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args: Any) -> Any:
        return settle(self.mesh, self.fn(*args))

    def lower(self, *args: Any) -> Any:
        return self.fn.lower(*args)
