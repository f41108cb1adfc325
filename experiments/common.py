"""Flags shared by the entry points, and the device set-up that must precede JAX's backend."""

from __future__ import annotations

from absl import flags

from jaxmp.mesh import simulate_cpu_devices

SIMULATE = flags.DEFINE_integer(
    "simulate_devices", 8,
    "CPU only: number of simulated CPU devices (ignored where a GPU/TPU backend is used).")


def setup_devices() -> None:
    """Simulate CPU devices before any JAX operation (accelerator backends ignore it)."""
    simulate_cpu_devices(SIMULATE.value)
