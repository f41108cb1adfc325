"""jaxmp: model-parallel training and serving for JAX / Flax NNX.

    import jaxmp
    mesh = jaxmp.make_mesh("data:2,pipe:2,tensor:2")
    trainer = jaxmp.Trainer(model_factory, loss_fn, mesh)
"""

from jaxmp.checkpoint import CheckpointError, CheckpointRecord, Checkpoints, export_params
from jaxmp.config import RunConfig
from jaxmp.layers import MLP, Attention, DecoderBlock, Dense, Embed, LayerNorm
from jaxmp.mesh import AXES, MeshError, format_mesh, make_mesh, parse_mesh, simulate_cpu_devices
from jaxmp.models.gpt import GPT, PRESETS, GPTConfig, lm_loss, preset
from jaxmp.models.mlp import LayerwiseMLP, MLPConfig, classification_loss
from jaxmp.models.registry import Family, register
from jaxmp.pipeline import PipelineError, PipelineSpec, bubble_fraction
from jaxmp.serve import ServeError, Server
from jaxmp.sharding import (
    DEFAULT_RULES,
    LOGICAL_NAMES,
    Plan,
    Rules,
    ShardingError,
    activation_sharding,
    constrain,
    logical_axes,
    plan,
)
from jaxmp.stack import LayerStack
from jaxmp.train import OptConfig, Trainer, TrainState

__version__ = "0.1.0"

__all__ = [
    "MLP", "Attention", "CheckpointError", "Checkpoints", "DecoderBlock", "Dense", "Embed",
    "LayerNorm", "Server", "ServeError", "export_params", "CheckpointRecord", "RunConfig",
    "Family", "register", "LayerStack",
    "AXES", "DEFAULT_RULES", "GPT", "GPTConfig", "LOGICAL_NAMES", "LayerwiseMLP", "MLPConfig",
    "MeshError", "OptConfig", "PRESETS", "PipelineError", "PipelineSpec", "Plan", "Rules",
    "ShardingError", "TrainState", "Trainer", "activation_sharding", "bubble_fraction",
    "classification_loss", "constrain", "format_mesh", "lm_loss", "logical_axes", "make_mesh",
    "parse_mesh", "plan", "preset", "simulate_cpu_devices",
]
