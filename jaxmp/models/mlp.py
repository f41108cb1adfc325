"""The book's layer-wise DNN (Figure 7.1): input projection, a stack of equal-width hidden
layers, output projection; trained on a built-in synthetic classification task.

The hidden layers are stacked on a `layers` axis like GPT's blocks, so the pipeline puts
one (or more) of them on each `pipe` stage: with --mesh=pipe:3 and three hidden layers,
layer i runs on device i, exactly the book's figure.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmp.data import make_global
from jaxmp.layers import Dense
from jaxmp.models.registry import Family, register
from jaxmp.pipeline import PipelineSpec
from jaxmp.scheduled import stack_loss
from jaxmp.sharding import constrain
from jaxmp.stack import LayerStack

X_NAMES = ("batch", "embed")


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    input_dim: int = 32
    hidden_dim: int = 128
    num_layers: int = 3  # hidden layers
    num_classes: int = 10
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True

    def validate(self) -> None:
        for name in ("input_dim", "hidden_dim", "num_layers", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLP {name}={getattr(self, name)} must be >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: choose float32 or bfloat16")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LayerwiseMLPConfig = MLPConfig  # the name jaxmp exports (not to be read with jaxmp.MLP, a layer)


class Hidden(nnx.Module):
    """One hidden layer: relu(h W + b), width preserved."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype: Any):
        self.dense = Dense((width,), (width,), ("embed",), ("mlp",), rngs=rngs,
                           std=math.sqrt(2.0 / width), dtype=dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        return constrain(jax.nn.relu(self.dense(h)), X_NAMES)


class LayerwiseMLP(nnx.Module):
    def __init__(self, cfg: MLPConfig, *, rngs: nnx.Rngs,
                 pipeline: PipelineSpec = PipelineSpec()):
        cfg.validate()
        self.cfg = cfg
        self.stack = LayerStack(cfg.num_layers, pipeline, cfg.remat, cfg.scan_layers,
                                "hidden layers")
        # model.eval() sets it: the loss then runs forward only (no schedule-driven
        # backward pass, jaxmp.scheduled)
        self.deterministic = False
        dtype = jnp.dtype(cfg.dtype)
        self.inp = Dense((cfg.input_dim,), (cfg.hidden_dim,), (None,), ("embed",), rngs=rngs,
                         std=math.sqrt(1.0 / cfg.input_dim), dtype=dtype)
        self.hidden = self.stack.build(lambda r: Hidden(cfg.hidden_dim, rngs=r, dtype=dtype),
                                       rngs.params())
        self.out = Dense((cfg.hidden_dim,), (cfg.num_classes,), ("embed",), (None,), rngs=rngs,
                         std=math.sqrt(1.0 / cfg.hidden_dim), dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, input_dim) -> logits (B, num_classes) float32."""
        return self.head(self.stack.apply(self.hidden, self.stem(x), X_NAMES))

    def stem(self, x: jax.Array) -> jax.Array:
        return constrain(self.inp(x), X_NAMES)

    def head(self, h: jax.Array) -> jax.Array:
        return self.out(h).astype(jnp.float32)


def classification_loss(model: LayerwiseMLP, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean cross-entropy of the classes (inside the pipeline schedule with 1f1b /
    interleaved, like the decoders' loss)."""
    def tail(m: LayerwiseMLP, h: jax.Array, rows: dict) -> tuple[jax.Array, dict]:
        logp = jax.nn.log_softmax(m.head(h))
        return -jnp.take_along_axis(logp, rows["y"][:, None], axis=1)[:, 0], {}
    loss, _ = stack_loss(model, "hidden", lambda m, rows: m.stem(rows["x"]),
                         lambda layer, h: layer(h), tail, {"x": batch["x"], "y": batch["y"]},
                         X_NAMES)
    return loss


def synthetic_batch(cfg: MLPConfig, seed: int, step: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `rows` of the global batch of `step`: Gaussian inputs labelled by a fixed random
    teacher network (seeded by `seed`), so the task has structure a DNN can learn."""
    teacher = np.random.default_rng([seed, 0x7EAC])
    w1 = teacher.standard_normal((cfg.input_dim, 64)) / math.sqrt(cfg.input_dim)
    w2 = teacher.standard_normal((64, cfg.num_classes)) / 8.0
    out_x, out_y = [], []
    for row in rows:
        x = np.random.default_rng([seed, step, int(row)]).standard_normal(cfg.input_dim)
        out_x.append(x)
        out_y.append(int(np.argmax(np.tanh(x @ w1) @ w2)))
    return {"x": np.asarray(out_x, np.float32), "y": np.asarray(out_y, np.int32)}


class SyntheticBatches:
    """The synthetic task's global batches; each process builds only its own rows."""

    unit = "examples"

    def __init__(self, cfg: MLPConfig, batch_size: int, seed: int):
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.tokens_per_step = batch_size

    def example(self) -> dict[str, np.ndarray]:
        return {"x": np.zeros((self.batch_size, self.cfg.input_dim), np.float32),
                "y": np.zeros((self.batch_size,), np.int32)}

    def device(self, step: int, shardings: dict) -> dict[str, jax.Array]:
        made: dict[tuple[int, int, int], dict] = {}  # x and y of the same rows, drawn once

        def rows(key: str):
            def fn(r: range) -> np.ndarray:
                ident = (r.start, r.stop, r.step)
                if ident not in made:
                    made[ident] = synthetic_batch(self.cfg, self.seed, step, np.asarray(r))
                return made[ident][key]
            return fn

        ex = self.example()
        return {k: make_global(ex[k].shape, shardings[k], rows(k)) for k in ex}


def _config(spec: Any, source: str) -> MLPConfig:
    """The MLP of the command line: --num_layers hidden layers of width --d_model."""
    over = spec.family_overrides("mlp", MLPConfig, {"d_model": "hidden_dim"})
    cfg = MLPConfig(**over)
    cfg.validate()
    return cfg


FAMILY = register(Family(
    name="mlp", make_config=_config, config_from_json=lambda d: MLPConfig(**d),
    build=lambda cfg, pipeline, rngs: LayerwiseMLP(cfg, rngs=rngs, pipeline=pipeline),
    loss=classification_loss,
    batches=lambda cfg, source, batch_size, seed: SyntheticBatches(cfg, batch_size, seed),
    stack="hidden", layers_name="hidden layers"))
