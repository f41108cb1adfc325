"""The Llama family: golden files transformers wrote (a tiny random LlamaForCausalLM with
grouped-query attention, tests/fixtures/make_hf_fixtures.py; no torch here), every layout
against one device, KV-cache decoding against the full forward.

Bugs these catch: interleaved instead of rotate-half rotary pairs, or positions wrong
past the prompt (the 256-token prompt), KV heads grouped with the wrong query heads, an
(out, in) projection read as (in, out), the untied head mixed up with the embedding, RMSNorm
in the wrong dtype order, a layout that splits KV heads it cannot split, a KV cache that
holds query heads or writes the wrong row.
"""

from __future__ import annotations

import json
import os

import helpers
import jax
import numpy as np
import pytest
from flax import nnx
from helpers import assert_same_run, run_module

from jaxmp import hf
from jaxmp.models.llama import Llama, LlamaConfig, num_params, preset
from jaxmp.pretrained import open_source
from jaxmp.serve import Server

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = os.path.join(FIXTURES, "hf_llama_tiny")
GOLDEN = dict(np.load(os.path.join(FIXTURES, "hf_llama_tiny_golden.npz")))
VOCAB = 500


@pytest.fixture(scope="module")
def server():
    return Server.from_checkpoint(TINY, "")


def test_published_parameter_counts():
    assert num_params(preset("llama-3.2-1b")) == 1_235_814_400
    assert num_params(preset("tinyllama-1.1b")) == 1_100_048_384
    assert num_params(preset("llama-2-7b")) == 6_738_415_616
    model = nnx.eval_shape(lambda: Llama(preset("tiny"), rngs=nnx.Rngs(0)))
    stored = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model)))
    assert stored == num_params(preset("tiny"), real=False)


def _logits(server) -> np.ndarray:
    return np.asarray(server.predict(GOLDEN["ids"]))[:, GOLDEN["positions"], :VOCAB]


def test_logits_equal_transformers_over_288_positions(server):
    assert GOLDEN["positions"].max() >= 256
    diff = np.abs(_logits(server) - GOLDEN["logits"]).max()
    assert diff <= 1e-4, diff


def test_greedy_continuation_of_a_256_token_prompt_equals_transformers(server):
    prompt = GOLDEN["prompt"][0].tolist()
    assert len(prompt) == 256
    out = server.generate([prompt], max_new_tokens=len(GOLDEN["greedy"]))
    assert out[0].tokens == GOLDEN["greedy"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["tensor:4", "pipe:2,tensor:2"])
def test_sharded_import_gives_the_same_logits_and_tokens(mesh):
    """tensor:4 > the 2 KV heads: KV projections replicated over tensor, query heads split."""
    s = Server.from_checkpoint(TINY, mesh)
    assert np.abs(_logits(s) - GOLDEN["logits"]).max() <= 1e-4
    out = s.generate([GOLDEN["prompt"][0].tolist()], max_new_tokens=len(GOLDEN["greedy"]))
    assert out[0].tokens == GOLDEN["greedy"].tolist()


def _tensors(path: str) -> dict[str, np.ndarray]:
    d = hf.HFDirectory(path)
    return {k: np.asarray(d.slice(k)[...]) for k in d.files}


def test_export_reproduces_the_fixture_bit_for_bit(server, tmp_path):
    source = open_source(TINY)
    params = server._abstract.stack.canonical_params(jax.device_get(server.params), "blocks")
    out = str(tmp_path / "export")
    hf.export(params, server.cfg.to_json(), source.family.hf, out,
              base_config=source.hf_config, tokenizer=source.tokenizer)
    want, got = _tensors(TINY), _tensors(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    config = json.load(open(os.path.join(out, "config.json")))
    orig = json.load(open(os.path.join(TINY, "config.json")))
    for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "max_position_embeddings", "vocab_size", "rms_norm_eps",
              "tie_word_embeddings", "model_type", "architectures", "rope_parameters"):
        assert config[k] == orig[k], k


@pytest.mark.slow
def test_tied_head_exports_without_lm_head(tmp_path):
    """Llama 3.2's tied embedding: no lm_head.weight in the files; import gives it back."""
    cfg = LlamaConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      seq_len=32, vocab_size=300, tie_embeddings=True,
                      rope_scaling=(8.0, 1.0, 4.0, 16))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fmt = open_source(TINY).family.hf
    hf.export(params, cfg.to_json(), fmt, str(tmp_path / "tied"))
    assert "lm_head.weight" not in _tensors(str(tmp_path / "tied"))
    back = Server.from_checkpoint(str(tmp_path / "tied"), "")
    assert back.cfg == cfg
    tokens = np.arange(20, dtype=np.int32)[None] % 300
    np.testing.assert_allclose(np.asarray(back.predict(tokens)),
                               np.asarray(Server(cfg, family="llama", params=params).predict(tokens)),
                               atol=1e-6)


def test_kv_heads_replicated_over_a_larger_tensor_axis_and_the_plan_says_so():
    cfg = LlamaConfig(num_layers=2, d_model=32, num_heads=8, num_kv_heads=2, mlp_dim=64,
                      seq_len=16)
    tr = helpers.trainer("tensor:8", cfg=cfg, model=Llama)
    text = tr.plan().format()
    assert "note: kv_heads=2 is replicated over tensor (tensor=8 does not divide it)" in text
    assert "blocks/attn/k/kernel" in text.splitlines()[-1]


# ---------------------------------------------------------------- KV cache
PROMPTS = [[5, 17, 3, 9, 41, 2, 8], [7, 1], [30, 31, 32, 33]]
NEW = 6


@pytest.mark.parametrize("mesh", ["", pytest.param("pipe:2,tensor:2", marks=pytest.mark.slow)])
def test_kv_cache_equals_the_full_forward_and_rows_are_independent(server, mesh):
    """Each decoded token's logits equal the full forward's at its position (cache holds
    the KV heads at the right rows and positions), and a row's result does not depend on
    the other rows of a mixed-length batch."""
    s = server if not mesh else Server.from_checkpoint(TINY, mesh)
    gens = s.generate(PROMPTS, NEW, return_logits=True)
    window = np.zeros((len(gens), 32), np.int32)
    for i, g in enumerate(gens):
        window[i, :len(g.prompt) + len(g.tokens)] = g.prompt + g.tokens
    full = np.asarray(s.predict(window))[..., :VOCAB]
    for i, g in enumerate(gens):
        start = len(g.prompt) - 1
        np.testing.assert_allclose(g.logits, full[i, start:start + NEW], rtol=1e-5, atol=1e-4)
        alone = s.generate([g.prompt], NEW, return_logits=True)[0]
        assert alone.tokens == g.tokens
        np.testing.assert_allclose(alone.logits, g.logits, rtol=1e-5, atol=1e-4)
    assert s.module(s.params).init_cache(1, 8)[0].shape[-2] == s.cfg.num_kv_heads


# ---------------------------------------------------------------- layouts vs one device
LCFG = LlamaConfig(num_layers=8, d_model=32, num_heads=8, num_kv_heads=2, mlp_dim=64, seq_len=16)


def run(mesh: str, p: int = 1, m: int = 1, r: int = 1, sp: bool = False) -> tuple:
    return helpers.run(mesh, p, m, r, sequence_parallel=sp, model=Llama, cfg=LCFG)


@pytest.mark.parametrize("mesh,p,m,r,sp", [
    *(pytest.param(*args, marks=pytest.mark.slow) for args in [
        ("data:2,pipe:2,tensor:2", 2, 8, 4, True), ("tensor:8", 1, 1, 1, False)]),
])
def test_layout_matches_single_device(mesh, p, m, r, sp):
    """Losses and gradient norms (rtol 1e-5), parameters (rtol 1e-4) after 3 steps, against
    one device; tensor:8 replicates the 2 KV heads (q, k, v as three projections), the
    others split them (one projection). data:8, fsdp:8, data:4,tensor:2, pipe:8 m=8,
    data:2,fsdp:2,tensor:2, fsdp:2,pipe:2,tensor:2 (m=4, r=2) and pipe:4,tensor:2 pass too
    (BUILD_NOTES) but are left to the
    GPT suite's layout tests: the model code is the same on them."""
    assert_same_run(run(mesh, p, m, r, sp), run("single"))


@pytest.mark.slow
def test_train_llama_then_serve(tmp_path):
    """python -m experiments.train --model=llama --preset=tiny: train, checkpoint, serve."""
    proc = run_module("experiments.train", "--model=llama", "--preset=tiny", "--steps=4",
                      "--batch_size=8", "--microbatches=2", "--log_every=2",
                      f"--ckpt_dir={tmp_path / 'run'}", "--serve_mesh=tensor:4",
                      "--serve_prompt=def f(")
    out = proc.stdout + proc.stderr
    assert "checkpoint step 4" in out and "served step 4 on tensor:4" in out, out[-2000:]
