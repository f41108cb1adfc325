"""The structure suite's accounting of one compiled step: memory against the ideal, the
collectives by kind and mesh axes, the traffic each kind of parallelism should cause, the
gradient reduction, and which all-gathers gather a weight."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from experiments.bench.results import Json
from jaxmp.models.gpt import GPTConfig
from jaxmp.plan import analysis, weightflow
from jaxmp.plan.hlo import HloModule
from jaxmp.sharding import shards_of

DP_AXES = ("data", "fsdp", "data+fsdp")  # the axes a data-parallel gradient reduction runs over


def memory(compiled: Any, abstract: Any, param_bytes: int, shape: Mapping[str, int],
            n: int) -> Json:
    """The compiled program's memory figures and the train state per device vs the ideal."""
    mem = analysis.memory_figures(compiled)
    state_dev = analysis.sharded_bytes(abstract, compiled.input_shardings[0][0])
    ideal_state = 3 * analysis.tree_bytes(abstract.params) / n  # params + Adam's two moments
    return {
        "argument_bytes": mem.argument_bytes, "temp_bytes": mem.temp_bytes,
        "output_bytes": mem.output_bytes, "alias_bytes": mem.alias_bytes,
        "peak_estimate_bytes": mem.peak_estimate_bytes,
        "param_bytes_per_device": param_bytes,
        "state_bytes_per_device": state_dev,
        "ideal_state_bytes_per_device": ideal_state,
        "state_ratio": state_dev / ideal_state,
        # Data parallelism replicates the state by design: the ideal of the model-parallel
        # axes alone (fsdp, pipe, tensor) is total / (devices / data).
        "replica_ideal_state_bytes_per_device": ideal_state * shape["data"],
        "replica_state_ratio": state_dev / (ideal_state * shape["data"]),
    }


def by_axes(found: Mapping[analysis.CollectiveKey, tuple[int, int]]) -> dict[str, Json]:
    """{'op@axes[loop]': {count, bytes}}, sorted by op, axes, inside a loop."""
    keys = sorted(found, key=lambda k: (k.op, k.axes, k.in_loop))
    return {f"{k.op}@{k.axes}{'[loop]' if k.in_loop else ''}": cb(found[k]) for k in keys}


def cb(count_bytes: tuple[int, int] | dict[str, int]) -> dict[str, int]:
    if isinstance(count_bytes, dict):
        return {"count": int(count_bytes["count"]), "bytes": int(count_bytes["bytes"])}
    return {"count": int(count_bytes[0]), "bytes": int(count_bytes[1])}


def parallel_traffic(found: Mapping[analysis.CollectiveKey, tuple[int, int]], cfg: GPTConfig,
                      batch: int, shape: Mapping[str, int], m: int, r: int, bubble: float,
                      plan: Any, option: str = "") -> Json:
    """Each parallelism's compiled traffic against its analytic minimum (None where the
    layout does not use it): Megatron's all-reduces over tensor, the pipeline's hand-offs
    over pipe, the gradient reduction over data and fsdp."""
    p = shape["pipe"]
    rows = batch // (shape["data"] * shape["fsdp"])
    itemsize = jnp.dtype(cfg.dtype).itemsize
    tp = None
    if shape["tensor"] > 1:
        minimum = analysis.megatron_allreduce(cfg.num_layers / p, rows, cfg.seq_len,
                                              cfg.d_model, itemsize, m if p > 1 else 1)
        loop = analysis.collective_totals(found, axes="tensor", in_loop=True)
        compiled_tp = loop["all-reduce"]
        if option == "sp":  # 4 reduce-scatters + 6 all-gathers per layer replace 4 all-reduces
            minimum = (minimum[0] * 10 // 4, minimum[1] * 10 // 4)
            compiled_tp = {k: loop["all-gather"][k] + loop["reduce-scatter"][k]
                           for k in ("count", "bytes")}
        tp = {"compiled_allreduce": cb(compiled_tp), "megatron_min": cb(minimum),
              "bytes_ratio": compiled_tp["bytes"] / minimum[1],
              "count_ratio": compiled_tp["count"] / minimum[0],
              "expected_ratio": bubble}
    pp = None
    if p > 1:
        minimum = analysis.pipeline_permutes(p, m, r, rows, cfg.seq_len, cfg.d_model, itemsize)
        compiled_pp = analysis.collective_totals(found, axes="pipe")["collective-permute"]
        pp = {"compiled_permute": cb(compiled_pp), "handoff_min": cb(minimum),
              "bytes_ratio": compiled_pp["bytes"] / minimum[1],
              "count_ratio": compiled_pp["count"] / minimum[0]}
    dp = gradient_reduction(found, shape, plan) if shape["data"] * shape["fsdp"] > 1 else None
    return {"tensor_parallel": tp, "pipeline": pp, "data_parallel": dp}


def gradient_reduction(found: Mapping[analysis.CollectiveKey, tuple[int, int]],
                        shape: Mapping[str, int], plan: Any) -> Json:
    """The compiled all-reduce / reduce-scatter bytes over data and fsdp against each
    device's gradients before that reduction (the parameters split only over pipe and
    tensor): reducing them once is the minimum traffic."""
    grad = sum(row.bytes_total // shards_of(row.spec, shape, ("pipe", "tensor"))
               for row in plan.rows)
    reduced = {"count": 0, "bytes": 0}
    for k, (count, nbytes) in found.items():
        if k.op in ("all-reduce", "reduce-scatter") and k.axes in DP_AXES:
            reduced["count"] += count
            reduced["bytes"] += nbytes
    return {"compiled_gradient_reduction": reduced, "gradient_bytes": grad,
            "bytes_ratio": reduced["bytes"] / grad}


def weight_gathers(compiled: Any, module: HloModule) -> Json:
    """All-gathers of a weight or a piece, reshaping or cast of one, traced from the
    state's parameters through the program (weightflow.weight_derived_gathers)."""
    weights = {i: path for i, path in weightflow.jax_entry_parameters(compiled, module).items()
               if path.startswith("args[0].params")}
    gathers = weightflow.weight_derived_gathers(module, weights)
    return {"count": sum(g.executions for g in gathers), "bytes": sum(g.bytes for g in gathers),
            "weights": sorted({w for g in gathers for w in g.weights})}
