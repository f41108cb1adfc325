"""The fused, chunked LM head + cross-entropy (jaxmp.fused_loss) against the plain head
(full logits, then the loss): values and gradients, alone and on meshes, the collectives
it runs, the memory it saves, and the model settings that drive it."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmp import fused_loss
from jaxmp.mesh import make_mesh
from jaxmp.models.decoder import mask_padding, row_losses
from jaxmp.models.gpt import GPTConfig
from jaxmp.models.llama import Llama, LlamaConfig
from jaxmp.sharding import DEFAULT_RULES, activation_sharding, constrain
from tests import helpers

B, T, D, VOCAB = 4, 16, 32, 500
VP = 512  # padded


def _inputs(dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (B, T, D), dtype)
    table = jax.random.normal(k[1], (VP, D)) * 0.3
    table = jnp.where(jnp.arange(VP)[:, None] < VOCAB, table, 0.0)
    targets = jax.random.randint(k[2], (B, T), 0, VOCAB)
    return x, table, targets


def _plain(x, table, targets, dtype=jnp.float32):
    logits = jnp.einsum("btd,vd->btv", x.astype(dtype), table.astype(dtype)).astype(jnp.float32)
    return row_losses(mask_padding(logits, VOCAB), targets)


def _fused(chunk, dtype=jnp.float32):
    return lambda x, table, targets: fused_loss.row_losses(x, table, targets, VOCAB, dtype, chunk)


def _value_and_grads(f, x, table, targets, weights=None):
    """Rows, and the gradients of their mean (the weighting every jaxmp loss uses)."""
    w = jnp.full((B,), 1.0 / B) if weights is None else weights
    loss = lambda x, table: jnp.sum(f(x, table, targets) * w)
    return f(x, table, targets), jax.grad(loss, argnums=(0, 1))(x, table)


@pytest.mark.parametrize("chunk", [0, 1, 4, 16, 64, 17])
def test_rows_and_gradients_equal_the_plain_head(chunk):
    """Catches: a wrong log-sum-exp or target logit, the padding not masked, a chunk
    reshape that mixes tokens of different rows, the 1/T of the row mean dropped, a
    weight gradient accumulated over some chunks only. chunk=17 does not divide a device's
    tokens: the next size that does is used."""
    x, table, targets = _inputs()
    rows, (dx, dw) = _value_and_grads(_fused(chunk), x, table, targets)
    ref, (rdx, rdw) = _value_and_grads(_plain, x, table, targets)
    np.testing.assert_allclose(rows, ref, rtol=1e-6)
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-8)
    assert float(jnp.max(jnp.abs(dw[VOCAB:]))) == 0.0  # padding rows get no gradient


def test_forward_only_equals_the_differentiated_pass():
    """The primal path (evaluation: no gradients made) gives the same rows as the pass that
    also makes the gradients. Catches: the two paths drifting apart."""
    x, table, targets = _inputs(seed=1)
    f = _fused(8)
    rows = jax.jit(f)(x, table, targets)
    rows_g, _ = jax.jit(lambda x, t, y: jax.vjp(lambda a: f(a, t, y), x))(x, table, targets)
    np.testing.assert_array_equal(rows, rows_g)


def test_scaled_loss_scales_the_gradients():
    """The cotangent is applied: 3 * mean gives 3x the gradients (catches a bwd that
    ignores g, e.g. under gradient accumulation's 1/parts)."""
    x, table, targets = _inputs(seed=2)
    _, (dx, dw) = _value_and_grads(_fused(8), x, table, targets)
    _, (dx3, dw3) = _value_and_grads(_fused(8), x, table, targets, jnp.full((B,), 3.0 / B))
    np.testing.assert_allclose(dx3, 3 * dx, rtol=1e-6)
    np.testing.assert_allclose(dw3, 3 * dw, rtol=1e-6)


def test_bfloat16_matches_the_plain_head():
    """GEMMs in bf16, loss in f32, as the plain head (catches the table or the logits'
    gradient left in float32, or the loss computed in bf16)."""
    x, table, targets = _inputs(jnp.bfloat16, seed=3)
    rows, (dx, dw) = _value_and_grads(_fused(8, jnp.bfloat16), x, table, targets)
    ref, (rdx, rdw) = _value_and_grads(functools.partial(_plain, dtype=jnp.bfloat16), x, table,
                                       targets)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(rows, ref, rtol=2e-3)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(rdx, np.float32),
                               rtol=3e-2, atol=3e-3)
    np.testing.assert_allclose(dw, rdw, rtol=3e-2, atol=3e-3)


def test_chunk_count():
    """The fewest chunks dividing the length that hold at most the asked tokens."""
    assert fused_loss.chunk_count(8, 256, 50304, 128) == 16
    assert fused_loss.chunk_count(8, 256, 50304, 0, "cpu") == 16   # 32 MiB / (4 * 50304) = 166
    assert fused_loss.chunk_count(8, 1024, 50304, 0, "gpu") == 8   # 256 MiB: 1334 tokens
    assert fused_loss.chunk_count(1, 256, 512, 0) == 1
    assert fused_loss.chunk_count(4, 15, 10, 8) == 15               # rows alone exceed it
    assert fused_loss.chunk_count(2, 12, 10, 8) == 3


# ---------------------------------------------------------------- on meshes
LAYOUTS = {
    # mesh, activation rule overrides: batch, length and vocabulary split every way
    "data:2,tensor:4": {},
    "data:8": {},
    "fsdp:2,tensor:2,data:2": {},
    "context:2,tensor:2,data:2": {},
    "tensor:8": {"batch": ()},
    "data:2,pipe:2,tensor:2": {},
}


def _mesh_run(mesh_text, overrides, chunk=4):
    mesh = make_mesh(mesh_text)
    rules = DEFAULT_RULES.override(activations=overrides or None)
    x, table, targets = _inputs(seed=4)

    def loss(x, table):
        rows = _fused(chunk)(constrain(x, ("batch", "length", "embed")),
                             constrain(table, ("vocab", "embed"), kind="params"), targets)
        return jnp.mean(rows), rows

    with activation_sharding(mesh, rules):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (_, rows), grads = fn(x, table)
        text = fn.lower(x, table).compile().as_text()
    return rows, grads, text


@pytest.mark.parametrize("mesh", list(LAYOUTS))
def test_on_a_mesh_equals_one_device(mesh):
    """Catches: the log-sum-exp or target logit not reduced over the vocabulary's axes, a
    vocabulary slice at the wrong offset, the weight gradient not summed over the batch
    or length axes, the input gradient not summed over the vocabulary's."""
    rows, (dx, dw), _ = _mesh_run(mesh, LAYOUTS[mesh])
    x, table, targets = _inputs(seed=4)
    ref, (rdx, rdw) = _value_and_grads(_plain, x, table, targets)
    np.testing.assert_allclose(rows, ref, rtol=1e-6)
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-8)


def _loop_bodies(text):
    """The computations a while loop runs as its body, by name."""
    names = set(re.findall(r"while\(.*?body=%?([\w.\-]+)", text))
    out = {}
    for name in names:
        m = re.search(r"\n%?" + re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", text, re.S)
        out[name] = m.group(1) if m else ""
    return out


def test_collectives_weight_gradient_reduced_once_after_the_chunks():
    """On data:2,tensor:4 the chunk loop runs only vocabulary-axis all-reduces (the
    log-sum-exp's max and sum, the target logit, the input gradient); the weight gradient
    is all-reduced over data once, after it. Catches: a per-chunk all-reduce of the
    (V, d) weight gradient (chunks x the plain head's gradient traffic)."""
    *_, text = _mesh_run("data:2,tensor:4", {})
    bodies = _loop_bodies(text)
    assert bodies, "no chunk loop in the compiled program"
    v_local = VP // 4
    in_loop = "\n".join(bodies.values())
    assert re.search(r"all-reduce", in_loop), "the vocabulary reductions are gone"
    assert not re.search(rf"f32\[{v_local},{D}\][^\n]*all-reduce\(", in_loop)
    outside = text
    for body in bodies.values():
        outside = outside.replace(body, "")
    assert re.search(rf"f32\[{v_local},{D}\][^\n]*all-reduce\(", outside)
    assert not re.search(r"all-gather|all-to-all", in_loop)


def test_three_gemms_and_no_full_logits():
    """The differentiated head runs three dots in all (logits, input and weight gradients,
    inside the chunk loop: nothing recomputed) and no (B, T, V) array exists in the
    compiled program. Catches a backward that recomputes the logits, or a path that
    materialises them."""
    x, table, targets = _inputs()
    f = jax.jit(jax.grad(lambda x, t: jnp.mean(_fused(16)(x, t, targets)), argnums=(0, 1)))
    lowered = f.lower(x, table)
    assert lowered.as_text().count("stablehlo.dot_general") == 3
    text = lowered.compile().as_text()
    assert len(_loop_bodies(text)) == 1
    assert not re.search(rf"\[{B},{T},{VP}\]", text)
    assert not re.search(rf"\[{B * T},{VP}\]", text)


# ---------------------------------------------------------------- through the models
def _gpt_cfg(**kw):
    return GPTConfig(**{**dict(num_layers=2, d_model=32, num_heads=4, seq_len=16,
                                vocab_size=1000), **kw})


def _train(mesh, cfg, model=None, steps=2, **layout):
    tr, _ = helpers.layout_trainer(mesh, cfg=cfg, **({"model": model} if model else {}),
                                   **layout)
    data = helpers.batches(steps, 8, seed=5)
    data = [{"tokens": d["tokens"] % cfg.vocab_size} for d in data]
    return helpers.train(tr, data)


SLOW = pytest.mark.slow  # (the quick subset keeps the fsdp layout)


@pytest.mark.parametrize("mesh,layout", [
    pytest.param("data:2,tensor:2,pipe:2", dict(p=2, m=2), marks=SLOW),
    ("fsdp:2,tensor:2,data:2", {}),
    pytest.param("data:2,pipe:2,tensor:2", dict(p=2, m=2, pipeline_schedule="zb"), marks=SLOW),
    pytest.param("data:2,context:2,tensor:2", dict(accum=2), marks=SLOW),
])
def test_gpt_fused_equals_unfused(mesh, layout):
    """The Trainer as the entry point builds it, GPT with the fused loss (default) and with
    --nofused_loss on the same layout: same losses, gradient norms, parameters."""
    a = _train(mesh, _gpt_cfg(), **layout)
    b = _train(mesh, _gpt_cfg(fused_loss=False), **layout)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[2], b[2], rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(a[1]), jax.tree_util.tree_leaves(b[1])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_llama_untied_head_fused_equals_unfused_and_one_device():
    """Llama's untied lm_head through the fused loss, on tensor + data with the 1f1b
    schedule (the tail inside the executor), against --nofused_loss on one device."""
    cfg = LlamaConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      seq_len=16, vocab_size=700)
    a = _train("data:2,tensor:2,pipe:2", cfg, model=Llama, p=2, m=2, pipeline_schedule="1f1b")
    b = _train("single", LlamaConfig(**{**cfg.__dict__, "fused_loss": False}), model=Llama)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    np.testing.assert_allclose(a[2], b[2], rtol=1e-5)


def test_fused_loss_saves_the_logits_memory():
    """The compiled step's temporaries shrink by at least the (B, T, V) float32 logits
    (the plain head stores them and their gradient; the fused one a chunk's). Catches a fused path that still
    materialises the logits."""
    cfg = _gpt_cfg(vocab_size=8192, loss_chunk=16)  # 8 chunks of 16 tokens
    sizes = {}
    for fused in (True, False):
        tr, _ = helpers.layout_trainer("single", cfg=GPTConfig(**{**cfg.__dict__,
                                                                  "fused_loss": fused}))
        batch = tr.put_batch({"tokens": np.zeros((8, 17), np.int32)})
        compiled = tr.compiled_step(batch).lower(tr.init_state(), batch).compile()
        sizes[fused] = compiled.memory_analysis().temp_size_in_bytes
    logits = 8 * 16 * cfg.padded_vocab * 4
    assert sizes[True] <= sizes[False] - logits, sizes


def test_loss_chunk_setting_checked():
    """--loss_chunk below 0 is refused with the flag's name and the fix."""
    with pytest.raises(ValueError, match="loss_chunk=-1 must be an integer >= 0"):
        _gpt_cfg(loss_chunk=-1)
    cfg = _gpt_cfg(fused_loss=False, loss_chunk=64)
    assert GPTConfig(**cfg.to_json()) == cfg


def test_bench_loss_head_rows():
    """The speed suite's head rows (experiments/bench/loss_head.py): both heads measured on
    the same inputs give the same loss, and every figure is there."""
    from experiments.bench import loss_head

    res = loss_head.head_bench(loss_head.HEAD_QUICK)
    assert res.loss["fused"] == pytest.approx(res.loss["plain"], rel=1e-6)
    j = res.to_json()
    assert set(j["median_s"]) == {"fused", "plain"} and j["speedup"] > 0
    assert all(len(v) == loss_head.HEAD_QUICK.repeats for v in res.times_s.values())
    assert all(v > 0 for v in res.temp_bytes.values())
    assert "LM head + loss" in res.table()


def test_loss_chunk_without_the_fused_loss_refused():
    """--loss_chunk with --nofused_loss would be silently ignored: refused in one line."""
    from jaxmp.config import RunConfig

    with pytest.raises(ValueError, match="--loss_chunk=64 sizes the fused loss's chunks, and "
                                         "--nofused_loss turns it off"):
        RunConfig.flat(fused_loss=False, loss_chunk=64).validate()
    RunConfig.flat(fused_loss=False, loss_chunk=0).validate()
    RunConfig.flat(loss_chunk=64).validate()
