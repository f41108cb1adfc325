"""The accelerator a plan is made for: a known card (jaxmp.accelerators) with this
host's overrides, or this host itself (its measured matmul and copy speeds)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from jaxmp.accelerators import GIB, KNOWN, Accelerator


def cpu_accelerator(num_devices: int) -> Accelerator:
    """This host as a target: FLOP/s of a float32 matmul and the bandwidth of a large copy,
    measured now, shared by the `num_devices` simulated devices (they run on the same
    cores); memory is the host's RAM split between them."""
    dev = jax.devices("cpu")[0]
    a = jax.device_put(np.ones((1024, 1024), np.float32), dev)
    mm = jax.jit(lambda x: x @ x)
    big = jax.device_put(np.ones(32 << 20, np.float32), dev)
    cp = jax.jit(lambda x: x * 1.0001)

    def best(fn: Any, x: Any) -> float:
        jax.block_until_ready(fn(x))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x))
            times.append(time.perf_counter() - t0)
        return min(times)
    flops = 2 * 1024 ** 3 / best(mm, a)
    copy = 2 * big.nbytes / best(cp, big)  # read + write
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    latency = _collective_latency(num_devices, best)
    return Accelerator(
        name="cpu", device_kinds=("cpu",), memory_bytes=ram // num_devices,
        peak_flops={"float32": flops / num_devices, "bfloat16": flops / num_devices},
        hbm_bytes_per_s=copy / num_devices, intra_host_bytes_per_s=copy / num_devices,
        inter_host_bytes_per_s=copy / num_devices, devices_per_host=num_devices,
        intra_host_latency_s=latency, inter_host_latency_s=latency, efficiency=0.3,
        unrolled_efficiency=0.3,
        sources=f"measured now on this host ({os.cpu_count()} cores): float32 1024^3 matmul "
                f"{flops / 1e9:.1f} GFLOP/s, copy {copy / 1e9:.1f} GB/s, RAM "
                f"{ram / GIB:.1f} GiB, each shared by {num_devices} simulated devices; "
                f"one small all-reduce over them {latency * 1e6:.0f} us")


def _collective_latency(num_devices: int, best: Any) -> float:
    """Seconds per small all-reduce over `num_devices` CPU devices inside one program (a
    program of 33 all-reduces less one of 1, over 32)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if num_devices < 2:
        return 0.0
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("x",))
    x = jax.device_put(np.ones((num_devices, 256), np.float32),
                       NamedSharding(mesh, PartitionSpec("x")))

    def chain(n: int) -> Any:
        def body(a: jax.Array) -> jax.Array:
            for _ in range(n):
                a = jax.lax.psum(a, "x") * 0.5
            return a
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec("x"),
                                     out_specs=PartitionSpec("x")))
    return max(0.0, (best(chain(33), x) - best(chain(1), x)) / 32)


def target(name: str, num_devices: int, *, memory_gib: float | None = None,
           efficiency: float | None = None, devices_per_host: int | None = None) -> Accelerator:
    """The accelerator `name` (h100, h200, a100, cpu) with any of its figures overridden."""
    if name == "cpu":
        card = cpu_accelerator(num_devices)
    elif name in KNOWN:
        card = KNOWN[name]
    else:
        raise ValueError(f"target={name!r}: unknown accelerator; known: "
                         f"{', '.join((*KNOWN, 'cpu'))}")
    changes: dict[str, Any] = {}
    if memory_gib is not None:
        if not memory_gib > 0:
            raise ValueError(f"target_memory_gib={memory_gib} must be > 0")
        changes["memory_bytes"] = int(memory_gib * GIB)
    if efficiency is not None:
        if not 0 < efficiency <= 1:
            raise ValueError(f"efficiency={efficiency} must be in (0, 1]")
        changes["efficiency"] = changes["unrolled_efficiency"] = efficiency
    if devices_per_host is not None:
        if devices_per_host < 1:
            raise ValueError(f"gpus_per_host={devices_per_host} must be >= 1")
        changes["devices_per_host"] = devices_per_host
    return dataclasses.replace(card, **changes)
