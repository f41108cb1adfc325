"""An independent numpy reference for the optimizer maths (float64 reference, float32 library).

The equivalence tests compare layouts against a single device, and both sides share
jaxmp's optimizer; here the learning-rate schedule, global-norm clipping, AdamW and the
weight-decay mask are written out in plain numpy (no optax) and the library is checked
against them. The gradients come from the library's model and loss, so only the update
rule is under test. Also: remat changes the compiled program but not the gradients.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import CFG, batches, trainer

from jaxmp.mesh import make_mesh
from jaxmp.models.gpt import GPT, lm_loss
from jaxmp.train import OptConfig, Trainer

# ---------------------------------------------------------------- numpy reference


def ref_lr(step: int, opt: OptConfig) -> float:
    """Linear warm-up from 0 to the peak over `warmup_steps` (0 at step 0, the peak at step
    `warmup_steps`), then a half cosine down to peak * min_lr_ratio at `total_steps`, flat
    after that. The warm-up is capped at total_steps - 1 (so the peak is always reached
    and the decay lasts at least one step); total_steps < 1 acts as 1."""
    peak, end = opt.learning_rate, opt.learning_rate * opt.min_lr_ratio
    warm = max(0, min(opt.warmup_steps, opt.total_steps - 1))
    total = max(opt.total_steps, warm + 1)
    if step < warm:
        return peak * step / warm
    frac = min(step - warm, total - warm) / (total - warm)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def flat(tree) -> dict[str, np.ndarray]:
    """{'blocks/attn/qkv/kernel': float64 array, ...} of a nested dict of arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {"/".join(str(k.key) for k in path): np.asarray(x, np.float64) for path, x in leaves}


# What GPT-2-style AdamW decays: the matrices (attention and MLP kernels, the tied token
# embedding, the position embedding). Not decayed: every bias and LayerNorm scale / bias
# (the stacked ones carry a leading layers axis, so they are 2-D or more).
DECAYED = {"wte/embedding", "wpe", "blocks/attn/qkv/kernel", "blocks/attn/out/kernel",
           "blocks/mlp/fc/kernel", "blocks/mlp/proj/kernel"}
NOT_DECAYED = {"blocks/attn/qkv/bias", "blocks/attn/out/bias", "blocks/mlp/fc/bias",
               "blocks/mlp/proj/bias", "blocks/ln1/scale", "blocks/ln1/bias",
               "blocks/ln2/scale", "blocks/ln2/bias", "ln_f/scale", "ln_f/bias"}
QKV_BIAS = "blocks/attn/qkv/bias"  # (layers, 3, heads, kv): a bias with 3 dimensions


def ref_adamw(params0: dict, grads: list[dict], opt: OptConfig, decayed: set[str]) -> list[dict]:
    """Parameters after each step: clip the gradients to global norm `clip_norm`, Adam
    moments with bias correction, eps added outside the square root, decoupled weight decay
    (lr * wd * p) on `decayed` only, learning rate ref_lr(step) with steps counted from 0."""
    p = dict(params0)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for step, g in enumerate(grads):
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        scale = opt.clip_norm / max(norm, opt.clip_norm)
        lr, t = ref_lr(step, opt), step + 1
        new = {}
        for k in p:
            gc = g[k] * scale
            m[k] = opt.b1 * m[k] + (1 - opt.b1) * gc
            v[k] = opt.b2 * v[k] + (1 - opt.b2) * gc * gc
            mhat, vhat = m[k] / (1 - opt.b1 ** t), v[k] / (1 - opt.b2 ** t)
            update = mhat / (np.sqrt(vhat) + opt.eps)
            if k in decayed:
                update = update + opt.weight_decay * p[k]
            new[k] = p[k] - lr * update
        p = new
        out.append(p)
    return out


# ---------------------------------------------------------------- shared compiled objects

# Every feature on: warm-up then cosine (steps 0..6 cover warm-up, the peak, the decay, the
# end and beyond), weight decay, clipping that triggers on the first steps only (the grad
# norm starts at ~1.75 and falls to ~0.4), b1 / b2 / eps unlike both OptConfig's and
# optax's defaults so a dropped argument shows.
OPT = OptConfig(learning_rate=1e-2, warmup_steps=2, total_steps=5, weight_decay=0.1,
                clip_norm=1.0, b1=0.85, b2=0.9, eps=1e-7, min_lr_ratio=0.2)
STEPS = 7


def _grad_fn(cfg):
    """jit(params, batch) -> (loss, grads) of the library's GPT and lm_loss."""
    tr = trainer("single", cfg=cfg)
    return jax.jit(jax.value_and_grad(lambda p, b: lm_loss(tr.model(p), b)))


@pytest.fixture(scope="module")
def remat_runs():
    """Per remat policy: (lowered StableHLO text, compiled memory analysis, loss, grads) of
    one value_and_grad at the same parameters and batch."""
    batch = batches(1)[0]
    params = None
    out = {}
    for policy in ("none", "block", "dots"):
        cfg = dataclasses.replace(CFG, remat=policy)
        if params is None:
            params = jax.device_get(trainer("single", cfg=cfg).init_state().params)
        lowered = _grad_fn(cfg).lower(params, batch)
        compiled = lowered.compile()
        loss, grads = compiled(params, batch)
        out[policy] = (lowered.as_text(), compiled.memory_analysis(), float(loss), flat(grads),
                       compiled)
    return out


@pytest.fixture(scope="module")
def adam_run(remat_runs):
    """STEPS Trainer steps with OPT on one device. Returns the initial parameters, per step
    the gradients (the library's, at the library's parameters), the metrics and the
    parameters after the step."""
    tr = trainer("single", opt=OPT)
    grad_fn = remat_runs["none"][4]  # compiled value_and_grad of the same model and loss
    state = tr.init_state()
    params0 = flat(state.params)
    grads, metrics, params = [], [], []
    for i, b in enumerate(batches(STEPS)):
        batch = tr.put_batch(b)
        if i == 0:  # the compiled gradient is the one Trainer.grads (and the step) uses
            loss, g = tr.grads(state.params, batch)
            ref_loss, ref_g = grad_fn(jax.device_get(state.params), b)
            assert float(loss) == float(ref_loss)
            for k, x in flat(g).items():
                np.testing.assert_array_equal(x, flat(ref_g)[k], err_msg=k)
        grads.append(flat(grad_fn(jax.device_get(state.params), b)[1]))
        state, m = tr.step(state, batch)
        metrics.append({k: np.asarray(v) for k, v in jax.device_get(m).items()})
        params.append(flat(state.params))
        assert int(state.step) == i + 1
    return params0, grads, metrics, params


# ---------------------------------------------------------------- schedule


def test_reference_schedule_anchor_values():
    """Pins the reference itself to hand-computed values (warm-up 2, total 6, peak 1, floor
    0.1), so a wrong reference cannot agree with a wrong library: 0 at step 0, linear to the
    peak at step 2, cosine midpoint (peak + floor) / 2 at step 4, the floor from step 6 on."""
    opt = OptConfig(learning_rate=1.0, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    want = [0.0, 0.5, 1.0, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.55, 0.1 + 0.45 * (1 - math.sqrt(0.5)),
            0.1, 0.1, 0.1]
    np.testing.assert_allclose([ref_lr(s, opt) for s in range(9)], want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("warmup,total", [(2, 5), (0, 5), (1, 5), (3, 10), (4, 5), (5, 5),
                                          (10, 5), (0, 1), (3, 1), (2, 0), (100, 1000)])
def test_schedule_matches_reference(warmup, total):
    """OptConfig.schedule() against the numpy schedule over warm-up, the peak, the decay, the
    end and far beyond it. Catches: warm-up off by one step, decay length counted from step 0
    instead of from the end of warm-up, no min_lr floor (decay to 0), cosine rising again
    after total_steps, warm-up >= total_steps never reaching the peak or dividing by zero."""
    opt = OptConfig(learning_rate=3e-3, warmup_steps=warmup, total_steps=total, min_lr_ratio=0.1)
    steps = list(range(0, max(total, warmup) + 4)) + [2 * total + 7, 10 * total + 3, 10 ** 6]
    got = np.asarray(opt.schedule()(jnp.asarray(steps, jnp.int32)), np.float64)
    want = [ref_lr(s, opt) for s in steps]
    # float32 arithmetic: up to ~6e-7 relative seen (a few ulps); a step off moves the
    # warm-up values by 1 / warmup_steps and mid-decay ones by ~1e-3
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    assert got.max() == pytest.approx(opt.learning_rate, rel=1e-6)  # the peak is reached


def test_learning_rate_metric_matches_reference(adam_run):
    """The `learning_rate` metric of steps 0..6 (warm-up 2, total 5) is the rate that step
    used: 0, peak / 2, peak, cosine, ..., the floor at and after total_steps. Catches a
    metric reporting the next step's rate (state.step + 1) or a warm-up off by one."""
    _, _, metrics, _ = adam_run
    got = [float(m["learning_rate"]) for m in metrics]
    want = [ref_lr(s, OPT) for s in range(STEPS)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert got[0] == 0.0 and got[2] == pytest.approx(OPT.learning_rate, rel=1e-6)


# ---------------------------------------------------------------- AdamW


def test_adamw_matches_numpy_reference(adam_run):
    """Parameters after each of 7 Trainer steps against the numpy AdamW fed the library's own
    gradients. Catches: eps inside the square root, missing bias correction, clipping after
    Adam instead of before (or no clipping, or clipping per tensor), coupled L2 decay added to
    the gradient, decay not scaled by the learning rate, decaying every parameter (LayerNorm
    scales would shrink), b1 / b2 / eps not passed through, the optimizer's step count out of
    step with the schedule. Also checks the grad_norm and finite metrics."""
    params0, grads, metrics, params = adam_run
    norms = [math.sqrt(sum(float(np.sum(x * x)) for x in g.values())) for g in grads]
    clipped = [n > OPT.clip_norm for n in norms]
    assert any(clipped) and not all(clipped), norms  # both branches of the clipping run
    np.testing.assert_allclose([float(m["grad_norm"]) for m in metrics], norms, rtol=1e-5)
    assert all(bool(m["finite"]) for m in metrics)

    ref = ref_adamw(params0, grads, OPT, DECAYED)
    assert set(params0) == DECAYED | NOT_DECAYED
    worst = 0.0
    for step, (got, want) in enumerate(zip(params, ref)):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {step}: {k}")
            worst = max(worst, float(np.max(np.abs(got[k] - want[k]))))
        # the step moved the parameters (step 0 has learning rate 0 and must not)
        moved = max(float(np.max(np.abs(got[k] - (params[step - 1] if step else params0)[k])))
                    for k in want)
        assert (moved == 0.0) if step == 0 else (moved > 1e-3), (step, moved)
    print(f"largest |library - reference| parameter difference: {worst:.3g}")


@pytest.fixture(scope="module")
def decayed_by_library():
    """Which parameters the Trainer decays, seen from one step with zero gradients (the loss
    is 0 * lm_loss): Adam's update is then exactly 0 and only the decay moves a parameter,
    by the factor 1 - lr * wd = 0.5. Parameters are first shifted away from 0 so that a
    zero-initialised bias would show its decay."""
    opt = OptConfig(learning_rate=0.5, warmup_steps=0, total_steps=10, weight_decay=1.0)
    zero_loss = lambda model, batch: 0.0 * lm_loss(model, batch)
    tr = Trainer(lambda: GPT(CFG, rngs=nnx.Rngs(0)), zero_loss,
                 make_mesh("", devices=jax.devices()[:1]), optimizer=opt)
    state = tr.init_state()
    shifted = jax.tree_util.tree_map(lambda x: x + 1.0, jax.device_get(state.params))
    before = flat(shifted)
    state = dataclasses.replace(state, params=jax.device_put(shifted, tr.state_shardings.params))
    state, m = tr.step(state, tr.put_batch(batches(1)[0]))
    assert float(m["grad_norm"]) == 0.0 and float(m["learning_rate"]) == 0.5
    decayed = set()
    for k, after in flat(state.params).items():
        if np.allclose(after, 0.5 * before[k], rtol=1e-6, atol=0):
            decayed.add(k)
        else:
            np.testing.assert_array_equal(after, before[k], err_msg=f"{k}: neither kept nor decayed")
    return decayed


def test_decay_mask_is_matrices_only(decayed_by_library):
    """Decayed: qkv / out / fc / proj kernels, the token and position embeddings; not decayed:
    biases and LayerNorm scales / biases, stacked or not. Catches decaying every parameter,
    the ndim >= 2 default mask (which decays the stacked (layers, d) biases and norm scales),
    and decaying nothing (the mask inverted or dropped)."""
    assert decayed_by_library == DECAYED
    assert not decayed_by_library & NOT_DECAYED


def test_qkv_bias_is_not_decayed(decayed_by_library):
    """The QKV bias is a bias (GPT-2 / nanoGPT and experiments/bench/reference.py do not decay
    it), although it has three dimensions besides the layers axis. Catches a mask that counts
    dimensions instead of telling matrices from biases."""
    assert QKV_BIAS not in decayed_by_library


# ---------------------------------------------------------------- remat


@pytest.mark.parametrize("policy", ["block", "dots"])
def test_remat_same_loss_and_grads(remat_runs, policy):
    """remat='block' / 'dots' recompute the forward pass in the backward one and must give
    the loss and gradients of remat='none'. Catches a checkpoint that drops the weights'
    gradients (weights closed over as constants) or recomputes with different inputs."""
    _, _, loss, grads, _ = remat_runs[policy]
    _, _, ref_loss, ref_grads, _ = remat_runs["none"]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k, g in ref_grads.items():
        np.testing.assert_allclose(grads[k], g, rtol=1e-6, atol=1e-6 * np.abs(g).max(), err_msg=k)


def test_remat_changes_the_program(remat_runs):
    """remat really rewrites the program, so the test above cannot pass with --remat ignored:
    'dots' recomputes the attention's batched dots and 'block' every forward dot in the
    backward pass (more dot_generals), and both need less temporary memory than 'none'."""
    dots = {p: r[0].count("stablehlo.dot_general") for p, r in remat_runs.items()}
    temp = {p: r[1].temp_size_in_bytes for p, r in remat_runs.items()}
    print("dot_generals", dots, "temp bytes", temp)
    assert dots["none"] < dots["dots"] < dots["block"], dots
    assert temp["block"] < temp["dots"] < temp["none"], temp
    assert temp["block"] < 0.5 * temp["none"], temp
