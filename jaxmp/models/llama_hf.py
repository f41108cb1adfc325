"""Llama in Hugging Face's format (transformers' LlamaForCausalLM).

jaxmp's Llama stores every projection (out, in) as nn.Linear does, so each tensor is a
reshape: q_proj (heads * head_dim, d) is (heads, head_dim, d), o_proj (d, heads *
head_dim) is (d, heads, head_dim). HF's checkpoints hold q and k in the rotate-half
layout (pairs = the two halves of a head), which is the layout jaxmp's rotary embedding
uses, so no permutation either. Tied checkpoints (Llama 3.2 1B) have no lm_head.weight.
Rotary settings are read from `rope_parameters` (transformers 5) or `rope_theta` /
`rope_scaling` (older files); the Llama 3 frequency scaling is supported, other scalings
are an error.
"""

from __future__ import annotations

from jaxmp.hf import HFError, HFFormat, Tensor, require_fields


def _rope(hf: dict) -> tuple[float, list | None]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type") not in
                                         (None, "default") else None)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise HFError(f"config.json: rope scaling {kind!r} is not supported; jaxmp's Llama "
                      "reads the default rotary embedding and Llama 3's (rope_type llama3)")
    return theta, [float(scaling["factor"]), float(scaling["low_freq_factor"]),
                   float(scaling["high_freq_factor"]),
                   int(scaling["original_max_position_embeddings"])]


def config_from_hf(hf: dict) -> dict:
    """config.json -> LlamaConfig fields; whatever the model cannot represent is an error."""
    def need(name: str, ok: bool, want: str) -> None:
        if not ok:
            raise HFError(f"config.json: {name}={hf.get(name)!r} is not supported; jaxmp's "
                          f"Llama needs {want}")
    require_fields(hf, ("num_hidden_layers", "hidden_size", "num_attention_heads",
                        "intermediate_size", "vocab_size", "max_position_embeddings"),
                   ("rms_norm_eps", "rope_theta"))
    require_fields(hf, ("num_key_value_heads", "head_dim"))
    d, n = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    need("hidden_act", hf.get("hidden_act", "silu") == "silu", "silu (SwiGLU)")
    need("attention_bias", not hf.get("attention_bias"), "false")
    need("mlp_bias", not hf.get("mlp_bias"), "false")
    need("head_dim", hf.get("head_dim") in (None, d // n), f"hidden_size / heads = {d // n}")
    theta, scaling = _rope(hf)
    return dict(num_layers=hf.get("num_hidden_layers", 32), d_model=d, num_heads=n,
                num_kv_heads=hf.get("num_key_value_heads") or n,
                mlp_dim=hf.get("intermediate_size", 11008),
                seq_len=hf.get("max_position_embeddings", 2048),
                vocab_size=hf.get("vocab_size", 32000), rope_theta=theta, rope_scaling=scaling,
                rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def rope_parameters(cfg: dict) -> dict:
    """config.json's rope_parameters (transformers 5) of a config's rotary settings."""
    rope = {"rope_theta": cfg["rope_theta"], "rope_type": "default"}
    if cfg.get("rope_scaling"):
        f, low, high, original = cfg["rope_scaling"]
        rope.update(rope_type="llama3", factor=f, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original)
    return rope


def config_to_hf(cfg: dict, base: dict) -> dict:
    """LlamaConfig fields -> config.json (transformers 5's rope_parameters), keeping what
    `base` (an imported config.json) says about the rest (token ids, ...)."""
    rope = rope_parameters(cfg)
    out = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2}
    out.update(base)
    for old in ("rope_theta", "rope_scaling"):
        out.pop(old, None)
    out.update(num_hidden_layers=cfg["num_layers"], hidden_size=cfg["d_model"],
               num_attention_heads=cfg["num_heads"], num_key_value_heads=cfg["num_kv_heads"],
               head_dim=cfg["d_model"] // cfg["num_heads"], intermediate_size=cfg["mlp_dim"],
               max_position_embeddings=cfg["seq_len"], vocab_size=cfg["vocab_size"],
               rms_norm_eps=cfg["rms_eps"], tie_word_embeddings=cfg["tie_embeddings"],
               rope_parameters=rope)
    return out


def layer_tensor(path: str, key: str, hf: tuple[int, ...], shape: tuple[int, ...],
                 experts: int = 0) -> Tensor:
    """A stacked decoder-layer tensor: blocks/`path` <-> model.layers.{i}.`key`."""
    return Tensor(f"blocks/{path}", f"model.layers.{{i}}.{key}", hf, shape, stacked=True,
                  experts=experts)


def tensors(cfg: dict, mlp: bool = True) -> list[Tensor]:
    """Every tensor of a Llama-shaped decoder (`mlp`: with Llama's dense MLP; a head size
    of its own (`head_size`) and per-head query/key norms (`qk_norm`) where the config
    has them, as the MoE family's Qwen3 layout does)."""
    d, n, k = cfg["d_model"], cfg["num_heads"], cfg["num_kv_heads"]
    h, m, v = cfg.get("head_size") or d // n, cfg["mlp_dim"], cfg["vocab_size"]
    padded = -(-v // 128) * 128
    layer = layer_tensor
    out = [
        Tensor("embed/embedding", "model.embed_tokens.weight", (v, d), (padded, d)),
        layer("attn_norm/scale", "input_layernorm.weight", (d,), (d,)),
        layer("attn/q/kernel", "self_attn.q_proj.weight", (n * h, d), (n, h, d)),
        layer("attn/k/kernel", "self_attn.k_proj.weight", (k * h, d), (k, h, d)),
        layer("attn/v/kernel", "self_attn.v_proj.weight", (k * h, d), (k, h, d)),
        layer("attn/o/kernel", "self_attn.o_proj.weight", (d, n * h), (d, n, h)),
        layer("mlp_norm/scale", "post_attention_layernorm.weight", (d,), (d,)),
        Tensor("norm/scale", "model.norm.weight", (d,), (d,)),
    ]
    if cfg.get("qk_norm"):
        out += [layer("attn/q_norm/scale", "self_attn.q_norm.weight", (h,), (h,)),
                layer("attn/k_norm/scale", "self_attn.k_norm.weight", (h,), (h,))]
    if mlp:
        out += [layer("mlp/gate/kernel", "mlp.gate_proj.weight", (m, d), (m, d)),
                layer("mlp/up/kernel", "mlp.up_proj.weight", (m, d), (m, d)),
                layer("mlp/down/kernel", "mlp.down_proj.weight", (d, m), (d, m))]
    if not cfg["tie_embeddings"]:
        out.append(Tensor("lm_head/embedding", "lm_head.weight", (v, d), (padded, d)))
    return out


LLAMA = HFFormat(
    model_type="llama", architecture="LlamaForCausalLM", config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, tensors=tensors,
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight"),
    shape_keys=("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "head_dim"))
