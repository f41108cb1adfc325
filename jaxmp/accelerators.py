"""Accelerators as numbers: memory, peak FLOP/s, memory and link bandwidths, each with its
source. The training loop's MFU (jaxmp.throughput) and the planner (`inspect --target`)
read them from here.

Link bandwidths are per device and per direction (what a ring collective's busiest link
carries): NVLink within a host, the network between hosts (one NIC per GPU, as in NVIDIA's
DGX / HGX systems). Memory is what `nvidia-smi` reports as the card's total.
"""

from __future__ import annotations

import dataclasses

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    device_kinds: tuple[str, ...]   # substrings of jax's device_kind that name this card
    memory_bytes: int               # device memory, total
    peak_flops: dict[str, float]    # dense peak by compute dtype (float32: TF32 tensor cores,
                                    # JAX's default for float32 matmuls on these GPUs)
    hbm_bytes_per_s: float          # memory bandwidth
    intra_host_bytes_per_s: float   # NVLink, per device per direction
    inter_host_bytes_per_s: float   # network, per device per direction
    devices_per_host: int
    # Assumed latency of one collective (NCCL's small-message latency: order 10 us within a
    # host, 20 us across; an assumption, not a datasheet figure).
    intra_host_latency_s: float = 10e-6
    inter_host_latency_s: float = 20e-6
    # Fraction of peak FLOP/s at which the compiled program's FLOPs run, with the layers
    # scanned (the default; a pipeline always scans) and unrolled (--noscan_layers).
    # Calibrated (BUILD_NOTES "Planning a run"); `inspect --efficiency` overrides both.
    efficiency: float = 0.3
    unrolled_efficiency: float = 0.3
    # XLA's CPU compiler widens a bf16 model's activations to float32 around every matmul
    # (its dot emitter has no bf16) and keeps copies a GPU program does not: a bf16 plan's
    # activations compiled on the CPU are scaled by this (calibrated on an H100 run).
    bf16_activation_scale: float = 1.0
    sources: str = ""

    def peak(self, dtype: str) -> float:
        return self.peak_flops.get(dtype, self.peak_flops["bfloat16"])

    def efficiency_for(self, scanned: bool) -> float:
        return self.efficiency if scanned else self.unrolled_efficiency


# Calibrated by experiments.bench.plan_check on GPT-2 small's H100 steps (BUILD_NOTES "GPU"): the
# HLO FLOPs the planner counts ran at these fractions of the bf16 peak (82.2 ms scanned,
# 67.9 ms unrolled), and the H100 held 0.442 x the activations XLA's CPU compile of the same
# step reports (16.9 GiB peak). H200 and A100 take the same fractions (assumed: same
# compiler, same kernels; not measured).
CALIBRATED = dict(efficiency=0.355, unrolled_efficiency=0.429, bf16_activation_scale=0.442)
H100 = Accelerator(**CALIBRATED,
    name="h100", device_kinds=("H100",), memory_bytes=81559 * (1 << 20),
    peak_flops={"bfloat16": 989e12, "float32": 494.7e12}, hbm_bytes_per_s=3.35e12,
    intra_host_bytes_per_s=450e9, inter_host_bytes_per_s=50e9, devices_per_host=8,
    sources="NVIDIA H100 SXM5 datasheet (989 TFLOP/s dense BF16, 494.7 dense TF32, 3.35 TB/s "
            "HBM3, NVLink 4 900 GB/s bidirectional); DGX H100: 8 GPUs and 8 ConnectX-7 "
            "400 Gb/s NICs per host; memory: nvidia-smi 81559 MiB")
H200 = dataclasses.replace(
    H100, name="h200", device_kinds=("H200",), memory_bytes=143771 * (1 << 20),
    hbm_bytes_per_s=4.8e12,
    sources="NVIDIA H200 SXM datasheet (141 GB HBM3e at 4.8 TB/s; compute and NVLink as "
            "H100 SXM); DGX H200: 8 GPUs, 8 x 400 Gb/s NICs per host; memory: nvidia-smi "
            "143771 MiB")
A100 = Accelerator(**CALIBRATED,
    name="a100", device_kinds=("A100",), memory_bytes=81920 * (1 << 20),
    peak_flops={"bfloat16": 312e12, "float32": 156e12}, hbm_bytes_per_s=2.039e12,
    intra_host_bytes_per_s=300e9, inter_host_bytes_per_s=25e9, devices_per_host=8,
    sources="NVIDIA A100 SXM4 80GB datasheet (312 TFLOP/s dense BF16, 156 dense TF32, "
            "2.039 TB/s HBM2e, NVLink 3 600 GB/s bidirectional); DGX A100: 8 GPUs and "
            "8 x 200 Gb/s HDR NICs per host; memory: nvidia-smi 81920 MiB")
KNOWN: dict[str, Accelerator] = {a.name: a for a in (H100, H200, A100)}
TARGETS: tuple[str, ...] = (*KNOWN, "cpu")


def by_device_kind(kind: str) -> Accelerator | None:
    """The accelerator whose name appears in a jax device_kind ('NVIDIA H100 80GB HBM3')."""
    return next((a for a in KNOWN.values() if any(k in kind for k in a.device_kinds)), None)
