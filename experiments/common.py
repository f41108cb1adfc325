"""Flags shared by the entry points, and the guarded start-up every entry point uses."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

SIMULATE = flags.DEFINE_integer(
    "simulate_devices", 8,
    "CPU only: number of simulated CPU devices (ignored where a GPU/TPU backend is used).")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def define_model_flags() -> None:
    """The model and layout flags of train and inspect (DESIGN.md's names)."""
    flags.DEFINE_enum("model", "gpt", ["gpt", "mlp"], "Model family.")
    flags.DEFINE_enum("preset", "tiny", ["tiny", "small", "medium", "large", "xl"],
                      "GPT-2 shape.")
    flags.DEFINE_integer("num_layers", None, "Override: decoder layers (GPT) or hidden "
                         "layers (MLP).")
    flags.DEFINE_integer("d_model", None, "Override: model width (GPT) or hidden width (MLP).")
    flags.DEFINE_integer("num_heads", None, "Override: attention heads.")
    flags.DEFINE_integer("seq_len", None, "Override: context length.")
    flags.DEFINE_integer("vocab_size", None, "Vocabulary (default 256 for bytes, 50257 for "
                         "token files).")
    flags.DEFINE_string("mesh", "data:2,pipe:2,tensor:2", "Mesh, e.g. data:2,pipe:2,tensor:2.")
    flags.DEFINE_integer("microbatches", 4, "Pipeline micro-batches per data shard.")
    flags.DEFINE_integer("pipeline_repeats", 1, "Circular pipeline rounds (layer groups per "
                         "stage).")
    flags.DEFINE_string("rules", "", "Parameter rule overrides, e.g. 'embed=;mlp=tensor'.")


def setup_devices() -> None:
    """Start the distributed runtime (multi-host runs) and simulate CPU devices, before any
    JAX operation. Accelerator backends ignore the simulated count."""
    from jaxmp.distributed import initialize

    initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
               simulate_devices=SIMULATE.value)


def run_guarded(argv: list[str], body: Callable[[], int | None]) -> int:
    """Set up devices, run `body`; bad input of any kind ends in one `error:` line, exit 2."""
    from jaxmp.distributed import DistributedError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        setup_devices()
        return body() or 0
    except (ValueError, OSError, FloatingPointError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
