"""Device peaks and model FLOPs utilization (MFU).

This lives in the library, not beside the benchmarks, because the training loop logs MFU
on every logged step (`jaxmp.run`); the compiled-program accounting the benchmarks
use (HLO parsing, collectives, FLOPs, memory) lives in experiments/.
"""

from __future__ import annotations

import jax

from jaxmp.accelerators import Accelerator, by_device_kind


def _card(device: jax.Device | None) -> Accelerator | None:
    return by_device_kind(getattr(device or jax.devices()[0], "device_kind", ""))


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak of `device` (default: the first one), or None if unknown (CPU)."""
    card = _card(device)
    return card.peak("bfloat16") if card else None


def memory_bandwidth(device: jax.Device | None = None) -> float | None:
    """Datasheet memory bandwidth of `device` in bytes/s, or None if unknown (CPU)."""
    card = _card(device)
    return card.hbm_bytes_per_s if card else None


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int,
        device: jax.Device | None = None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' summed peak."""
    peak = peak_flops(device)
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)
