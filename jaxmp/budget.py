"""What a run will allocate, checked against what the machine has, before it allocates.

The flags that size memory (vocabulary, width, depth, batch, accumulation) can ask for
more than any device holds; without this check the run prints its plan, starts
initialising and is killed by the kernel (or raises MemoryError from numpy) minutes later.
The check is a lower bound, not a plan (`inspect --target` plans): the train state
(parameters and Adam's two moments, in the layout the state is kept in), the logits of
one accumulation part and the host copy of one global batch. Anything above it that does
not fit is caught by XLA's own allocator at compile time.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from jaxmp.mesh import batch_shards

GiB = 1024 ** 3


class BudgetError(ValueError):
    """The run asks for more memory than the machine has."""


def available_bytes_per_device() -> int | None:
    """Memory one device may use: the accelerator's limit, or on CPU this host's available
    memory shared by its devices. None where it cannot be read."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("bytes_limit")
    host = host_available_bytes()
    return None if host is None else host // jax.local_device_count()


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free pages x page size."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_run_fits(trainer: Any, model_cfg: Any, batch_size: int, accum: int) -> None:
    """A one-line error, naming the bytes needed and available and the flags that size
    them, when the run cannot fit; call before anything is allocated."""
    mesh = trainer.mesh
    shards = batch_shards(mesh)[0]
    from jaxmp.models.registry import model_shape

    shape = model_shape(model_cfg)
    seq = shape.seq_len
    batch_host = batch_size * (seq + 1) * 4  # the global batch as int32 tokens on the host
    host = host_available_bytes()
    if host is not None and batch_host > host:
        raise BudgetError(f"batch_size={batch_size}: one global batch of {batch_size} x "
                          f"{seq + 1} tokens is {_gib(batch_host)} on the host, which has "
                          f"{_gib(host)} available; use a smaller --batch_size")
    state = trainer.state_bytes_per_device()
    rows = max(1, batch_size // max(1, accum) // shards)
    vocab = shape.vocab
    tensor = mesh.shape["tensor"] * (mesh.shape["pipe"] if vocab else 1)
    logits = rows * seq * vocab * 4 // max(1, tensor)
    if getattr(model_cfg, "fused_loss", False):  # one chunk's logits at a time
        from jaxmp import fused_loss

        chunk = getattr(model_cfg, "loss_chunk", 0)
        logits = min(logits, chunk * vocab * 4 // max(1, tensor) if chunk
                     else fused_loss.chunk_budget())
    need = state + logits
    have = available_bytes_per_device()
    if have is None or need <= have:
        return
    raise BudgetError(
        f"this run needs at least {_gib(need)} per device (train state {_gib(state)}: "
        f"parameters and Adam's moments; logits of one accumulation part, or of one chunk "
        f"of the fused loss, {_gib(logits)}) but "
        f"{_gib(have)} is available per device on {jax.local_devices()[0].platform}; use a "
        "smaller model or --vocab_size, a smaller --batch_size or more --grad_accum_steps, or "
        "a mesh that splits the state over more devices (fsdp, tensor, pipe)")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 100 else f"{n / 1024 ** 2:.1f} MiB"
