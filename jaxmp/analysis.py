"""Compiled-program accounting: device peaks and model FLOPs utilization (MFU)."""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per chip (vendor datasheets). H100 SXM and H200 share 989 TFLOP/s.
PEAK_BF16_FLOPS: dict[str, float] = {"H100": 989e12, "H200": 989e12}


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak of `device` (default: the first one), or None if unknown (CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16_FLOPS.items():
        if name in kind:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int,
        device: jax.Device | None = None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' summed peak."""
    peak = peak_flops(device)
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)
