"""The planner: `inspect --target` (memory and step time on an accelerator) and `--search`
(the layouts that fit, fastest first), against the programs that actually run."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
import pytest
from helpers import run_module

from jaxmp.accelerators import GIB, H100
from jaxmp.config import RunConfig, replace_flat
from jaxmp.mesh import format_mesh
from jaxmp.plan.analysis import CollectiveKey, MemoryFigures, memory_figures
from jaxmp.plan.planner import Layout, Program, collective_times, compile_program, link_of, make_plan, target
from jaxmp.plan.search import candidates, estimate_s, search

MESH16 = {"data": 2, "fsdp": 1, "pipe": 2, "tensor": 4}  # 16 devices, row-major


def test_axes_map_to_nvlink_inside_a_host_and_the_network_across():
    """Catches: a group's stride ignored (pipe's partners are 4 devices apart), a group
    spanning two hosts taken for one, unknown groups given the fast link."""
    assert link_of("tensor", MESH16, 8) == "nvlink"
    assert link_of("pipe", MESH16, 8) == "nvlink"
    assert link_of("pipe+tensor", MESH16, 8) == "nvlink"
    assert link_of("data", MESH16, 8) == "network"
    assert link_of("pipe", MESH16, 4) == "network"
    assert link_of("tensor", MESH16, 4) == "nvlink"
    assert link_of("?", MESH16, 8) == "network"


def test_collective_time_is_the_ring_over_its_link_plus_latency():
    """Catches: an all-reduce costed like an all-gather (it moves 2(n-1)/n of the buffer),
    the wrong link's bandwidth, the latency per call left out, groups of one costed."""
    coll = {CollectiveKey("all-reduce", "tensor", True): (4.0, 8e9),
            CollectiveKey("all-gather", "data", False): (2.0, 4e9),
            CollectiveKey("collective-permute", "pipe", True): (10.0, 1e9),
            CollectiveKey("all-reduce", "fsdp", False): (1.0, 1e9)}  # fsdp has size 1
    prog = Program(4, MemoryFigures(0, 0, 0, 0, 0), 0.0, coll)
    times = {(c.op, c.axes): c for c in collective_times(prog, MESH16, H100)}
    assert set(times) == {("all-reduce", "tensor"), ("all-gather", "data"),
                          ("collective-permute", "pipe")}
    assert times[("all-reduce", "tensor")].seconds == pytest.approx(
        8e9 * 2 * 3 / 4 / 450e9 + 4 * 10e-6)
    assert times[("all-gather", "data")].seconds == pytest.approx(4e9 / 2 / 50e9 + 2 * 20e-6)
    assert times[("collective-permute", "pipe")].seconds == pytest.approx(1e9 / 450e9 + 10e-5)


def test_extrapolation_in_depth_is_linear_in_every_figure():
    """Catches: extrapolating from the wrong end, a figure (a memory field, FLOPs, a
    collective only the deeper program has) left unscaled."""
    k1, k2 = CollectiveKey("all-gather", "fsdp", True), CollectiveKey("all-reduce", "data", False)
    a = Program(4, MemoryFigures(10, 5, 5, 100, 0), 1e9, {k1: (8.0, 80.0)})
    b = Program(8, MemoryFigures(18, 9, 9, 180, 0), 2e9, {k1: (16.0, 160.0), k2: (1.0, 4.0)})
    s = a.scaled(b, 16)
    assert s.layers == 16 and s.flops == pytest.approx(4e9)
    assert s.memory == MemoryFigures(34, 17, 17, 340, 0)
    assert s.collectives[k1] == pytest.approx((32.0, 320.0))
    assert s.collectives[k2] == pytest.approx((3.0, 12.0))


def test_candidates_cover_the_device_count_within_the_limits():
    """Catches: layouts with the wrong device count, tensor across hosts, micro-batches or
    accumulation parts that do not divide the batch, pipelines that do not divide the
    layers, gathering once without fsdp and pipe, duplicates."""
    cs = candidates(16, 8, 32, devices_per_host=8)
    assert len(set(cs)) == len(cs) > 100
    for c in cs:
        s = c.shape
        assert math.prod(s.values()) == 16 and s["tensor"] <= 8
        dp = s["data"] * s["fsdp"]
        assert 32 % (c.accum * dp * c.microbatches) == 0
        assert 8 % (s["pipe"] * c.repeats) == 0
        assert not c.gather_once or (s["pipe"] > 1 and s["fsdp"] > 1)
        assert s["pipe"] > 1 or (c.microbatches, c.repeats) == (1, 1)
    shapes = {c.mesh for c in cs}
    assert (("data", 1), ("fsdp", 2), ("pipe", 8), ("tensor", 1)) in shapes
    assert (("data", 16), ("fsdp", 1), ("pipe", 1), ("tensor", 1)) in shapes
    assert (("data", 1), ("fsdp", 16), ("pipe", 1), ("tensor", 1)) in shapes
    assert (("data", 2), ("fsdp", 4), ("pipe", 1), ("tensor", 2)) in shapes  # fsdp fills a host
    assert {c.remat for c in cs} == {"none", "dots", "block"}
    # one data shard needs tensor 8 x pipe 2, whose 2+ micro-batches leave 16 parts at most
    assert max(c.accum for c in cs) == 16


SMALL = dict(num_layers=16, d_model=64, num_heads=4, seq_len=32, batch_size=16)


@pytest.mark.slow
def test_plan_from_shallow_compiles_predicts_the_program_that_runs():
    """The plan of a pipeline with remat extrapolated from 4- and 8-layer compiles, against
    the 16-layer train step that has run a step: memory per device within 10%, FLOPs within
    1%; the memory terms add up to the peak. Catches: a figure not scaled with depth, the
    pipeline's depth unit wrong, state or gradient terms counted twice. (The plan suite
    checks seven layouts: BUILD_NOTES "Planning a run".)"""
    cfg = RunConfig.flat(**SMALL, mesh="data:2,pipe:2,tensor:2", microbatches=4, remat="block")
    lay, program, how = compile_program(cfg, "reduced")
    assert "extrapolated to 16 layers from compiles at 4 and 8 layers" in how
    plan = make_plan(lay, program, H100, how)
    full = Layout.build(cfg)
    compiled, loss = full.run_step()
    assert np.isfinite(loss)
    ran = full.compile(compiled)
    assert plan.peak_bytes == pytest.approx(ran.memory.peak_estimate_bytes, rel=0.10)
    assert plan.flops == pytest.approx(ran.flops, rel=0.01)
    assert sum(b for _, b in plan.memory_terms()) == plan.peak_bytes
    state_bytes = full.trainer.state_bytes_per_device()
    assert plan.params_bytes + plan.opt_bytes == pytest.approx(state_bytes, abs=64)


@pytest.mark.slow
def test_search_proposes_only_layouts_that_compile_run_and_fit():
    """With too little memory for GPipe's activations (every micro-batch's kept), every
    layout --search proposes compiles, trains a step on the simulated mesh and fits the
    target memory by the program's own figures, fastest first; layouts that do not fit
    were tried and set aside; what fits is 1F1B's (activations bounded by the stages; zb,
    estimated faster, keeps p micro-batches' activations and each matmul's input and output
    gradient until W: it is compiled first and does not fit).
    Catches: a fit judged on the state alone, proposals from the estimate rather than the
    compiled program, the shortcut skipping layouts that would fit, the search never
    trying the 1f1b schedule (or its flag lost on the way to the layout)."""
    cfg = RunConfig.flat(num_layers=4, d_model=64, num_heads=4, seq_len=64, batch_size=16)
    budget = 3.0 * 2**20
    card = dataclasses.replace(H100, memory_bytes=int(budget))
    found = search(cfg, card, 8, top=2, max_compiles=8)  # (zb, gpipe, 1f1b: 5 do not fit)
    assert found.found and found.rejected.get("compiled, does not fit", 0) >= 1
    times = [p.step_s for _, p in found.found]
    assert times == sorted(times)
    assert any(c.schedule == "1f1b" and "--pipeline_schedule=1f1b" in c.flags()
               for c, _ in found.found), [c.flags() for c, _ in found.found]
    for cand, predicted in found.found[:2]:
        assert predicted.fits and predicted.peak_bytes <= budget
        layout = Layout.build(replace_flat(cfg, **cand.settings()))
        assert layout.pipe.schedule == cand.schedule
        if cand.schedule == "1f1b":  # the plan explains 1F1B's memory with its kept items
            assert f"(x {predicted.ticks} live" in predicted.format() and predicted.ticks <= 2 * 4
        compiled, loss = layout.run_step()
        assert memory_figures(compiled).peak_estimate_bytes <= budget
        assert np.isfinite(loss), cand.flags()


def test_candidates_try_the_1f1b_schedules():
    """A pipelined layout is tried with GPipe's schedule, 1F1B's (interleaved where the
    micro-batches divide into groups of pipe) and the zero-bubble zb; 1F1B is estimated
    slower (its recomputed forward) with fewer activations kept (one micro-batch's stage,
    not every tick's); zb faster than GPipe (a third of its bubble, nothing recomputed),
    keeping a whole stage's activations of at most p micro-batches. Catches: 1f1b or zb
    never proposed, or proposed where they cannot run (repeats > 1, m not a multiple of
    pipe for interleaved), or ranked as if 1F1B's recompute cost nothing."""
    from jaxmp.plan.search import activation_units

    cands = candidates(8, 4, 16, devices_per_host=8)
    for c in cands:
        if c.shape["pipe"] == 1:
            assert c.schedule == "gpipe"
        elif c.repeats == 1:
            assert c.schedule in ("gpipe", "1f1b", "zb")
        else:
            assert c.schedule in ("circular", "interleaved")
            assert c.schedule == "circular" or c.microbatches % c.shape["pipe"] == 0
    pick = {(format_mesh(c.shape), c.microbatches, c.repeats, c.schedule): c for c in cands
            if c.remat == "none" and c.accum == 1 and not c.gather_once}
    assert ("data:2,pipe:4", 8, 1, "1f1b") in pick
    assert ("data:4,pipe:2", 4, 2, "interleaved") in pick
    gpipe, ofob = pick[("data:2,pipe:4", 8, 1, "gpipe")], pick[("data:2,pipe:4", 8, 1, "1f1b")]
    args = dict(n_params=10**6, model_flops=1e12, num_layers=4, d_model=64, seq_len=64,
                batch=16, itemsize=4, card=H100, dtype="float32")
    assert estimate_s(ofob, **args) > estimate_s(gpipe, **args)
    assert activation_units(ofob, 16, 64, 4) * 4 < activation_units(gpipe, 16, 64, 4)
    zb = pick[("data:2,pipe:4", 8, 1, "zb")]
    assert estimate_s(zb, **args) < estimate_s(gpipe, **args)
    assert (activation_units(ofob, 16, 64, 4) < activation_units(zb, 16, 64, 4)
            < activation_units(gpipe, 16, 64, 4))
    assert "--pipeline_schedule=zb" in zb.flags()
    assert "--pipeline_schedule=1f1b" in ofob.flags() and "pipeline_schedule" not in gpipe.flags()
    assert replace_flat(RunConfig(), **ofob.settings()).layout.pipeline_schedule == "1f1b"


def test_candidates_for_a_batch_no_power_of_two_micro_batches_divide():
    """A batch of 7 on pipe:4 runs with 7 micro-batches: the search tries it (p, 2p, 4p
    do not divide 7); with a batch they divide it keeps to p, 2p, 4p. Catches: "no layout
    fits" for a batch a pipeline runs fine."""
    odd = {(format_mesh(c.shape), c.microbatches) for c in candidates(8, 4, 7, 8)
           if c.shape["pipe"] > 1}
    assert odd == {("pipe:4,tensor:2", 7), ("pipe:2,tensor:4", 7)}
    even = {c.microbatches for c in candidates(8, 4, 16, 8) if c.shape["pipe"] == 4}
    assert even == {4, 8, 16}


def test_plan_counts_the_items_each_schedule_keeps():
    """The plan's "activations per micro-batch tick (x N live)" line: GPipe keeps every
    tick's (r m + p - 1), 1F1B the stage inputs it keeps plus the one it recomputes
    (2p - 1 + 1 at m >= 2p - 1, whatever m), zb the micro-batches whose residuals it keeps
    from F to B (p, whatever m), no pipeline one. Catches: 1F1B's plan
    explained with GPipe's m + p - 1 live micro-batches."""
    from jaxmp.pipeline import PipelineSpec
    from jaxmp.plan.planner import live_items

    assert live_items(PipelineSpec()) == 1
    assert live_items(PipelineSpec(4, 8)) == 11
    assert live_items(PipelineSpec(4, 8, 2)) == 19
    assert live_items(PipelineSpec(4, 8, schedule="1f1b")) == 8
    assert live_items(PipelineSpec(4, 32, schedule="1f1b")) == 8
    assert live_items(PipelineSpec(4, 2, schedule="1f1b")) == 3  # at most m kept
    assert live_items(PipelineSpec(4, 8, schedule="zb")) == 4  # residuals F to B: <= p
    assert live_items(PipelineSpec(4, 32, schedule="zb")) == 4


@pytest.mark.slow
def test_inspect_target_prints_the_memory_verdict_and_time():
    """The entry point: a layout that does not fit says by how much and what is largest;
    the time names compute, the collectives by axis and link, and MFU."""
    proc = run_module("experiments.inspect", "--mesh=data:2,tensor:4", "--num_layers=4",
                      "--target=h100", "--target_memory_gib=0.01", "--gpus_per_host=2")
    out = proc.stdout
    assert "memory and time plan on data:2,tensor:4 x h100 (2 per host" in out
    assert "verdict: does NOT fit" in out and "over by" in out and "(largest: " in out
    assert "gradients" in out and "optimizer state" in out and "activations" in out
    assert "all-reduce         over tensor" in out and "network" in out
    assert "MFU predicted:" in out


def test_target_overrides_and_bad_values():
    """Catches: an override silently ignored; a nonsense value accepted."""
    card = target("a100", 8, memory_gib=2.0, efficiency=0.5, devices_per_host=4)
    assert (card.memory_bytes, card.efficiency, card.devices_per_host) == (2 * GIB, 0.5, 4)
    assert card.peak("bfloat16") == 312e12
    for kw, msg in ((dict(memory_gib=0.0), "target_memory_gib=0.0 must be > 0"),
                    (dict(efficiency=1.5), "efficiency=1.5 must be in (0, 1]"),
                    (dict(devices_per_host=0), "gpus_per_host=0 must be >= 1")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            target("h100", 8, **kw)
    with pytest.raises(ValueError, match="unknown accelerator"):
        target("tpu", 8)
    assert jax.device_count() == 8


def test_candidates_and_estimates_know_the_expert_axis():
    """For a mixture of experts the search tries `expert` sizes dividing the experts (the
    batch's shards split between data and expert), and its estimate counts the experts'
    all-to-all: the same layout with expert:4 instead of data:4 costs more traffic and
    the same compute. Catches: expert meshes never proposed, or proposed for a dense
    model; the all-to-all left out of the estimate."""
    dense = candidates(8, 4, 16, devices_per_host=8)
    assert all("expert" not in c.shape for c in dense)
    moe = candidates(8, 4, 16, devices_per_host=8, num_experts=4)
    experts = {c.shape.get("expert", 1) for c in moe}
    assert experts == {1, 2, 4}  # 8 is not a divisor of 4 experts
    for c in moe:
        assert math.prod(c.shape.values()) == 8
    by_mesh = {(format_mesh(c.shape), c.remat, c.accum): c for c in moe
               if c.remat == "none" and c.accum == 1 and c.shape["pipe"] == 1}
    ep, dp = by_mesh[("expert:4,tensor:2", "none", 1)], by_mesh[("data:4,tensor:2", "none", 1)]
    args = dict(n_params=10**6, model_flops=1e12, num_layers=4, d_model=64, seq_len=32,
                batch=16, itemsize=4, card=H100, dtype="float32", experts_per_token=2)
    assert estimate_s(ep, **args) > estimate_s(dp, **args)
    assert estimate_s(ep, **{**args, "experts_per_token": 4}) > estimate_s(ep, **args)


def test_candidates_and_estimates_know_the_context_axis():
    """For a long sequence the search tries `context` sizes within a host whose 2c chunks
    divide it (none for a short one); the estimate counts the ring's key/value traffic and
    scales the activations a device keeps by 1/c. Catches: context meshes never proposed
    (or proposed at 1k tokens), the ring left out of the estimate, activations not split."""
    from jaxmp.plan.search import activation_units

    assert all("context" not in c.shape for c in candidates(8, 4, 16, 8, seq_len=1024))
    long = candidates(8, 4, 16, devices_per_host=8, seq_len=8192)
    assert {c.shape.get("context", 1) for c in long} == {1, 2, 4, 8}
    assert {c.shape.get("context", 1) for c in candidates(8, 4, 16, 4, seq_len=8192)} == {1, 2, 4}
    assert {c.shape.get("context", 1) for c in candidates(8, 4, 16, 8, seq_len=8 * 1000)} == {
        1, 2, 4, 8}
    assert {c.shape.get("context", 1) for c in candidates(8, 4, 16, 8, seq_len=4100)} == {1, 2}
    by_mesh = {format_mesh(c.shape): c for c in long
               if c.remat == "none" and c.accum == 1 and c.shape["pipe"] == 1}
    cp, dp = by_mesh["context:4,tensor:2"], by_mesh["data:4,tensor:2"]
    args = dict(n_params=10**6, model_flops=1e12, num_layers=4, d_model=64, seq_len=8192,
                batch=16, itemsize=4, card=H100, dtype="float32")
    assert estimate_s(cp, **args) > estimate_s(dp, **args)
    assert activation_units(cp, 16, 8192, 4) == pytest.approx(activation_units(dp, 16, 8192, 4))
    assert activation_units(by_mesh["context:8"], 16, 8192, 4) == pytest.approx(
        activation_units(by_mesh["data:8"], 16, 8192, 4))
