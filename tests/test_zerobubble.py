"""The zero-bubble schedule ZB-H1 (jaxmp.zerobubble, jaxmp.wgrad): its per-device tables,
the backward pass split at the weight GEMMs, parity with one device, the compiled
program's per-device switch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmp import wgrad, zerobubble
from jaxmp.layers import Dense
from jaxmp.models.llama import Llama
from jaxmp.pipeline import PipelineError, PipelineSpec
from jaxmp.plan import analysis
from tests.helpers import assert_same_grads, assert_same_run, layout_trainer, run

Z = zerobubble


# ---------------------------------------------------------------- the tables
@pytest.mark.parametrize("p,m", [(p, m) for p in range(2, 6) for m in range(1, 11)])
def test_tables_run_each_operation_once_after_what_it_needs(p, m):
    """Every (micro-batch, stage) runs F, B and W exactly once: F after the previous
    stage's F, B after the next stage's B (the last stage's after its own F), W after its
    B, each in a later slot (a result crosses to the neighbour between slots); the arrival
    tables name exactly what the neighbour sent; and each ring, indexed as the executor
    indexes it (micro-batch mod its size), still holds an item when it is read. A W run
    before its B, an arrival written to the wrong stage, a ring one slot short or the stem
    / tail on the wrong stage fails here."""
    tab = Z.tables(p, m)
    op, mb = tab["op"], tab["mb"]
    when: dict[tuple[str, int, int], int] = {}
    for t in range(op.shape[0]):
        for s in range(p):
            kind = {Z.F: "F", Z.F_FIRST: "F", Z.F_LAST: "F", Z.B: "B", Z.B_FIRST: "B",
                    Z.W: "W"}.get(int(op[t, s]))
            if kind is None:
                continue
            assert (kind, int(mb[t, s]), s) not in when
            when[(kind, int(mb[t, s]), s)] = t
            if kind == "F":
                assert op[t, s] == (Z.F_FIRST if s == 0 else Z.F_LAST if s == p - 1 else Z.F)
            if kind == "B":
                assert op[t, s] == (Z.B_FIRST if s == 0 else Z.B)
    assert set(when) == {(k, i, s) for k in "FBW" for i in range(m) for s in range(p)}
    for i in range(m):
        for s in range(p):
            if s > 0:
                assert when[("F", i, s)] > when[("F", i, s - 1)]
            assert when[("B", i, s)] > (when[("B", i, s + 1)] if s < p - 1 else when[("F", i, s)])
            assert when[("W", i, s)] > when[("B", i, s)]
    for t in range(op.shape[0]):
        for s in range(p):
            sent_f = s > 0 and op[t, s - 1] in (Z.F, Z.F_FIRST)
            assert tab["from_prev"][t, s] == (mb[t, s - 1] if sent_f else -1)
            sent_b = s < p - 1 and op[t, s + 1] == Z.B
            assert tab["from_next"][t, s] == (mb[t, s + 1] if sent_b else -1)
    # the rings, replayed: written where the executor writes, read where it reads
    for s in range(p):
        rings = {k: {} for k in ("x", "g", "res", "taps")}

        def write(k, i, s=s, rings=rings):
            rings[k][i % tab[k]] = i

        def read(k, i, t, s=s, rings=rings):
            assert rings[k].get(i % tab[k]) == i, (p, m, s, t, k, i)

        for t in range(op.shape[0]):
            o, i = int(op[t, s]), int(mb[t, s])
            if o in (Z.F, Z.F_LAST):
                read("x", i, t)
            if o in (Z.B, Z.B_FIRST):
                read("g", i, t)
                read("res", i, t)
                write("taps", i)
            if o == Z.W:
                read("taps", i, t)
            if o in (Z.F, Z.F_FIRST, Z.F_LAST):
                write("res", i)
            if o == Z.F_LAST:
                write("g", i)
            if tab["from_prev"][t, s] >= 0:
                write("x", int(tab["from_prev"][t, s]))
            if tab["from_next"][t, s] >= 0:
                write("g", int(tab["from_next"][t, s]))
    # live stage activations (residuals + GEMM pairs, F to W) stay at 1F1B's bound
    assert tab["res"] <= p and tab["taps"] <= p


# ---------------------------------------------------------------- the split backward pass
class _TwoLayers(nnx.Module):
    def __init__(self, dtype):
        self.a = Dense((8,), (3, 4), ("embed",), (None, "mlp"), rngs=nnx.Rngs(0), dtype=dtype)
        self.b = Dense((3, 4), (8,), (None, "mlp"), ("embed",), rngs=nnx.Rngs(1), dtype=dtype)


def _two_layers(dtype):
    gd, params = nnx.split(_TwoLayers(dtype))
    params = nnx.to_pure_dict(params)

    def f(w, x):
        model = nnx.merge(gd, w)
        return model.b(jnp.tanh(model.a(x))).astype(jnp.float32)
    return f, params


def _dots(jaxpr) -> int:
    """dot_general equations in a jaxpr and every jaxpr nested in its equations."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _dots(inner)
    return n


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_backward_gives_input_gradient_and_gemm_pairs_without_weight_gemms(dtype):
    """B (a VJP through the taps) returns the input gradient and every GEMM's (input,
    output gradient), gives the GEMM weights no gradient, and holds one dot per GEMM (the
    input gradient: no weight GEMM); W (x^T g from those pairs, through the parameter's
    cast) gives each weight the plain VJP's gradient. A B that also computes dW, a tap
    cotangent that is not the GEMM's input or output gradient, or a W that misses the
    cast fails here (float32 and bfloat16 compute)."""
    f, params = _two_layers(dtype)
    x = jax.random.normal(jax.random.key(0), (5, 8), jnp.float32)
    g = jax.random.normal(jax.random.key(1), (5, 8), jnp.float32)
    y_ref, vjp_ref = jax.vjp(f, params, x)
    dw_ref, dx_ref = vjp_ref(g)

    def probe(w, x):
        with wgrad.record() as rec:
            f(w, x)
        leaves = jax.tree_util.tree_leaves(w)
        return [(gm, next(i for i, leaf in enumerate(leaves) if leaf is gm.weight))
                for gm in rec.gemms]

    found = []
    jax.eval_shape(lambda w, x: found.extend(probe(w, x)) or x, params, x)
    gemms = [gm for gm, _ in found]
    assert len(gemms) == 2
    taps = [(jnp.zeros(gm.x.shape, gm.x.dtype), jnp.zeros(gm.y.shape, gm.y.dtype))
            for gm in gemms]

    def split(w, x, taps):
        with wgrad.split(taps):
            return f(w, x)

    y, vjp = jax.vjp(split, params, x, taps)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    dw, dx, dtaps = vjp(g)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), **tol)
    weights = {j for _, j in found}
    for j, (leaf, ref) in enumerate(zip(jax.tree_util.tree_leaves(dw),
                                        jax.tree_util.tree_leaves(dw_ref))):
        if j in weights:  # a GEMM weight: none from B
            assert not np.any(np.asarray(leaf))
        else:  # a bias: B's, equal to the plain VJP's
            np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), **tol)
    # W: x^T g per GEMM from B's pairs equals the plain gradient of each weight
    leaves_ref = jax.tree_util.tree_leaves(dw_ref)
    leaves = jax.tree_util.tree_leaves(params)
    for (gm, j), (xs, gs) in zip(found, dtaps):
        got = wgrad.weight_grad(gm, leaves[j], xs, gs)
        assert got.dtype == leaves[j].dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(leaves_ref[j]), **tol)
    # B's program: one dot per GEMM (the input gradient); the plain VJP has two per GEMM
    b_prog = jax.make_jaxpr(vjp)(g).jaxpr
    plain_prog = jax.make_jaxpr(vjp_ref)(g).jaxpr
    assert _dots(b_prog) == 2 and _dots(plain_prog) == 4


def test_a_fused_weight_is_refused_with_one_line():
    """A layer that hands a GEMM a weight that is not one of its parameters (concatenated,
    reshaped) cannot have its weight gradient deferred: one line naming the fix."""
    stack = type("S", (), {"pipeline": PipelineSpec(2, 2, schedule="zb"), "num_layers": 2,
                           "remat": "none"})()

    def layer(w, h):
        return wgrad.dot(h, jnp.concatenate([w["a"], w["a"]], axis=1), (((1,), (0,)), ((), ())),
                         jnp.float32)[:, :4]
    run_ = Z.ZeroBubble(stack, (None, None), {"a": ("layers", None, None)}, {},
                        stem=None, layer=layer, tail=None, total=1)
    with pytest.raises(PipelineError, match="--pipeline_schedule=1f1b") as err:
        run_._gemms({"a": jnp.ones((4, 4))}, jax.ShapeDtypeStruct((2, 4), jnp.float32))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the train step
@functools.cache
def _quick_trainer():
    return layout_trainer("data:2,pipe:2,tensor:2", 2, 4, 1, pipeline_schedule="zb")[0]


def test_zb_trains_like_one_device_quick():
    """3 AdamW steps of GPT on data:2,pipe:2,tensor:2 with 4 micro-batches through the
    entry point's layout path: losses and gradient norms rtol 1e-5, parameters rtol 1e-4
    of one device's. A residual stored in another micro-batch's slot, a deferred weight
    gradient dropped or added twice, an input gradient sent to the wrong stage or the
    tail's loss counted on two stages fails here."""
    assert_same_run(run("data:2,pipe:2,tensor:2", 2, 4, schedule="zb"), run("single"))


def test_the_step_switches_per_device_and_moves_activations_only_over_pipe():
    """The compiled step holds the per-device switch (a conditional of 7 branches: idle,
    F, F with the stem, F with the tail, B, B with the stem, W) inside the slot loop, and
    its collective-permutes are over pipe; the W branch does less work than B (it holds
    only the weight GEMMs), and idle none. A lockstep fallback (every branch computed and
    masked), or W recomputing the input-gradient chain, fails here."""
    tr = _quick_trainer()
    batch = {"tokens": jax.ShapeDtypeStruct((16, 17), jnp.int32)}
    text = tr.lower(batch).compile().as_text()
    flops = analysis.branch_flops(text)
    assert len(flops) == 7
    assert flops[Z.IDLE] == 0
    assert 0 < flops[Z.W] < flops[Z.B] and flops[Z.F] < flops[Z.F_LAST]
    # the critical path (each slot's slowest branch) is what the planner and bench count:
    # less than the analysis's every-branch-every-slot upper bound, its bubble between the
    # analytic (F = B = W) one and 1F1B's
    total = analysis.hlo_flops(text).flops
    step = Z.step_flops(text, total, 2, 4)
    assert step["flops"] < total / 2
    assert (2 - 1) / (3 * 4 + 2 - 1) < step["bubble"] < (2 - 1) / (4 + 2 - 1)
    mesh = tr.mesh
    permutes = [key for key in analysis.collectives(text, dict(mesh.shape))
                if key.op == "collective-permute" and key.in_loop]
    assert permutes and all(key.axes == "pipe" for key in permutes), permutes


@pytest.mark.slow
@pytest.mark.parametrize("mesh,p,m,model,remat", [
    ("fsdp:2,pipe:4", 4, 8, "llama", None),
    ("data:2,pipe:4", 4, 8, "gpt", "dots"),
    ("pipe:2,tensor:2,data:2", 2, 4, "llama", "block"),
])
def test_zb_trains_like_one_device(mesh, p, m, model, remat):
    """As the quick test, on the issue's layouts with Llama (fused q/k/v and gate/up run
    as separate GEMMs under the split) and with remat (F keeps what the policy saves, B
    recomputes the rest)."""
    from tests.test_scheduled import LLAMA
    kw = {} if model == "gpt" else {"model": Llama, "cfg": LLAMA}
    # Llama on fsdp:2,pipe:4 sums the head's weight gradient over 16 one-row micro-batches
    # where one device sums it over all 16 rows at once; Adam (eps 1e-6) turns that order
    # into parameter differences up to 1.08x the default 1e-6 bound on one element of
    # 8192 after 3 steps (0.70x with --nofused_loss; losses equal, grad norms within 1e-5)
    atol = 2e-6 if mesh == "fsdp:2,pipe:4" else 1e-6
    assert_same_run(run(mesh, p, m, schedule="zb", remat=remat, **kw), run("single", **kw),
                    param_atol=atol)


@pytest.mark.slow
def test_zb_gradients_with_accumulation_and_eval():
    """One batch's gradients in 2 accumulation parts on data:2,pipe:2,tensor:2 with zb
    equal one device's (rtol 1e-5); the evaluation loss (forward only) equals the loss.
    Catches the accumulation's data-replica vmap wrapped around zb's own (a compile error
    once)."""
    assert_same_grads("data:2,pipe:2,tensor:2", PipelineSpec(2, 4, 1, schedule="zb"), accum=2)
