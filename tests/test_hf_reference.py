"""The numeric transforms jaxmp's Hugging Face import accepts, against transformers' own
values: golden numbers tests/fixtures/make_hf_fixtures.py wrote with transformers
(`python tests/fixtures/make_hf_fixtures.py reference`: hf_reference_golden.npz and the
tiny hf_llama_scaled_tiny/ model; no torch or transformers here).

The older fixtures use plain rotary embeddings, the default epsilons and gelu_new, so a
change to anything else the import accepts passed them. Bugs these catch: Llama 3's rope
scaling wrong in any band (the smoothed one between high_wavelen and low_wavelen above
all), band boundaries swapped, rope_theta or the scaling read from the wrong config.json
name (transformers 5's rope_parameters, or the older rope_theta / rope_scaling), an
rms_norm_eps that is not the file's, a GELU name accepted whose function is not jaxmp's
tanh GELU, GPT-2's LayerNorm epsilon changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmp import hf
from jaxmp.layers import _layer_norm
from jaxmp.models import registry
from jaxmp.models.gpt import GPT, DecoderBlock, GPTConfig, _gelu
from jaxmp.models.llama import rope_frequencies
from jaxmp.pretrained import open_source
from jaxmp.serve import Server

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GOLDEN = dict(np.load(os.path.join(FIXTURES, "hf_reference_golden.npz")))
SCALED = os.path.join(FIXTURES, "hf_llama_scaled_tiny")
GPT2_TINY = os.path.join(FIXTURES, "hf_gpt2_tiny")
LLAMA = registry.get("llama")
GPT2 = registry.get("gpt")


def _rope_settings() -> list[tuple[int, float, tuple | None, np.ndarray]]:
    out = []
    for i, (h, theta, s) in enumerate(zip(GOLDEN["rope_head_dim"], GOLDEN["rope_theta"],
                                          GOLDEN["rope_scaling"])):
        scaling = None if np.isnan(s).any() else (float(s[0]), float(s[1]), float(s[2]),
                                                  int(s[3]))
        out.append((int(h), float(theta), scaling, GOLDEN[f"rope_inv_freq_{i}"]))
    return out


def _bands(head_dim: int, theta: float, scaling: tuple) -> tuple[int, int, int]:
    """How many frequencies are kept, smoothed, divided by the factor (float64)."""
    _, low, high, original = scaling
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    kept = int(np.sum(wavelen < original / high))
    divided = int(np.sum(wavelen > original / low))
    return kept, wavelen.size - kept - divided, divided


def _hf_rope_config(head_dim: int, theta: float, scaling: tuple | None, style: str) -> dict:
    """A config.json with these rotary settings: transformers 5's rope_parameters, or the
    older top-level rope_theta and rope_scaling (with "type" for the kind)."""
    cfg = {"hidden_size": 2 * head_dim, "num_attention_heads": 2, "num_key_value_heads": 2}
    rope = {}
    if scaling:
        f, low, high, original = scaling
        rope = dict(factor=f, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original)
    if style == "rope_parameters":
        cfg["rope_parameters"] = {"rope_theta": theta,
                                  "rope_type": "llama3" if scaling else "default", **rope}
    else:
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = {"type": "llama3", **rope} if scaling else None
    return cfg


def test_fixture_covers_every_band_of_the_llama3_scaling():
    """Guards the fixture itself: every scaled setting has frequencies kept, smoothed and
    divided (else a bug in an empty band would pass), and default rope has thetas other
    than 10000."""
    settings = _rope_settings()
    scaled = [s for s in settings if s[2]]
    assert len(scaled) >= 3
    for h, theta, scaling, _ in scaled:
        assert min(_bands(h, theta, scaling)) >= 1, (h, theta, scaling, _bands(h, theta, scaling))
    assert sum(_bands(h, t, s)[1] for h, t, s, _ in scaled) >= 10
    assert {t for _, t, s, _ in settings if s is None} - {10000.0}


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
def test_rope_inverse_frequencies_equal_transformers(style):
    """Llama 3 scaling (all three bands) and default rope with other thetas, read through
    the import of both config.json styles: catches the smoothed band's formula or its
    boundaries changed, the factor applied to the wrong band, theta or a scaling field
    read from the wrong name (or not at all)."""
    for h, theta, scaling, want in _rope_settings():
        fields = LLAMA.hf.config_from_hf(_hf_rope_config(h, theta, scaling, style))
        cfg = LLAMA.config_from_json(fields)
        assert (cfg.rope_theta, cfg.rope_scaling) == (theta, scaling)
        got = np.asarray(rope_frequencies(cfg))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=0,
                                   err_msg=f"head_dim {h}, theta {theta}, scaling {scaling}")


@pytest.fixture(scope="module")
def scaled():
    return Server.from_checkpoint(SCALED, "")


def test_scaled_llama_config_is_read_as_transformers_wrote_it(scaled):
    """The tiny model's non-default rotary settings and epsilon arrive in jaxmp's config:
    catches rms_norm_eps, rope_theta or the scaling dropped (defaults used) on import."""
    want = json.load(open(os.path.join(SCALED, "config.json")))
    rope = want["rope_parameters"]
    assert scaled.cfg.rms_eps == want["rms_norm_eps"] == 0.1
    assert scaled.cfg.rope_theta == rope["rope_theta"] == 500.0
    assert scaled.cfg.rope_scaling == (rope["factor"], rope["low_freq_factor"],
                                       rope["high_freq_factor"],
                                       rope["original_max_position_embeddings"])
    np.testing.assert_allclose(np.asarray(rope_frequencies(scaled.cfg)),
                               GOLDEN["scaled_inv_freq"], rtol=2e-6)


def test_scaled_llama_logits_equal_transformers(scaled):
    """transformers' logits of a tiny LlamaForCausalLM with Llama 3 scaling, rope_theta 500
    and rms_norm_eps 0.1 over 240 positions (the divided frequencies turn radians farther
    than unscaled ones by then): catches the scaling, theta or epsilon wrong anywhere
    between config.json and the forward pass, e.g. an RMSNorm that ignores its eps."""
    positions = GOLDEN["scaled_positions"]
    assert positions.max() >= 200
    vocab = GOLDEN["scaled_logits"].shape[-1]
    logits = np.asarray(scaled.predict(GOLDEN["scaled_ids"]))[:, positions, :vocab]
    diff = np.abs(logits - GOLDEN["scaled_logits"]).max()
    assert diff <= 1e-4, diff


def _accepts_activation(name: str) -> bool:
    try:
        GPT2.hf.config_from_hf({"activation_function": name})
    except hf.HFError:
        return False
    return True


def test_every_accepted_gelu_name_is_jaxmps_tanh_gelu():
    """transformers' activation functions on a fixed vector: each name jaxmp's GPT-2
    import accepts must compute jaxmp's GELU to float32 rounding (gelu_fast's truncated
    constant included). Catches a name accepted whose function differs (the erf GELU,
    quick_gelu) and a wrong constant in jaxmp's GELU."""
    x = jnp.asarray(GOLDEN["act_x"])
    ours = np.asarray(_gelu(x))
    names = [str(n) for n in GOLDEN["act_names"]]
    accepted = [n for n in names if _accepts_activation(n)]
    assert {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"} <= set(accepted)
    for name in accepted:
        diff = np.abs(ours - GOLDEN[f"act_{name}"]).max()
        assert diff <= 2e-6, (name, diff)
    # the comparison can fail: the erf GELU is not the tanh one at this tolerance
    assert np.abs(ours - GOLDEN["act_gelu"]).max() > 1e-5


def test_gpt2_logits_under_each_activation_name_equal_transformers(tmp_path):
    """The tiny GPT-2 saved with each activation_function name: an accepted name imports
    to transformers' logits for that name; any other is refused with the field named.
    Catches a GELU variant accepted but computed differently (the erf GELU's logits differ
    by ~1e-3)."""
    ids = GOLDEN["gpt2_ids"]
    base = json.load(open(os.path.join(GPT2_TINY, "config.json")))
    for name in [str(n) for n in GOLDEN["gpt2_activations"]]:
        d = tmp_path / name
        d.mkdir()
        os.symlink(os.path.join(GPT2_TINY, "model.safetensors"), d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({**base, "activation_function": name}))
        want = GOLDEN[f"gpt2_logits_{name}"]
        if not _accepts_activation(name):
            with pytest.raises(hf.HFError, match="activation_function"):
                open_source(str(d))
            assert np.abs(want - GOLDEN["gpt2_logits_gelu_new"]).max() > 1e-4, name
            continue
        logits = np.asarray(Server.from_checkpoint(str(d), "").predict(ids))[..., :want.shape[-1]]
        diff = np.abs(logits - want).max()
        assert diff <= 1e-4, (name, diff)


def test_gpt2_layer_norm_equals_transformers_near_its_epsilon():
    """GPT-2's LayerNorm (transformers' module, layer_norm_epsilon as GPT2Config has it)
    on rows whose variance is of the epsilon's order, against jaxmp's final and block norms;
    the import accepts exactly that epsilon. Catches jaxmp's LayerNorm epsilon changed
    (1e-6, 1e-12) and an import that accepts another epsilon it would ignore."""
    x = jnp.asarray(GOLDEN["ln_x"])
    want = GOLDEN["ln_y"]
    # the norms as GPT builds them (shapes only: transformers' are freshly initialised,
    # scale 1 and bias 0), applied by jaxmp's norm function
    model = nnx.eval_shape(lambda: GPT(GPTConfig(num_layers=1, d_model=64, num_heads=4,
                                                 seq_len=8, vocab_size=8), rngs=nnx.Rngs(0)))
    block = nnx.eval_shape(lambda: DecoderBlock(64, 4, 256, rngs=nnx.Rngs(0)))
    ones, zeros = jnp.ones(64), jnp.zeros(64)
    for name, norm in (("ln_f", model.ln_f), ("ln1", block.ln1), ("ln2", block.ln2)):
        y = _layer_norm(x, ones, zeros, norm.eps, jnp.float32)
        diff = np.abs(np.asarray(y) - want).max()
        assert diff <= 1e-4, (name, diff)
    eps = float(GOLDEN["ln_eps"])
    GPT2.hf.config_from_hf({"layer_norm_epsilon": eps})
    for other in (1e-6, 1e-12, 1e-3):
        with pytest.raises(hf.HFError, match="layer_norm_epsilon"):
            GPT2.hf.config_from_hf({"layer_norm_epsilon": other})


def test_scaled_fixture_differs_from_unscaled_rope():
    """Guards the fixture: its scaled frequencies differ from plain rope's with the same
    theta (so a scaling silently dropped cannot pass)."""
    cfg = dataclasses.replace(LLAMA.config_from_json(
        LLAMA.hf.config_from_hf(json.load(open(os.path.join(SCALED, "config.json"))))),
        rope_scaling=None)
    plain = np.asarray(rope_frequencies(cfg))
    assert np.abs(plain - GOLDEN["scaled_inv_freq"]).max() > 1e-3
