"""Mixtral and Qwen3-MoE in and out of Hugging Face: golden files transformers wrote
(tiny random MixtralForCausalLM and Qwen3MoeForCausalLM with the real BPE tokenizer,
tests/fixtures/make_hf_fixtures.py moe; no torch here).

Bugs these catch: experts stacked in the wrong order or w1 / w3 swapped, the router read
transposed, Qwen3's q_norm / k_norm missing or applied after the rotation, its head_dim
taken as hidden / heads, norm_topk_prob ignored (Mixtral renormalises, this Qwen3 fixture
does not), a device reading every expert instead of its own, an export that renames,
reorders or reshapes a tensor, a config field lost on the way out.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from jaxmp import hf
from jaxmp.convert import to_checkpoint, to_hf
from jaxmp.models import registry
from jaxmp.pretrained import open_source
from jaxmp.serve import Server

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
MODELS = ["mixtral", "qwen3_moe"]
VOCAB = 500


def _dir(name: str) -> str:
    return os.path.join(FIXTURES, f"hf_{name}_tiny")


def _golden(name: str) -> dict:
    return dict(np.load(os.path.join(FIXTURES, f"hf_{name}_tiny_golden.npz")))


@pytest.mark.parametrize("name,mesh", [
    *(pytest.param(n, m, marks=pytest.mark.slow) for n, m in [
        ("qwen3_moe", ""),
        ("mixtral", ""), ("mixtral", "expert:4"), ("qwen3_moe", "expert:4"),
        ("mixtral", "data:2,expert:2,tensor:2"), ("qwen3_moe", "data:2,expert:2,tensor:2")]),
])
def test_logits_and_greedy_continuation_equal_transformers(name, mesh):
    """Logits over 288 positions within 1e-4, the greedy continuation of a 256-token prompt
    identical, on one device and on expert meshes."""
    g = _golden(name)
    s = Server.from_checkpoint(_dir(name), mesh)
    assert g["positions"].max() >= 256
    logits = np.asarray(s.predict(g["ids"]))[:, g["positions"], :VOCAB]
    assert np.abs(logits - g["logits"]).max() <= 1e-4
    out = s.generate([g["prompt"][0].tolist()], max_new_tokens=len(g["greedy"]))
    assert out[0].tokens == g["greedy"].tolist()


def test_the_configs_read_what_the_architectures_mean():
    mix = open_source(_dir("mixtral")).family.config_from_json(open_source(_dir("mixtral")).config)
    qwen = open_source(_dir("qwen3_moe"))
    q = qwen.family.config_from_json(qwen.config)
    assert (mix.num_experts, mix.experts_per_token, mix.mlp_dim, mix.norm_topk_prob,
            mix.qk_norm, mix.head_dim) == (8, 2, 32, True, False, 16)
    assert (q.num_experts, q.mlp_dim, q.norm_topk_prob, q.qk_norm, q.head_dim) == \
        (8, 32, False, True, 32)
    assert registry.for_hf("mixtral").name == registry.for_hf("qwen3_moe").name == "moe"


def test_each_device_reads_only_its_experts(monkeypatch):
    """On expert:4, each shard of a stacked expert weight is built from 2 of the 8
    experts' tensors (the key check before reading opens every key; it reads no rows)."""
    reads: list[set[int]] = []
    inside = [False]
    original_slice = hf.HFDirectory.slice

    def slice_(self, key):
        if inside[0] and ".experts." in key and key.endswith("w1.weight"):
            reads[-1].add(int(key.split(".experts.")[1].split(".")[0]))
        return original_slice(self, key)
    monkeypatch.setattr(hf.HFDirectory, "slice", slice_)
    original_cb = jax.make_array_from_callback

    def counting(shape, sharding, cb):
        def wrapped(index):
            reads.append(set())
            inside[0] = True
            try:
                return cb(index)
            finally:
                inside[0] = False
        return original_cb(shape, sharding, wrapped)
    monkeypatch.setattr(jax, "make_array_from_callback", counting)
    Server.from_checkpoint(_dir("mixtral"), "expert:4")
    expert_reads = [r for r in reads if r]
    assert expert_reads and all(len(r) == 2 for r in expert_reads), expert_reads
    assert set().union(*expert_reads) == set(range(8))


@pytest.mark.parametrize("name", MODELS)
def test_export_reproduces_the_fixture_bit_for_bit(name, tmp_path):
    """HF directory -> jaxmp checkpoint (experiments.convert's function) -> HF directory:
    every tensor identical, the architecture and the shape fields kept."""
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    to_checkpoint(_dir(name), ckpt)
    to_hf(ckpt, out)
    d_want, d_got = hf.HFDirectory(_dir(name)), hf.HFDirectory(out)
    assert sorted(d_got.files) == sorted(d_want.files)
    for k in d_want.files:
        want, got = np.asarray(d_want.slice(k)[...]), np.asarray(d_got.slice(k)[...])
        assert got.dtype == want.dtype and got.shape == want.shape, k
        np.testing.assert_array_equal(got, want, err_msg=k)
    config = json.load(open(os.path.join(out, "config.json")))
    orig = json.load(open(os.path.join(_dir(name), "config.json")))
    for k in ("model_type", "architectures", "num_hidden_layers", "hidden_size",
              "num_attention_heads", "num_key_value_heads", "num_experts_per_tok",
              "num_local_experts", "rms_norm_eps", "rope_parameters", "head_dim",
              "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        if orig.get(k) is not None:
            assert config[k] == orig[k], k
    if name == "qwen3_moe":
        assert config["norm_topk_prob"] is False and config["moe_intermediate_size"] == 32


def test_a_model_no_architecture_holds_is_refused_on_export():
    from jaxmp.models.moe import FAMILY, MoEConfig

    cfg = MoEConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, seq_len=16,
                    norm_topk_prob=False)  # Mixtral renormalises; no qk_norm for Qwen3
    with pytest.raises(ValueError, match="MixtralForCausalLM: top-k weights renormalised"):
        registry.hf_format(FAMILY, config=cfg.to_json())
    assert registry.hf_format(FAMILY, config={**cfg.to_json(), "qk_norm": True}).model_type \
        == "qwen3_moe"


@pytest.mark.parametrize("field,value,message", [
    ("mlp_only_layers", [0], "mlp_only_layers=[0] is not supported"),
    ("decoder_sparse_step", 2, "decoder_sparse_step=2 is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
])
def test_configs_it_cannot_represent_are_refused(field, value, message):
    from jaxmp.models.moe_hf import qwen3_moe_from_hf

    base = json.load(open(os.path.join(_dir("qwen3_moe"), "config.json")))
    with pytest.raises(hf.HFError, match=re.escape(message)):
        qwen3_moe_from_hf({**base, field: value})


@pytest.mark.slow
def test_serve_takes_the_hf_directory_on_an_expert_mesh(tmp_path):
    """serve --ckpt_dir=<Mixtral dir> on expert:4 writes the tokens one device generates.
    (--init_from reads a directory through the same loader: test_finetune runs that path,
    and the Server tests above read these directories onto expert meshes.)"""
    from helpers import run_module

    g = _golden("mixtral")
    out = tmp_path / "out.jsonl"
    proc = run_module("experiments.serve", f"--ckpt_dir={_dir('mixtral')}", "--mesh=expert:4",
                      "--prompt=def main(", f"--max_new_tokens={len(g['greedy'])}",
                      "--temperature=0", f"--output_file={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[0])
    alone = Server.from_checkpoint(_dir("mixtral"), "").generate(["def main("], len(g["greedy"]))
    assert row["tokens"] == alone[0].tokens
