"""Device peaks and model FLOPs utilization (MFU).

This lives in the library, not beside the benchmarks, because the training loop logs MFU
on every logged step (`jaxmp.experiment`); the compiled-program accounting the benchmarks
use (HLO parsing, collectives, FLOPs, memory) lives in experiments/.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

# Dense bf16 peak FLOP/s per chip (vendor datasheets). H100 SXM and H200 share 989 TFLOP/s.
PEAK_BF16_FLOPS: dict[str, float] = {"H100": 989e12, "H200": 989e12}
# HBM bandwidth, bytes/s (vendor datasheets: H100 SXM 80 GB HBM3 3.35 TB/s, H200 141 GB
# HBM3e 4.8 TB/s). The decode roofline divides this by the bytes read per token.
HBM_BYTES_PER_S: dict[str, float] = {"H100": 3.35e12, "H200": 4.8e12}


def _by_kind(table: Mapping[str, float], device: jax.Device | None) -> float | None:
    kind = getattr(device or jax.devices()[0], "device_kind", "")
    return next((v for name, v in table.items() if name in kind), None)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak of `device` (default: the first one), or None if unknown (CPU)."""
    return _by_kind(PEAK_BF16_FLOPS, device)


def memory_bandwidth(device: jax.Device | None = None) -> float | None:
    """Datasheet memory bandwidth of `device` in bytes/s, or None if unknown (CPU)."""
    return _by_kind(HBM_BYTES_PER_S, device)


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int,
        device: jax.Device | None = None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' summed peak."""
    peak = peak_flops(device)
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)
