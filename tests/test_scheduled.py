"""The 1F1B and interleaved 1F1B pipeline schedules (jaxmp.scheduled): their tick tables,
parity with one device, bounded activation memory, the same traffic as GPipe."""

from __future__ import annotations

import re

import jax
import pytest
from flax import nnx

from jaxmp import scheduled
from jaxmp.config import RunConfig
from jaxmp.mesh import make_mesh
from jaxmp.models.gpt import GPT, GPTConfig
from jaxmp.models.llama import Llama, LlamaConfig
from jaxmp.pipeline import SCHEDULES, PipelineError, PipelineSpec
from jaxmp.train import Trainer
from tests.helpers import assert_same_grads, assert_same_run, run

TABLES = [(p, m, r) for p in range(2, 6) for m in range(1, 13) for r in (1, 2, 3)
          if r == 1 or m % p == 0]


@pytest.mark.parametrize("p,m,r", TABLES)
def test_tick_table_runs_each_item_once_in_dependency_order(p, m, r):
    """Every (micro-batch, round) runs forward and backward exactly once per stage; a
    forward one tick after the previous virtual stage's (stage 0 of round j after stage p-1
    of round j-1: the ring is exact, no buffer), a backward one tick after the next virtual
    stage's, the last virtual stage's backward in its forward's tick; and the ring buffer
    of `slots` stage inputs, indexed as the executor indexes it, still holds an item's
    input when its backward reads it. An off-by-one in the warm-up, a round taken from the
    wrong end, or a buffer one slot short fails here."""
    grid = scheduled.grid(p, m, r)
    assert len(grid) == scheduled.num_ticks(p, m, r)
    fwd, bwd = {}, {}
    for t, row in enumerate(grid):
        for s, (f, b) in enumerate(row):
            for seen, item in ((fwd, f), (bwd, b)):
                if item is not None:
                    assert (item, s) not in seen, (t, s, item)
                    seen[(item, s)] = t
    items = [(mb, j) for mb in range(m) for j in range(r)]
    assert set(fwd) == set(bwd) == {(i, s) for i in items for s in range(p)}
    for (mb, j) in items:
        for s in range(p):
            if s > 0:
                assert fwd[((mb, j), s)] == fwd[((mb, j), s - 1)] + 1
            elif j > 0:
                assert fwd[((mb, j), 0)] == fwd[((mb, j - 1), p - 1)] + 1
            if s < p - 1:
                assert bwd[((mb, j), s)] == bwd[((mb, j), s + 1)] + 1
            elif j < r - 1:
                assert bwd[((mb, j), p - 1)] == bwd[((mb, j + 1), 0)] + 1
            else:
                assert bwd[((mb, j), p - 1)] == fwd[((mb, j), p - 1)]
    # the ring buffer: slot = forward index % S, written at the forward, read at the backward
    S = scheduled.slots(p, m, r)
    assert S <= min(2 * r * p - 1, r * m)
    for s in range(p):
        held: dict[int, tuple[int, int]] = {}
        for t, row in enumerate(grid):
            f, b = row[s]
            if f is not None:
                held[scheduled.forward_index(*f, p, r) % S] = f
            if b is not None:
                assert held[scheduled.forward_index(*b, p, r) % S] == b, (t, s, b)


@pytest.mark.parametrize("p,m", [(2, 8), (4, 4), (4, 16), (3, 9)])
def test_one_f_one_b_keeps_at_most_2p_minus_1_inputs(p, m):
    """1F1B's stage inputs are bounded by the stages: stage s keeps at most 2(p-s)-1 (the
    lockstep program's round trip), whatever m; GPipe keeps all m."""
    S = scheduled.slots(p, m, 1)
    assert S == min(2 * p - 1, m)
    grid = scheduled.grid(p, m, 1)
    for s in range(p):
        live = peak = 0
        for row in grid:
            f, b = row[s]
            live += f is not None
            peak = max(peak, live)
            live -= b is not None
        assert peak == min(2 * (p - s) - 1, m)


def test_format_grid_names_the_bubble():
    text = scheduled.format_grid(2, 2, 1)
    lines = text.splitlines()
    assert lines[1].split()[2:] == ["F0", "F1", "B0", "B1"]
    assert lines[2].split()[2:] == [".", "F0B0", "F1B1", "."]
    assert "bubble (p-1)/(r*m+p-1) = 0.333" in text and "stage inputs kept: 2" in text


# ---------------------------------------------------------------- the train step
LLAMA = LlamaConfig(num_layers=8, d_model=32, num_heads=4, num_kv_heads=2, seq_len=16,
                    vocab_size=256, mlp_dim=64)


@pytest.mark.parametrize("mesh,p,m,r,schedule,model,remat", [
    ("data:2,pipe:2,tensor:2", 2, 4, 2, "interleaved", GPT, None),  # quick: data x tensor x rounds
    *(pytest.param(*x, marks=pytest.mark.slow) for x in [
        ("data:2,pipe:4", 4, 8, 1, "1f1b", GPT, "block"),
        ("fsdp:2,pipe:4", 4, 8, 1, "1f1b", Llama, None),
    ])])
def test_schedule_trains_like_one_device(mesh, p, m, r, schedule, model, remat):
    """3 AdamW steps through the entry point's layout path: losses and gradient norms
    rtol 1e-5, parameters rtol 1e-4 of one device's (without remat). A backward that reads
    another micro-batch's kept input, a weight gradient dropped in warm-up or cool-down, a
    round's gradient added to the wrong layer group, a loss counted twice, or a remat
    policy that changes the recomputed stage fails here."""
    kw = {} if model is GPT else {"model": Llama, "cfg": LLAMA}
    assert_same_run(run(mesh, p, m, r, schedule=schedule, remat=remat, **kw),
                    run("single", **kw))


@pytest.mark.slow
def test_schedule_gradients_and_eval_with_accumulation():
    """Gradients of one batch in 2 accumulation parts on pipe:2,tensor:4 with 1f1b (built
    through the entry point's layout path) equal one device's; the evaluation loss
    (forward only: the model in eval mode skips the schedule's backward pass) equals the
    loss."""
    assert_same_grads("pipe:2,tensor:4", PipelineSpec(2, 4, 1, schedule="1f1b"), accum=2)


# (Temporaries flat in m, GPipe's traffic, the stage rings over pipe: the structure
# bench's schedule rows, asserted in tests/test_bench.py::test_structure_quick_run.)


def test_schedule_flag_reaches_the_pipeline_and_bad_combinations_fail():
    """--pipeline_schedule goes through jaxmp.run.layout into the PipelineSpec; each
    combination that cannot run fails with one line naming the fix, before compute."""
    from jaxmp import run as experiment
    from jaxmp.models import registry

    def layout(**kw):
        cfg = RunConfig.flat(batch_size=16, **kw)
        cfg.validate()
        return experiment.layout(cfg, registry.get("gpt"), GPTConfig(num_layers=8))[1]

    assert layout(mesh="data:2,pipe:4", pipeline_schedule="1f1b").drives_backward
    assert layout(mesh="data:2,pipe:4", microbatches=4, pipeline_repeats=2,
                  pipeline_schedule="interleaved").schedule == "interleaved"
    bad = [(dict(mesh="data:8", pipeline_schedule="1f1b"), "has no pipe axis"),
           (dict(mesh="data:2,pipe:4", pipeline_schedule="interleaved"), "--pipeline_repeats >= 2"),
           (dict(mesh="data:2,pipe:4", pipeline_repeats=2, pipeline_schedule="1f1b"),
            "use --pipeline_schedule=interleaved"),
           (dict(mesh="data:2,pipe:4", microbatches=2, pipeline_repeats=2,
                 pipeline_schedule="interleaved"), "divisible by 4"),
           (dict(mesh="data:2,pipe:4", pipeline_schedule="circular"), "--pipeline_repeats >= 2"),
           (dict(mesh="data:2,pipe:4", pipeline_repeats=2, pipeline_schedule="zb"),
            "use --pipeline_schedule=interleaved"),
           (dict(mesh="context:2,pipe:2,data:2", pipeline_schedule="zb"),
            "--context_attention=allgather")]
    for kw, words in bad:
        with pytest.raises((PipelineError, ValueError), match=re.escape(words)) as err:
            layout(**kw)
        assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="choose one of"):
        PipelineSpec(2, 2, 1, schedule="zbv").validate(8)
    choices = RunConfig.__dataclass_fields__["layout"].default_factory.__dataclass_fields__
    assert tuple(choices["pipeline_schedule"].metadata["choices"]) == SCHEDULES


def test_a_loss_outside_the_schedule_is_refused():
    """A family whose loss calls the model (LayerStack.apply) instead of
    jaxmp.scheduled.stack_loss cannot run 1f1b: under the gradient that would silently be
    GPipe; it fails with one line naming the fix (evaluation, forward only, still runs)."""
    from jaxmp.models.decoder import next_token_loss

    cfg = GPTConfig(num_layers=4, d_model=32, num_heads=4, seq_len=16, vocab_size=128)
    loss = lambda model, b: next_token_loss(model(b["tokens"][:, :-1]), b["tokens"][:, 1:])
    tr = Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0),
                             pipeline=PipelineSpec(4, 4, schedule="1f1b")),
                 loss, make_mesh("data:2,pipe:4"))
    batch = {"tokens": jax.ShapeDtypeStruct((8, 17), "int32")}
    with pytest.raises(PipelineError, match="jaxmp.scheduled.stack_loss") as err:
        tr.lower(batch)
    assert "\n" not in str(err.value)
    tr.compiled_eval(batch).lower(tr.abstract_state().params, batch)  # traces
