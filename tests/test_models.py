import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmp.models.gpt import GPT, PRESETS, GPTConfig, flops_per_token, lm_loss, num_params, preset
from jaxmp.sharding import logical_axes

COUNTS = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}


@pytest.mark.parametrize("name", ["small", "medium", "large", "xl"])
def test_gpt2_parameter_counts(name):
    cfg = preset(name, vocab_size=50257)
    assert num_params(cfg) == COUNTS[name]
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    stored = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        nnx.state(model, nnx.Param)))
    assert stored == num_params(cfg, real=False)  # padded vocabulary 50304
    assert stored - num_params(cfg) == (50304 - 50257) * cfg.d_model


def test_every_parameter_has_logical_names():
    model = nnx.eval_shape(lambda: GPT(preset("tiny"), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    names = jax.tree_util.tree_leaves(logical_axes(model), is_leaf=lambda x: isinstance(x, tuple))
    shapes = jax.tree_util.tree_leaves(params)
    assert len(names) == len(shapes)
    assert all(len(n) == len(s.shape) and any(n) for n, s in zip(names, shapes))


@pytest.mark.slow  # (the quick subset stays under 3 minutes)
def test_padded_vocabulary_never_gets_probability():
    cfg = GPTConfig(num_layers=2, d_model=32, num_heads=4, seq_len=8, vocab_size=200)
    assert cfg.padded_vocab == 256
    model = GPT(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(16).reshape(2, 8) % 200
    probs = jax.nn.softmax(model(tokens), axis=-1)
    assert float(probs[..., 200:].max()) == 0.0
    assert np.allclose(probs[..., :200].sum(-1), 1.0, atol=1e-5)
    assert float(jnp.abs(model.wte.embedding[200:]).max()) == 0.0


def test_forward_is_causal():
    cfg = GPTConfig(num_layers=2, d_model=32, num_heads=4, seq_len=8)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    a = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    b = a.at[0, 5].set(99)
    la, lb = model(a), model(b)
    np.testing.assert_allclose(la[0, :5], lb[0, :5], rtol=1e-6)
    assert not np.allclose(la[0, 5:], lb[0, 5:])


def test_initial_loss_is_near_uniform_and_context_is_checked():
    cfg = GPTConfig(num_layers=2, d_model=32, num_heads=4, seq_len=8)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    loss = lm_loss(model, {"tokens": jnp.arange(18).reshape(2, 9)})
    assert abs(float(loss) - np.log(256)) < 0.5
    with pytest.raises(ValueError, match="sequence of 9 tokens exceeds the context of 8"):
        model(jnp.zeros((1, 9), jnp.int32))


def test_config_errors():
    with pytest.raises(ValueError, match="preset='huge' is not a gpt preset: choose one of tiny"):
        preset("huge")
    with pytest.raises(ValueError, match="d_model=100 is not divisible by num_heads=8"):
        preset("tiny", d_model=100)


def test_flops_per_token_convention():
    cfg = preset("small", vocab_size=50257)
    n = COUNTS["small"] - 1024 * 768  # without position embeddings
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024
    assert set(PRESETS) == {"tiny", "small", "medium", "large", "xl"}


def _loss_and_grads(cfg, tokens):
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    f = lambda p: lm_loss(nnx.merge(graphdef, p), {"tokens": tokens})
    return jax.jit(jax.value_and_grad(f))(params)


@pytest.mark.slow
def test_unrolled_layers_equal_the_scan():
    """--noscan_layers (the GPU path) computes the same loss and gradients as the scan:
    catches a wrong layer order, a dropped layer, or gradients lost in the unstacking."""
    import dataclasses

    cfg = GPTConfig(num_layers=3, d_model=32, num_heads=4, seq_len=16, vocab_size=300)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (4, 17)), jnp.int32)
    loss_s, g_s = _loss_and_grads(cfg, tokens)
    loss_u, g_u = _loss_and_grads(dataclasses.replace(cfg, scan_layers=False), tokens)
    np.testing.assert_allclose(float(loss_u), float(loss_s), rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           g_u, g_s)
    # the layers really differ, so an order mistake could not cancel out
    blocks = g_s["blocks"]["mlp"]["fc"]["kernel"]
    assert not np.allclose(blocks[0], blocks[1])


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_chunked_attention_equals_full_attention(monkeypatch, heads, kv_heads):
    """--attention=chunked (query blocks recomputed in the backward pass) gives full causal
    attention's outputs and gradients, grouped queries included: catches a block's causal
    mask offset by its start, a wrong query-group order, a dropped block."""
    import jaxmp.layers as layers

    monkeypatch.setattr(layers, "CHUNK", 8)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 32, n, 16)), jnp.float32)
               for n in (heads, kv_heads, kv_heads))

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(layers.causal_attention(q, k, v, impl)))
    np.testing.assert_allclose(layers.causal_attention(q, k, v, "chunked"),
                               layers.causal_attention(q, k, v, "xla"), atol=2e-6)
    g_c = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    g_x = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_c, g_x):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="seq_len=36 is not a multiple of 8"):
        layers.causal_attention(q[:, :4].repeat(9, axis=1), k[:, :4].repeat(9, axis=1),
                                v[:, :4].repeat(9, axis=1), "chunked")


@pytest.mark.slow
def test_serving_params_keep_bf16_outputs_exact():
    """The server holds bf16 weights (half the bytes per decoded token) and float32
    LayerNorm parameters: logits equal those computed from the float32 weights, exactly."""
    from jaxmp.serve import serving_params

    cfg = GPTConfig(num_layers=2, d_model=32, num_heads=4, seq_len=8, dtype="bfloat16")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree_util.tree_flatten(nnx.to_pure_dict(params))
    keys = jax.random.split(jax.random.key(1), len(leaves))  # LayerNorm scales not all 1
    params = tree.unflatten([a + 0.01 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    held = serving_params(model, params, cfg.dtype)
    dtypes = {"/".join(map(str, (getattr(k, "key", k) for k in path))): a.dtype
              for path, a in jax.tree_util.tree_flatten_with_path(held)[0]}
    assert dtypes["blocks/ln1/scale"] == dtypes["ln_f/bias"] == jnp.float32
    assert dtypes["blocks/mlp/fc/kernel"] == dtypes["wte/embedding"] == jnp.bfloat16
    assert dtypes["blocks/attn/qkv/bias"] == dtypes["wpe"] == jnp.bfloat16
    tokens = jnp.arange(16).reshape(2, 8) % 256
    run = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
    np.testing.assert_array_equal(run(held), run(params))
    assert serving_params(model, params, "float32") is params


@pytest.mark.slow
def test_llama_norms_are_served_in_float32():
    """Llama's RMSNorm scales are tagged float32 like GPT-2's LayerNorm parameters (the
    server once kept only LayerNorm instances in float32, so RMSNorm scales were cast to
    bf16 and the logits moved): logits from the held bf16 weights equal those computed from
    the float32 weights, exactly."""
    from jaxmp.models.llama import Llama, LlamaConfig
    from jaxmp.serve import serving_params

    cfg = LlamaConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, seq_len=8,
                      vocab_size=256, mlp_dim=64, dtype="bfloat16")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree_util.tree_flatten(nnx.to_pure_dict(params))
    keys = jax.random.split(jax.random.key(1), len(leaves))  # norm scales not all 1
    params = tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    held = serving_params(model, params, cfg.dtype)
    dtypes = {"/".join(map(str, (getattr(k, "key", k) for k in path))): a.dtype
              for path, a in jax.tree_util.tree_flatten_with_path(held)[0]}
    assert dtypes["blocks/attn_norm/scale"] == dtypes["norm/scale"] == jnp.float32
    assert dtypes["blocks/mlp/up/kernel"] == jnp.bfloat16
    tokens = jnp.arange(16).reshape(2, 8) % 256
    run = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
    np.testing.assert_array_equal(run(held), run(params))


@pytest.mark.slow  # (the quick subset stays under 3 minutes)
def test_gpt_matches_an_independent_reference():
    """jaxmp's GPT against experiments/bench/reference.py, a GPT-2 written without any
    jaxmp code: logits, loss and every gradient (float32). Both sides of the layout tests
    share the model code, so this is what catches a wrong LayerNorm, attention scale,
    GELU variant, position embedding or tied head."""
    from experiments.bench import reference as ref
    from experiments.bench.speed import to_reference_params

    cfg = GPTConfig(num_layers=2, d_model=32, num_heads=4, seq_len=16, vocab_size=300)
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    leaves, tree = jax.tree_util.tree_flatten(nnx.to_pure_dict(params))
    keys = jax.random.split(jax.random.key(1), len(leaves))  # biases and norms not 0 / 1
    params = tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    params["wte"]["embedding"] = params["wte"]["embedding"].at[cfg.vocab_size:].set(0.0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (3, 17)), jnp.int32)

    logits = nnx.merge(graphdef, params)(tokens[:, :-1])[..., :cfg.vocab_size]
    ref_params = to_reference_params(params, cfg)
    np.testing.assert_allclose(logits, ref.forward(ref_params, tokens[:, :-1], cfg.num_heads),
                               rtol=1e-5, atol=1e-5)
    loss, grads = jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p), {"tokens": tokens}))(
        params)
    ref_loss, ref_grads = jax.value_and_grad(ref.loss_fn)(ref_params, tokens, cfg.num_heads)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    mapped = to_reference_params(grads, cfg)
    assert set(mapped) == set(ref_grads)
    for name in ref_grads:
        np.testing.assert_allclose(mapped[name], ref_grads[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
