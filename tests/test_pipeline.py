"""Pipeline schedule (pure) and the pipelined train step against one device."""

import re

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import BATCH, CFG, OPT, assert_same_grads, assert_same_run, batches, run, trainer

from jaxmp.mesh import make_mesh
from jaxmp.models import mlp
from jaxmp.models.gpt import GPTConfig
from jaxmp.pipeline import (
    PipelineError,
    PipelineSpec,
    arrival,
    bubble_factor,
    bubble_fraction,
    is_active,
    microbatch,
    num_ticks,
    read_slot,
    schedule,
    storage_order,
)
from jaxmp.train import Trainer

GRID = [(p, m, r) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 8) for r in (1, 2, 3)
        if not (r > 1 and m < p)]


@pytest.mark.parametrize("p,m,r", GRID)
def test_schedule_processes_every_item_once_in_order(p, m, r):
    grid = schedule(p, m, r)
    assert len(grid) == num_ticks(p, m, r) == r * m + p - 1
    seen = {}
    for t, row in enumerate(grid):
        for s, cell in enumerate(row):
            if cell is not None:
                assert cell not in seen, f"{cell} twice"
                seen[cell] = (t, s)
                assert cell[1] % p == s  # group g = j*p + s lives on stage s
    assert set(seen) == {(b, g) for b in range(m) for g in range(p * r)}
    for b in range(m):  # each micro-batch visits groups 0, 1, ... in increasing ticks
        ticks = [seen[(b, g)][0] for g in range(p * r)]
        assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)
    idle = sum(cell is None for row in grid for cell in row)
    assert idle / (p * len(grid)) == pytest.approx(bubble_fraction(p, m, r))


@pytest.mark.parametrize("p,m,r", GRID)
def test_buffer_dataflow_feeds_stage0_the_right_input(p, m, r):
    """Replays the implementation's buffer moves symbolically with the same functions."""
    buf = [("input", b) for b in range(m)]
    out = [None] * p  # what each stage produced at the previous tick
    for t in range(num_ticks(p, m, r) + 1):
        shifted = [out[-1]] + out[:-1]
        valid, slot = arrival(t, p, m, r)
        if valid:
            buf[slot] = shifted[0]
        if t == num_ticks(p, m, r):
            break
        new = [None] * p
        for s in range(p):
            if not is_active(t, s, p, m, r):
                continue
            b, j = microbatch(t, s, m), (t - s) // m
            g = j * p + s
            src = buf[read_slot(t, m)] if s == 0 else shifted[s]
            want = ("input", b) if g == 0 else ("out", b, g - 1)
            assert src == want, f"tick {t} stage {s}: got {src}, needs {want}"
            new[s] = ("out", b, g)
        out = new
    assert buf == [("out", b, p * r - 1) for b in range(m)]  # finished outputs, in order


def test_bubble_formulas():
    assert bubble_fraction(4, 4, 1) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 4, 2) == pytest.approx(3 / 11)
    assert bubble_factor(4, 8, 2) == pytest.approx(19 / 16)
    assert bubble_fraction(1, 5, 1) == 0.0


def test_storage_order_is_stage_major():
    assert storage_order(8, 2, 2) == [0, 1, 4, 5, 2, 3, 6, 7]
    assert storage_order(8, 4, 1) == list(range(8))
    assert sorted(storage_order(24, 4, 3)) == list(range(24))


# Per mesh: many micro-batches and the circular schedule, one micro-batch on two meshes
# (the schedule itself is checked for every p, m, r above; 20 layouts here cost CI three
# minutes more, and the suite's 30 minutes now hold five more kinds of parallelism).
# (pipe:4,tensor:2 m=8 r=1, data:2,pipe:2,tensor:2 m=2 r=2 and fsdp:2,pipe:2,tensor:2
# m=1 left for the suite's time: the same meshes with another m or r run here, and the
# 1F1B tests of tests/test_scheduled.py run pipe:4 with m=8.)
LAYOUTS = (
    [("pipe:8", 8, 1, 1, 8)]
    + [("pipe:4,tensor:2", 4, 4, 2, 8)]
    + [("data:2,pipe:2,tensor:2", 2, 8, 2, 8)]
    + [("fsdp:2,pipe:2,tensor:2", 2, 2, 2, 8)]
)
# -m "not slow": FSDP x the circular pipe x tensor with sequence parallelism, m, p and r
# all different (an index that confuses micro-batches, stages and rounds cannot pass by
# symmetry; the quick gradient test below adds unequal axis sizes).
QUICK = ("fsdp:2,pipe:2,tensor:2", 2, 8, 4, 8, True)
LAYOUTS = [QUICK] + [pytest.param(*x, False, marks=pytest.mark.slow)
                     for x in LAYOUTS + [("fsdp:2,pipe:4", 4, 8, 2, 8)]]


@pytest.mark.parametrize("mesh,p,m,r,layers,sp", LAYOUTS)
def test_pipelined_training_matches_single_device(mesh, p, m, r, layers, sp):
    """Losses, gradient norms and parameters after 3 steps equal one device's: a wrong
    buffer slot, round, stage shift or micro-batch row order fails here, and (sp) a
    sequence split inside the pipeline's stages that drops or double-counts rows."""
    assert_same_run(run(mesh, p, m, r, layers, sequence_parallel=sp),
                    run("single", layers=layers))


@pytest.mark.parametrize("mesh,p,m,r,accum", [
    ("pipe:2,tensor:4", 2, 8, 4, 2),  # quick: m != p != r, with 2 accumulation parts
    *(pytest.param(*x, marks=pytest.mark.slow) for x in [
        ("pipe:4,tensor:2", 4, 4, 2, 1), ("data:2,pipe:2,tensor:2", 2, 2, 1, 1)])])
def test_pipelined_gradients_match(mesh, p, m, r, accum):
    """Gradients and the evaluation loss of a pipelined layout (with gradient accumulation
    where accum > 1) equal one device's whole-batch ones: accumulation parts that are
    summed, not averaged, in the step or in evaluation, or a micro-batch split of a part
    that drops rows fails here."""
    worst = assert_same_grads(mesh, PipelineSpec(p, m, r), accum)
    print(f"{mesh} m={m} r={r} accum={accum}: largest gradient difference {worst:.1e} of the tensor's max")


def _collectives(tr: Trainer) -> tuple[str, dict]:
    text = tr.lower(batches(1)[0]).compile().as_text()
    ops = re.findall(r"= (\S+) (all-reduce|all-gather|collective-permute|reduce-scatter|"
                     r"all-to-all)(?:-start)?\(", text)
    return text, ops


@pytest.mark.slow
def test_pipe4_compiles_to_collective_permutes_without_gathering_stage_weights():
    tr = trainer("pipe:4,tensor:2", PipelineSpec(4, 4, 2))
    _, ops = _collectives(tr)
    kinds = {k for _, k in ops}
    assert "collective-permute" in kinds
    stacked = {tuple(r.shape) for r in tr.plan().rows if r.path.startswith("blocks/")}
    for shape, kind in ops:
        if kind == "all-gather":
            dims = tuple(int(d) for d in re.findall(r"\d+", shape.split("{")[0].split("[")[1]))
            assert dims not in stacked, f"all-gather materializes stacked weights {dims}"
            assert not (dims and dims[0] == CFG.num_layers), shape


@pytest.mark.slow
def test_pipe8_parameter_bytes_per_device_near_ideal():
    tr = trainer("pipe:8", PipelineSpec(8, 8, 1))
    p = tr.plan()
    ideal = p.total_bytes / 8
    blocks = sum(r.bytes_total for r in p.rows if r.path.startswith("blocks/"))
    blocks_dev = sum(r.bytes_per_device for r in p.rows if r.path.startswith("blocks/"))
    assert blocks_dev == blocks // 8  # each stage holds only its own layers
    print(f"pipe:8 params per device {p.bytes_per_device} vs ideal {ideal:.0f}: "
          f"{p.bytes_per_device / ideal:.4f}")
    assert p.bytes_per_device <= 1.10 * ideal
    args = tr.lower(batches(1)[0]).compile().memory_analysis().argument_size_in_bytes
    assert args <= 1.10 * 3 * ideal + batches(1)[0]["tokens"].nbytes + 64


# ---------------------------------------------------------------- the book's MLP
def _mlp_run(mesh: str, p: int, m: int, layers: int) -> tuple[list[float], dict, list[float]]:
    cfg = mlp.MLPConfig(num_layers=layers, hidden_dim=64)
    pipe = PipelineSpec(p, m, 1)
    devices = jax.devices()[:1] if mesh == "" else None
    tr = Trainer(lambda: mlp.LayerwiseMLP(cfg, rngs=nnx.Rngs(0), pipeline=pipe),
                 mlp.classification_loss, make_mesh(mesh, devices=devices), optimizer=OPT)
    state, losses, norms = tr.init_state(), [], []
    for step in range(3):
        b = mlp.synthetic_batch(cfg, 0, step, np.arange(BATCH))
        state, metrics = tr.step(state, tr.put_batch(b))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    params = jax.device_get(state.params)
    order = np.argsort(storage_order(layers, p, 1))
    params["hidden"] = jax.tree_util.tree_map(lambda a: a[order], params["hidden"])
    return losses, params, norms


@pytest.mark.slow
@pytest.mark.parametrize("mesh,p,layers", [("pipe:2,data:4", 2, 4), ("pipe:4,tensor:2", 4, 8)])
def test_mlp_pipelined_matches_single_device(mesh, p, layers):
    assert_same_run(_mlp_run(mesh, p, 2, layers), _mlp_run("", 1, 1, layers))


# ---------------------------------------------------------------- validation
def test_validation_errors():
    with pytest.raises(PipelineError, match=r"8 decoder layers cannot be split into pipe\(4\) x "
                                            r"pipeline_repeats\(3\) = 12 equal groups"):
        PipelineSpec(4, 4, 3).validate(8)
    with pytest.raises(PipelineError, match=r"needs microbatches >= pipe size \(2 < 4\)"):
        PipelineSpec(4, 2, 2).validate(8)
    with pytest.raises(PipelineError, match=r"batch per data shard \(6\) is not divisible by "
                                            r"microbatches=4"):
        PipelineSpec(2, 4, 1).validate(8, batch_per_shard=6)
    with pytest.raises(PipelineError, match="3 hidden layers cannot be split"):
        mlp.LayerwiseMLP(mlp.MLPConfig(num_layers=3), rngs=nnx.Rngs(0),
                         pipeline=PipelineSpec(2, 2, 1))
    assert GPTConfig(num_layers=8).num_layers == 8
