"""Flags shared by the entry points, and the device set-up that must precede JAX's backend."""

from __future__ import annotations

from absl import flags

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
