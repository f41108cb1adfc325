"""Every config field of every built-in family round-trips: through the Hugging Face
export and import the `convert` command runs (jaxmp.convert.to_hf, then to_checkpoint),
and through a checkpoint's record. Every field is set off its default (enumerated with
dataclasses.fields, so a field added later without round-trip support fails here), and
the exported config.json is compared key by key with the config.json transformers
itself writes for the same model (tests/fixtures/hf_reference_golden.npz and
hf_llama_scaled_tiny/config.json, by tests/fixtures/make_hf_fixtures.py; no
transformers here).

Bugs these catch: an export that writes a default (rope_theta, rms_eps, a rope_scaling
field, num_kv_heads as num_heads, n_inner dropped, tie_word_embeddings) or an HF name
transformers does not read; an import that reads a default instead of the file's value;
a record that loses a field or gives it back in another type (rope_scaling as a list).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmp import convert
from jaxmp.checkpoint import CheckpointRecord, Checkpoints, save_params
from jaxmp.mesh import make_mesh
from jaxmp.models import registry
from jaxmp.models.gpt import GPTConfig
from jaxmp.models.llama import LlamaConfig
from jaxmp.models.mlp import MLPConfig
from jaxmp.models.moe import MoEConfig
from jaxmp.pipeline import PipelineSpec
from jaxmp.sharding import DEFAULT_RULES

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GOLDEN = dict(np.load(os.path.join(FIXTURES, "hf_reference_golden.npz")))
with open(os.path.join(FIXTURES, "hf_llama_scaled_tiny", "config.json"), encoding="utf-8") as _f:
    SCALED_CONFIG = json.load(_f)
# what transformers reads where config.json leaves a key out
with open(os.path.join(FIXTURES, "hf_moe_configs.json"), encoding="utf-8") as _f:
    MOE_CONFIGS = json.load(_f)
# what transformers reads where config.json leaves a key out, by model_type
HF_DEFAULTS = {"gpt2": json.loads(str(GOLDEN["defaults_gpt2"])),
               "llama": json.loads(str(GOLDEN["defaults_llama"])),
               "mixtral": MOE_CONFIGS["defaults_mixtral"],
               "qwen3_moe": MOE_CONFIGS["defaults_qwen3_moe"]}

# Config fields Hugging Face's config.json cannot hold: they come back as the defaults.
NOT_IN_HF = {
    "dtype": "the compute dtype; config.json's dtype is the weights' storage dtype "
             "(convert --dtype), parameters are float32 in jaxmp whatever the compute dtype",
    "remat": "a training memory setting (rematerialization), not part of the model",
    "attention": "the training attention kernel, not part of the model",
    "scan_layers": "how the stacked layers are applied (scan or loop), not part of the model",
    "fused_loss": "how the training loss is computed (fused head or full logits)",
    "loss_chunk": "the fused training loss's chunk size, not part of the model",
    "matmul_precision": "the training GEMMs' precision (FP8 or not), not part of the model",
    "router_z_loss_coef": "a training loss weight transformers' MoE configs have no key for",
    "expert_capacity_factor": "jaxmp's training-time routing choice (transformers routes "
                              "dropless)",
}
# Fields no Hugging Face architecture here can hold at all (export refuses a model that sets
# them off their default): the record round trip covers them.
NOT_EXPORTABLE = {"shared_mlp_dim": "neither Mixtral nor Qwen3-MoE has shared experts"}
_LLAMA_KEYS = {"num_layers": "num_hidden_layers", "d_model": "hidden_size",
               "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
               "seq_len": "max_position_embeddings", "vocab_size": "vocab_size",
               "rope_theta": "rope_parameters", "rope_scaling": "rope_parameters",
               "rms_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings"}
# jaxmp field -> the config.json key transformers reads it from, by model_type
HF_KEYS = {
    "gpt2": {"num_layers": "n_layer", "d_model": "n_embd", "num_heads": "n_head",
             "seq_len": "n_positions", "vocab_size": "vocab_size", "mlp_ratio": "n_inner"},
    "llama": {**_LLAMA_KEYS, "mlp_dim": "intermediate_size"},
    "mixtral": {**_LLAMA_KEYS, "mlp_dim": "intermediate_size", "num_experts": "num_local_experts",
                "experts_per_token": "num_experts_per_tok",
                "router_aux_loss_coef": "router_aux_loss_coef"},
    "qwen3_moe": {**_LLAMA_KEYS, "mlp_dim": "moe_intermediate_size",
                  "num_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok",
                  "router_aux_loss_coef": "router_aux_loss_coef", "head_size": "head_dim",
                  "norm_topk_prob": "norm_topk_prob"},
}
# fields an architecture fixes (Mixtral renormalises the top-k weights and has no query/key
# norms, Qwen3-MoE has them): they come back as that architecture's value
FIXED_BY = {"mixtral": {"norm_topk_prob": True, "qk_norm": False, "head_size": 0},
            "qwen3_moe": {"qk_norm": True}}
# config.json keys fixed by what jaxmp's model is (no field): they must say the same as
# transformers' for it
IMPLIED_KEYS = {
    "gpt2": ("activation_function", "layer_norm_epsilon", "tie_word_embeddings",
             "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention",
             "model_type"),
    "llama": ("head_dim", "hidden_act", "attention_bias", "mlp_bias", "model_type"),
    "mixtral": ("hidden_act", "sliding_window", "model_type"),
    "qwen3_moe": ("hidden_act", "attention_bias", "decoder_sparse_step", "mlp_only_layers",
                  "use_sliding_window", "model_type"),
}

# name: (family, config with fields off their defaults, transformers' config.json of the
# same model)
HF_CASES = {
    "gpt": ("gpt", GPTConfig(num_layers=3, d_model=48, num_heads=6, seq_len=72, vocab_size=300,
                             mlp_ratio=3, dtype="bfloat16", remat="dots", attention="xla",
                             scan_layers=False, fused_loss=False, loss_chunk=64,
                             matmul_precision="fp8"),
            json.loads(str(GOLDEN["config_gpt2"]))),
    "llama_untied_scaled": (
        "llama", LlamaConfig(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=45,
                             seq_len=320, vocab_size=160, rope_theta=500.0,
                             rope_scaling=(8.0, 1.0, 4.0, 256), rms_eps=0.1,
                             tie_embeddings=False, dtype="bfloat16", remat="block",
                             attention="chunked", scan_layers=False),
        SCALED_CONFIG),
    "llama_tied_scaled": (
        "llama", LlamaConfig(num_layers=3, d_model=48, num_heads=6, num_kv_heads=2, mlp_dim=77,
                             seq_len=200, vocab_size=300, rope_theta=12345.0,
                             rope_scaling=(4.0, 2.0, 8.0, 64), rms_eps=3e-3,
                             tie_embeddings=True, dtype="bfloat16", remat="dots",
                             attention="xla", scan_layers=False, fused_loss=False,
                             loss_chunk=100, matmul_precision="fp8"),
        json.loads(str(GOLDEN["config_llama_tied"]))),
    "llama_default_rope": (
        "llama", LlamaConfig(num_layers=3, d_model=48, num_heads=6, num_kv_heads=3, mlp_dim=77,
                             seq_len=200, vocab_size=300, rope_theta=12345.0, rms_eps=3e-3),
        json.loads(str(GOLDEN["config_llama_default_rope"]))),
}
HF_CASES.update({
    "mixtral": ("moe", MoEConfig(
        num_layers=3, d_model=48, num_heads=6, num_kv_heads=2, mlp_dim=40, seq_len=200,
        vocab_size=300, rope_theta=12345.0, rope_scaling=(4.0, 2.0, 8.0, 64), rms_eps=3e-3,
        tie_embeddings=True, num_experts=6, experts_per_token=3, router_aux_loss_coef=0.02,
        dtype="bfloat16", remat="dots", attention="xla", scan_layers=False,
        router_z_loss_coef=0.001, expert_capacity_factor=1.25, fused_loss=False,
        loss_chunk=7, matmul_precision="fp8"),
        MOE_CONFIGS["mixtral"]),
    "qwen3_moe": ("moe", MoEConfig(
        num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, head_size=24, qk_norm=True,
        mlp_dim=45, num_experts=5, experts_per_token=2, norm_topk_prob=False, seq_len=320,
        vocab_size=160, rope_theta=500.0, rms_eps=0.1, router_aux_loss_coef=0.05),
        MOE_CONFIGS["qwen3_moe"]),
})
# Configs for the checkpoint record: every built-in family, every field off its default.
RECORD_CASES = {
    "gpt": HF_CASES["gpt"][1],
    "llama": HF_CASES["llama_tied_scaled"][1],
    "mlp": MLPConfig(input_dim=5, hidden_dim=24, num_layers=2, num_classes=7,
                     dtype="bfloat16", remat="dots", scan_layers=False),
    "moe": MoEConfig(num_layers=3, d_model=48, num_heads=6, num_kv_heads=2, mlp_dim=40,
                     seq_len=200, vocab_size=300, rope_theta=12345.0,
                     rope_scaling=(4.0, 2.0, 8.0, 64), rms_eps=3e-3, tie_embeddings=True,
                     dtype="bfloat16", remat="dots", attention="xla", scan_layers=False,
                     num_experts=6, experts_per_token=3, shared_mlp_dim=24,
                     norm_topk_prob=False, router_aux_loss_coef=0.02, router_z_loss_coef=0.001,
                     expert_capacity_factor=1.25, head_size=16, qk_norm=True,
                     fused_loss=False, loss_chunk=3, matmul_precision="fp8"),
}


def _builtin_families() -> list[str]:
    """The families jaxmp itself registers (tests may register others)."""
    return [n for n in registry.names() if registry.get(n).build.__module__.startswith("jaxmp.")]


def _off_default(cfgs: list) -> set[str]:
    """The fields set off their default in at least one of `cfgs`."""
    return {f.name for cfg in cfgs for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != f.default}


def test_cases_set_every_field_of_every_family_off_its_default():
    """Guards the cases below: every built-in family with a Hugging Face format has an HF
    case and every family a record case; together they set every field (dataclasses.fields)
    off its default; every field is mapped to a config.json key or listed in NOT_IN_HF with
    its reason. A field added later fails here until it round-trips (or is listed)."""
    families = _builtin_families()
    assert {"gpt", "llama", "mlp", "moe"} <= set(families)
    assert set(RECORD_CASES) == set(families)
    for name in families:
        assert dataclasses.fields(RECORD_CASES[name]), name
        fields = {f.name for f in dataclasses.fields(RECORD_CASES[name])}
        assert _off_default([RECORD_CASES[name]]) == fields, (
            name, fields - _off_default([RECORD_CASES[name]]))
        formats = registry.hf_formats(registry.get(name))
        if not formats:
            continue
        cases = [(cfg, theirs["model_type"]) for fam, cfg, theirs in HF_CASES.values()
                 if fam == name]
        assert {t for _, t in cases} == {f.model_type for f in formats}, \
            f"family {name}: every Hugging Face format needs a round-trip case"
        exportable = fields - set(NOT_EXPORTABLE)
        assert _off_default([c for c, _ in cases]) >= exportable, (
            name, exportable - _off_default([c for c, _ in cases]))
        held = set().union(*(set(HF_KEYS[t]) | set(FIXED_BY.get(t, {})) for _, t in cases))
        assert held | (set(NOT_IN_HF) & fields) == exportable, (
            name, exportable - held - set(NOT_IN_HF))
        for cfg, _ in cases:
            cfg.validate()


def _params(family, cfg) -> dict:
    """Random weights of the model's shapes (without initialising the model eagerly)."""
    model = nnx.eval_shape(lambda: family.build(cfg, PipelineSpec(), nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                                  nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _save(path: str, family, cfg, params) -> None:
    mesh = make_mesh("", devices=jax.devices()[:1])
    record = CheckpointRecord.create(family.name, family.stack, cfg, mesh, DEFAULT_RULES,
                                     PipelineSpec(), {"source": "builtin", "seed": 3})
    save_params(path, 0, params, record)


def _record(path: str) -> CheckpointRecord:
    ckpts = Checkpoints(path, create=False)
    try:
        return ckpts.record()
    finally:
        ckpts.close()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_export_and_import_round_trip_every_field(case, tmp_path):
    """A jaxmp checkpoint -> convert.to_hf -> convert.to_checkpoint (the `convert`
    command's two directions): every field the format holds comes back equal, the others
    as their defaults; the exported config.json says what transformers' own config.json for
    the same model says under each key transformers reads (and the import reads
    transformers' file to the same config). Catches an export writing a default (rope_theta,
    rms_norm_eps, a rope_parameters entry, num_key_value_heads = heads, n_inner,
    tie_word_embeddings) or a misspelt key, and an import reading a default."""
    fam_name, cfg, theirs = HF_CASES[case]
    family = registry.get(fam_name)
    fields = [f.name for f in dataclasses.fields(cfg)]
    ckpt, out, back = str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(tmp_path / "back")
    _save(ckpt, family, cfg, _params(family, cfg))
    convert.to_hf(ckpt, out)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        exported = json.load(f)

    # the exported config.json, key by key, against transformers' (a key left out reads
    # as transformers' default)
    kind = theirs["model_type"]

    def read(key: str) -> object:
        return exported.get(key, HF_DEFAULTS[kind].get(key, "(absent)"))
    for field, key in HF_KEYS[kind].items():
        assert key in theirs, f"transformers' config.json has no {key!r} ({field})"
        assert read(key) == theirs[key], (field, key, read(key), theirs[key])
    for key in IMPLIED_KEYS[kind]:
        assert read(key) == theirs[key], (key, read(key), theirs[key])

    # transformers' file reads to this config
    fmt = registry.hf_format(family, kind)
    from_theirs = family.config_from_json(fmt.config_from_hf(theirs))
    for name in fields:
        if name not in NOT_IN_HF:
            assert getattr(from_theirs, name) == getattr(cfg, name), (name, "import")

    # and the convert command's round trip
    convert.to_checkpoint(out, back)
    got = family.config_from_json(_record(back).config)
    defaults = type(cfg)()
    lost = {n: getattr(defaults, n) for n in NOT_IN_HF if n in fields}
    for name in fields:
        want = lost[name] if name in lost else getattr(cfg, name)
        assert getattr(got, name) == want, (name, getattr(got, name), want)
        assert type(getattr(got, name)) is type(want), (name, type(getattr(got, name)))
    assert got == dataclasses.replace(cfg, **lost)


@pytest.mark.parametrize("family_name", sorted(RECORD_CASES))
def test_checkpoint_record_round_trips_every_config_field(family_name, tmp_path):
    """A config with every field off its default saved in a checkpoint's record and read
    back (save_params, Checkpoints.record, the family's config_from_json): every field
    equal, of the same type. Catches a field the record drops or a config_from_json that
    gives a field back in another type (rope_scaling as a list: unequal, unhashable)."""
    family = registry.get(family_name)
    cfg = RECORD_CASES[family_name]
    path = str(tmp_path / "ckpt")
    _save(path, family, cfg, {"w": np.ones((2, 3), np.float32)})
    record = _record(path)
    assert record.family == family_name
    got = family.config_from_json(record.config)
    for f in dataclasses.fields(cfg):
        assert getattr(got, f.name) == getattr(cfg, f.name), f.name
        assert type(getattr(got, f.name)) is type(getattr(cfg, f.name)), f.name
    assert got == cfg and hash(got) == hash(cfg)


def test_checkpoint_record_keeps_every_record_field():
    """CheckpointRecord's own fields, each off its default, through its JSON (as the meta
    item stores it): catches a field to_json or from_json drops or renames. (The run config
    it keeps, run_config, is checked against the run and its flagfile in
    tests/test_rundir.py.)"""
    values = dict(family="llama", config=RECORD_CASES["llama"].to_json(), mesh="pipe:2,tensor:4",
                  rules=DEFAULT_RULES.to_json(),
                  pipeline={"stages": 2, "microbatches": 4, "repeats": 2},
                  layer_order=[0, 2, 1, 3], stack="layers", data={"source": "x", "seed": 5},
                  versions={"jaxmp": "9"}, step=7, param_shapes={"w": [2, 3]},
                  params_only=True, param_dtype="bfloat16", tokenizer={"model": {"type": "BPE"}},
                  hf_config={"model_type": "llama", "rope_parameters": {"rope_theta": 1.0}},
                  run_config={"steps": 9, "model": {"model": "llama", "preset": "tiny"}},
                  chat={"chat_template": "{{ messages }}", "eos_token": "</s>"})
    fields = dataclasses.fields(CheckpointRecord)
    assert {f.name for f in fields} == set(values), set(values) ^ {f.name for f in fields}
    for f in fields:
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        assert values[f.name] != default, f.name
    rec = CheckpointRecord(**values)
    back = CheckpointRecord.from_json(json.loads(json.dumps(rec.to_json())))
    for f in fields:
        assert getattr(back, f.name) == values[f.name], f.name
