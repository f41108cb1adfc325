"""Device meshes: parse "data:2,pipe:2,tensor:2", simulate CPU devices, build the Mesh.

Mesh axes, outermost first: data, fsdp, pipe, expert, context, tensor. The tensor axis is
innermost so that its (per-layer, latency-bound) all-reduces stay between the
best-connected devices; `context` (context parallelism: the sequence split, its attention
passing key/value blocks around a ring or all-gathering them, per layer) and `expert` (a
mixture of experts' all-to-alls, twice per MoE layer) sit next to it. Outside the experts
`expert` splits the batch like `data` (BATCH_AXES).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES: tuple[str, ...] = ("data", "fsdp", "pipe", "expert", "context", "tensor")
# the axes the batch is split over (the default activation rule for `batch`)
BATCH_AXES: tuple[str, ...] = ("data", "fsdp", "expert")


def batch_shards(shape: dict[str, int] | Mesh) -> tuple[int, str]:
    """How many pieces the default rules cut the batch into (data * fsdp * expert), and
    how errors name that product ("data*fsdp", with "*expert" on an expert mesh)."""
    sizes = dict(shape.shape) if isinstance(shape, Mesh) else shape
    label = "data*fsdp" + ("*expert" if sizes.get("expert", 1) != 1 else "")
    return math.prod(sizes.get(a, 1) for a in BATCH_AXES), label


class MeshError(ValueError):
    """A mesh string or device layout that cannot be used."""


def parse_mesh(spec: str, num_devices: int | None) -> dict[str, int]:
    """Parse "data:2,pipe:2,tensor:2" into {axis: size} over all AXES (omitted axes are 1).

    One size may be -1: it takes the devices left over. The product must equal num_devices
    (num_devices=None checks the syntax only; a -1 axis is then left at -1).
    """
    sizes: dict[str, int] = {}
    spec = (spec or "").strip()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition(":")
        name = name.strip()
        if not sep:
            raise MeshError(f"mesh entry {part!r} has no size; write it as 'axis:size', e.g. 'data:2'")
        if name not in AXES:
            raise MeshError(f"unknown mesh axis {name!r} in {spec!r}; axes are {', '.join(AXES)}")
        if name in sizes:
            raise MeshError(f"mesh axis {name!r} appears twice in {spec!r}; give each axis once")
        try:
            size = int(value)
        except ValueError:
            raise MeshError(f"mesh axis {name!r} has size {value!r}, not an integer") from None
        if size < 1 and size != -1:
            raise MeshError(f"mesh axis {name!r} has size {size}; sizes are >= 1, or -1 for 'the rest'")
        sizes[name] = size
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise MeshError(f"mesh {spec!r} has -1 on {', '.join(fill)}; at most one axis may be -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if num_devices is None:
        return {a: sizes.get(a, 1) for a in AXES}
    if fill:
        if num_devices % fixed:
            raise MeshError(
                f"mesh {spec!r}: the fixed axes use {fixed} devices, which does not divide the "
                f"{num_devices} devices present; {_fitting_hint(num_devices)}"
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh {spec!r} needs {fixed} devices but {num_devices} are present; "
            f"{_fitting_hint(num_devices)}"
        )
    return {a: sizes.get(a, 1) for a in AXES}


def _fitting_hint(n: int) -> str:
    examples = [f"data:{n}", f"tensor:{n}", "data:-1"]
    if n % 4 == 0 and n > 4:
        examples.insert(2, f"data:{n // 4},pipe:2,tensor:2")
    return "axis sizes must multiply to " + str(n) + ", e.g. " + " or ".join(examples)


def format_mesh(shape: dict[str, int] | Mesh) -> str:
    """The canonical mesh string (axes of size 1 omitted), e.g. 'data:2,tensor:4'."""
    if isinstance(shape, Mesh):
        shape = dict(shape.shape)
    text = ",".join(f"{a}:{shape[a]}" for a in AXES if shape.get(a, 1) > 1)
    return text or "data:1"


def simulate_cpu_devices(n: int) -> None:
    """Ask for n simulated CPU devices. Must run before JAX starts its backend.

    Does nothing where an accelerator platform is requested (JAX_PLATFORMS names one).
    """
    if n < 1:
        raise MeshError(f"simulate_devices={n}: need at least 1 device")
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        have = jax.local_device_count()
        if jax.default_backend() == "cpu" and have != n:
            raise MeshError(
                f"cannot simulate {n} CPU devices: the JAX backend already started with {have}; "
                "call jaxmp.mesh.simulate_cpu_devices() before any JAX operation"
            )
        return
    jax.config.update("jax_num_cpu_devices", n)
    # Older jaxlibs only read XLA_FLAGS; keep both in step for subprocesses too.
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])


def make_mesh(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a Mesh with axes AXES over `devices` (default: all)."""
    devices = _process_major(list(jax.devices() if devices is None else devices))
    shape = parse_mesh(spec, len(devices)) if isinstance(spec, str) else _checked(spec, len(devices))
    dims = tuple(shape[a] for a in AXES)
    grid = np.array(devices).reshape(dims)  # process-major: tensor, then pipe, within a host
    if devices[0].platform != "cpu" and jax.process_count() == 1:
        from jax.experimental import mesh_utils

        try:  # let the topology-aware helper order one host's accelerators
            grid = mesh_utils.create_device_mesh(dims, devices=devices,
                                                 allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            pass
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _checked(shape: dict[str, int], n: int) -> dict[str, int]:
    bad = set(shape) - set(AXES)
    if bad:
        raise MeshError(f"unknown mesh axis {sorted(bad)[0]!r}; axes are {', '.join(AXES)}")
    full = {a: int(shape.get(a, 1)) for a in AXES}
    if math.prod(full.values()) != n:
        raise MeshError(f"mesh {format_mesh(full)} needs {math.prod(full.values())} devices "
                        f"but {n} are present; {_fitting_hint(n)}")
    return full


def _process_major(devices: list[jax.Device]) -> list[jax.Device]:
    # Devices of one process stay adjacent, so the innermost axes (tensor, pipe) stay in a host.
    return sorted(devices, key=lambda d: (d.process_index, d.id))

