"""Context parallelism: the sequence split over the `context` mesh axis.

Bugs these catch: the zig-zag layout giving a device the wrong chunk (or not balancing the
causal work), the loss or the positions not following that layout (a different loss, or
rotary / learned positions of the storage order), the online softmax missing its rescale
(a later block with a larger max), a causal mask off by one chunk or computed from array
indices instead of positions, ring blocks passed the wrong way or one step short, key /
value gradients not arriving home (or arriving at the wrong device), a block skipped that
holds visible keys, the all-gather variant gathering over the wrong axis, grouped-query
heads mapped to the wrong KV head when `tensor` replicates the KV heads, ring mode still
gathering the whole sequence, the KV cache split over context merged wrongly in decoding,
and a seq_len that cannot split accepted silently.
"""

from __future__ import annotations

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_run

from jaxmp import context
from jaxmp.mesh import make_mesh
from jaxmp.sharding import DEFAULT_RULES, activation_sharding


# ---------------------------------------------------------------- the layout
@pytest.mark.parametrize("c", [1, 2, 3, 4, 8])
def test_zigzag_gives_device_i_chunks_i_and_2c_minus_1_minus_i(c):
    t = 2 * c * 5
    order = context.zigzag_order(t, c)
    assert sorted(order) == list(range(t))  # a permutation
    n = t // (2 * c)
    for i, part in enumerate(np.split(order, c)):
        np.testing.assert_array_equal(part[:n], np.arange(i * n, (i + 1) * n))
        np.testing.assert_array_equal(part[n:], np.arange((2 * c - 1 - i) * n, (2 * c - i) * n))
    work = context.causal_work(order, c)
    assert work.sum() == t * (t + 1) // 2
    assert work.max() / work.min() <= 1.1  # balanced ...
    if c > 1:  # ... where the natural split is not
        plain = context.causal_work(np.arange(t), c)
        assert plain.max() / plain.min() > 2


def test_zigzag_refuses_a_length_that_does_not_split():
    with pytest.raises(ValueError, match="divisible by 8"):
        context.zigzag_order(20, 4)


# ---------------------------------------------------------------- attention kernels
B, T, N, K, H = 2, 48, 4, 2, 8  # 48: not a power of two; 2 KV heads for 4 query heads


def _inputs():
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, T, K, H))
    v = jax.random.normal(ks[2], (B, T, K, H))
    w = jax.random.normal(ks[3], (B, T, N, H))  # a cotangent that weights every output
    return q, k, v, w


def _reference(q, k, v, pos):
    """Plain masked attention, each query attending the keys at positions <= its own."""
    mask = pos[None, :] <= pos[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])


def _loss_and_grads(fn, q, k, v, w):
    return jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))(q, k, v)


def _order(order: str, c: int) -> np.ndarray:
    """Positions in storage order: natural, zig-zag, or a random permutation (masks come
    from positions, so any order must give plain attention's numbers)."""
    if order == "zigzag":
        return context.zigzag_order(T, c)
    return np.random.default_rng(3).permutation(T) if order == "random" else np.arange(T)


@functools.cache
def _reference_result(order: str, c: int):
    q, k, v, w = _inputs()
    pos = jnp.asarray(_order(order, c))
    out = _reference(q, k, v, pos)
    return out, _loss_and_grads(lambda *a: _reference(*a, pos), q, k, v, w)


@pytest.mark.parametrize("mesh,kind,order", [
    ("context:8", "ring", "zigzag"),
    *(pytest.param(*a, marks=pytest.mark.slow) for a in [
        ("data:2,context:4", "allgather", "random"),
        ("context:8", "ring", "natural"), ("context:8", "allgather", "natural"),
        ("context:4,data:2", "ring", "random"),
        ("context:2,tensor:4", "ring", "zigzag"),   # tensor 4 > 2 KV heads: they are repeated
        ("data:2,context:2,tensor:2", "allgather", "zigzag")]),
])
def test_attention_over_the_split_sequence_equals_plain_attention(mesh, kind, order):
    """Forward and gradients (q, k, v) of ring / all-gather attention over a sequence split
    over `context` equal plain masked attention on one device, with the tokens stored in
    the natural, the zig-zag or a random order."""
    m = make_mesh(mesh)
    c = m.shape["context"]
    q, k, v, w = _inputs()
    pos = jnp.asarray(_order(order, c))
    rules = DEFAULT_RULES.override(context_attention=kind)

    def split(*a):
        with activation_sharding(m, rules):
            return context.attention(*a, pos)
    out, ((loss, grads)) = _reference_result(order, c)
    got = jax.jit(split)(q, k, v)
    np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5)
    got_loss, got_grads = jax.jit(lambda *a: _loss_and_grads(split, *a))(q, k, v, w)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    for a, b in zip(got_grads, grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.slow
def test_ring_mode_permutes_blocks_and_gathers_no_sequence():
    """The compiled ring program: collective-permutes over context only, no all-gather;
    forward: exactly c-1 steps of each device's (k, v) block (and its positions); with
    the backward pass: c more of the (dk, dv) blocks on top (its own c-1 key/value steps
    may reuse the forward's in one program). The all-gather variant: all-gathers over
    context, no permutes."""
    from jaxmp.plan.analysis import collective_totals, collectives

    m = make_mesh("context:4,data:2")
    q, k, v, w = _inputs()
    pos = jnp.asarray(context.zigzag_order(T, 4))
    local_kv = B // 2 * (T // 4) * K * H * 4   # one device's k block, float32 bytes
    positions = (T // 4) * 4
    for kind in context.KINDS:
        rules = DEFAULT_RULES.override(context_attention=kind)

        def split(*a, rules=rules):
            with activation_sharding(m, rules):
                return context.attention(*a, pos)

        def totals(fn, *args):
            text = jax.jit(fn).lower(*args).compile().as_text()
            found = collectives(text, dict(m.shape))
            moved = {key.axes for key in found if key.op in ("collective-permute", "all-gather")}
            assert moved == {"context"}, found  # (the loss's sums reduce over data)
            return collective_totals(found, axes="context")
        fwd = totals(split, q, k, v)
        both = totals(lambda *a: _loss_and_grads(split, *a), q, k, v, w)
        if kind == "ring":
            assert fwd["all-gather"]["count"] == both["all-gather"]["count"] == 0
            assert fwd["collective-permute"]["bytes"] == 3 * (2 * local_kv + positions)
            assert both["collective-permute"]["bytes"] >= (
                fwd["collective-permute"]["bytes"] + 4 * 2 * local_kv)
        else:
            assert fwd["collective-permute"]["count"] == 0
            assert fwd["all-gather"]["count"] >= 2  # keys and values (and positions)


# ---------------------------------------------------------------- whole models vs one device
LCFG = dict(num_layers=4, d_model=32, num_heads=8, num_kv_heads=2, mlp_dim=64, seq_len=48)
GCFG = dict(num_layers=4, d_model=32, num_heads=8, seq_len=48)


def _cfg(family: str):
    if family == "llama":
        from jaxmp.models.llama import Llama, LlamaConfig
        return Llama, LlamaConfig(**LCFG)
    from jaxmp.models.gpt import GPT, GPTConfig
    return GPT, GPTConfig(**GCFG)


def _batches(cfg, steps: int = helpers.STEPS):
    rng = np.random.default_rng(1)
    return [{"tokens": rng.integers(0, cfg.vocab_size, (8, cfg.seq_len + 1)).astype(np.int32)}
            for _ in range(steps)]


@functools.cache
def _run(family: str, mesh: str, p: int = 1, m: int = 1, kind: str = "ring",
         sp: bool = False) -> tuple:
    """Losses, canonical parameters and gradient norms of 3 steps, built through the entry
    point's layout path (--context_attention, --sequence_parallel as flags)."""
    model, cfg = _cfg(family)
    tr, pipe = helpers.layout_trainer(mesh, p, m, model=model, cfg=cfg, context_attention=kind,
                                      sequence_parallel=sp)
    losses, params, norms = helpers.train(tr, _batches(cfg))
    return losses, helpers.canonical(params, pipe, cfg), norms


@pytest.mark.slow
@pytest.mark.parametrize("family,mesh,p,m,kind,sp", [
    # (gpt on data:2,context:4 ring passes too; left out for the suite's time: the ring on
    # 4 context devices trains below with Llama, data x context serves in the tests below)
    ("gpt", "context:2,tensor:2,pipe:2", 2, 2, "ring", True),
    ("llama", "context:8", 1, 1, "allgather", False),
    ("llama", "fsdp:2,context:4", 1, 1, "ring", True)])
def test_context_layouts_match_single_device(family, mesh, p, m, kind, sp):
    """3 AdamW steps on a split sequence of 48 tokens (zig-zag, 3 to 12 per chunk) equal
    one device: losses and gradient norms rtol 1e-5, parameters rtol 1e-4. Three of the
    issue's four layouts, both families and both kinds appear; the other combinations
    (data:2,context:4 among them; the serving fixture below trains there) pass too
    (BUILD_NOTES) and are left out for the suite's time."""
    assert_same_run(_run(family, mesh, p, m, kind, sp), _run(family, "single"))


@pytest.mark.slow
def test_the_loss_sees_the_zigzag_order_and_the_same_value():
    """Under a context mesh the loss lays the batch out in the zig-zag order (tokens,
    targets and positions alike), and the model's logits at a position do not depend on
    where that position is stored."""
    from flax import nnx

    from jaxmp.models.decoder import context_batch
    from jaxmp.models.llama import Llama

    tokens = _batches(_cfg("llama")[1], 1)[0]["tokens"]
    m = make_mesh("data:2,context:4")
    with activation_sharding(m, DEFAULT_RULES):
        inputs, targets, order = context_batch(jnp.asarray(tokens))
    np.testing.assert_array_equal(order, context.zigzag_order(48, 4))
    np.testing.assert_array_equal(inputs, tokens[:, :-1][:, order])
    np.testing.assert_array_equal(targets, tokens[:, 1:][:, order])
    model = Llama(_cfg("llama")[1], rngs=nnx.Rngs(0))
    plain = model(jnp.asarray(tokens[:, :-1]))
    stored = model(inputs, positions=jnp.asarray(order))
    np.testing.assert_allclose(stored, plain[:, order], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- serving
@pytest.fixture(scope="module")
def ctx_ckpt(tmp_path_factory):
    """A tiny Llama trained 2 steps on data:2,context:4 through the Python API."""
    return helpers.trained_checkpoint(
        tmp_path_factory.mktemp("ctx"), model="llama", preset="tiny", num_layers=2, d_model=32,
        num_heads=4, num_kv_heads=2, mlp_dim=64, seq_len=64, mesh="data:2,context:4",
        batch_size=4)


def test_rules_keep_the_attention_kind_and_old_records_gain_the_context_rules():
    """Rules through their JSON keep context_attention; a record written before the
    context axis (no `length` / `sequence` activation rules, no kind) reads back with
    the defaults for what it lacks and its own rules for the rest."""
    from jaxmp.sharding import Rules, ShardingError

    rules = DEFAULT_RULES.override(activations={"batch": "data"}, context_attention="allgather")
    back = Rules.from_json(rules.to_json())
    assert back == rules and back.context_attention == "allgather"
    old = {"params": dict(DEFAULT_RULES.to_json()["params"]),
           "activations": {"batch": ["data", "fsdp"], "heads": ["tensor"]}}
    got = Rules.from_json(old)
    acts = dict(got.activations)
    assert acts["length"] == ("context",) and acts["sequence"] == ("context",)
    assert acts["batch"] == ("data", "fsdp") and got.context_attention == "ring"
    with pytest.raises(ShardingError, match="choose ring or allgather"):
        DEFAULT_RULES.override(context_attention="flash")


@pytest.mark.slow
def test_serving_with_the_cache_split_over_context_equals_one_device(ctx_ckpt):
    """On data:2,context:2 (the KV cache split over context, a 40-token prompt's prefill
    too): Server.generate's greedy tokens equal one device's and its logits are within
    1e-4; concurrent completions through the continuous-batching engine (its slot cache
    split the same way) equal one device's generation of each prompt."""
    from jaxmp.serve import Server

    split = Server.from_checkpoint(ctx_ckpt, "data:2,context:2")
    one = Server.from_checkpoint(ctx_ckpt, "")
    prompts = [[5, 17, 99, 3], [42], list(range(30, 70))]
    got, ref = (s.generate(prompts, max_new_tokens=6, return_logits=True) for s in (split, one))
    for a, b in zip(got, ref):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    texts, lengths = ["def f(x):", "ab", "hello world, this is", "z"], [5, 2, 7, 3]
    replies = helpers.engine_completions(split, texts, lengths, "ctx")
    alone = [one.generate([p], n)[0].tokens for p, n in zip(texts, lengths)]
    assert replies == [one.decode_text(t) for t in alone]


@pytest.mark.parametrize("t", [pytest.param(1, marks=pytest.mark.slow),
                               pytest.param(3, marks=pytest.mark.slow), 640])
def test_attention_over_a_cache_split_over_context_equals_plain_attention(t):
    """A cached step's queries (t new tokens per row, rows at different positions) over a
    4096-slot cache split over context:4: a decode step and a short prompt in one block, a
    640-token prompt in pieces of queries over pieces of the cache slice (two of 512 keys
    per device), all equal to plain masked attention."""
    ks = jax.random.split(jax.random.key(5), 3)
    b, s = 2, 4096
    q = jax.random.normal(ks[0], (b, t, N, H))
    k = jax.random.normal(ks[1], (b, s, K, H))
    v = jax.random.normal(ks[2], (b, s, K, H))
    q_pos = jnp.array([[100], [3000]]) + jnp.arange(t)[None, :]
    mask = jnp.arange(s)[None, None, :] <= q_pos[:, :, None]
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    m = make_mesh("context:4,data:2")

    def split(q, k, v, q_pos):
        with activation_sharding(m, DEFAULT_RULES):
            return context.cached_attention(q, k, v, q_pos)
    got = jax.jit(split)(q, k, v, q_pos)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
