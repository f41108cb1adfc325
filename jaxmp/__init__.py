"""jaxmp: model-parallel training and serving for JAX / Flax NNX.

    import jaxmp
    mesh = jaxmp.make_mesh("data:2,pipe:2,tensor:2")
    trainer = jaxmp.Trainer(model_factory, loss_fn, mesh)

The names below are imported on first use (PEP 562), so `import jaxmp` does not load
Orbax, the serving stack or the model families until something asks for them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # checkpoints
    "CheckpointError": "jaxmp.checkpoint", "CheckpointRecord": "jaxmp.checkpoint",
    "Checkpoints": "jaxmp.checkpoint", "export_params": "jaxmp.checkpoint",
    # configuration and runs
    "RunConfig": "jaxmp.config", "train": "jaxmp.run", "Hook": "jaxmp.run",
    "every": "jaxmp.run",
    # layers
    "MLP": "jaxmp.models.gpt", "Attention": "jaxmp.models.gpt", "DecoderBlock": "jaxmp.models.gpt",
    "Dense": "jaxmp.layers", "Embed": "jaxmp.layers", "LayerNorm": "jaxmp.layers",
    # meshes
    "AXES": "jaxmp.mesh", "MeshError": "jaxmp.mesh", "format_mesh": "jaxmp.mesh",
    "make_mesh": "jaxmp.mesh", "parse_mesh": "jaxmp.mesh",
    "simulate_cpu_devices": "jaxmp.mesh",
    # model families
    "GPT": "jaxmp.models.gpt", "GPTConfig": "jaxmp.models.gpt", "PRESETS": "jaxmp.models.gpt",
    "preset": "jaxmp.models.gpt", "Llama": "jaxmp.models.llama",
    "LlamaConfig": "jaxmp.models.llama", "lm_loss": "jaxmp.models.decoder",
    "LayerwiseMLP": "jaxmp.models.mlp", "LayerwiseMLPConfig": "jaxmp.models.mlp",
    "classification_loss": "jaxmp.models.mlp", "Family": "jaxmp.models.registry",
    "register": "jaxmp.models.registry",
    # parallelism
    "PipelineError": "jaxmp.pipeline", "PipelineSpec": "jaxmp.pipeline",
    "bubble_fraction": "jaxmp.pipeline", "DEFAULT_RULES": "jaxmp.sharding",
    "LOGICAL_NAMES": "jaxmp.sharding", "Plan": "jaxmp.sharding", "Rules": "jaxmp.sharding",
    "ShardingError": "jaxmp.sharding", "activation_sharding": "jaxmp.sharding",
    "constrain": "jaxmp.sharding", "logical_axes": "jaxmp.sharding", "plan": "jaxmp.sharding",
    "LayerStack": "jaxmp.stack", "OptConfig": "jaxmp.optim", "Trainer": "jaxmp.train",
    "TrainState": "jaxmp.train",
    # serving
    "ServeError": "jaxmp.sampling", "Server": "jaxmp.serve",
}
# Earlier names, still importable: MLPConfig is the layer-wise MLP model's config (not the
# transformer's MLP layer, jaxmp.MLP).
_ALIASES = {"MLPConfig": ("jaxmp.models.mlp", "MLPConfig")}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'jaxmp' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
