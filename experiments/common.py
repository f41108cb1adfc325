"""Flags shared by the entry points, and the guarded start-up every entry point uses."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

SIMULATE = flags.DEFINE_integer(
    "simulate_devices", 8,
    "CPU only: number of simulated CPU devices (ignored where a GPU/TPU backend is used).")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


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
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        setup_devices()
        return body() or 0
    except (ValueError, OSError, FloatingPointError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
