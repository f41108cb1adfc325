"""The MoE family in Hugging Face's formats: MixtralForCausalLM and Qwen3MoeForCausalLM.

Attention is Llama's mapping (Qwen3 adds its per-head q_norm / k_norm and a head_dim of
its own). Each expert is three Linears in the files, one tensor per expert and layer
(Mixtral: block_sparse_moe.experts.{j}.w1 / w3 / w2 for gate / up / down; Qwen3:
mlp.experts.{j}.gate_proj / up_proj / down_proj), stacked on load into the (layers,
experts, ...) parameters; a device reads only the experts its shard holds. The router is
block_sparse_moe.gate (Mixtral) or mlp.gate (Qwen3), (experts, hidden). Mixtral always
renormalises the top-k weights; Qwen3 says so in norm_topk_prob. Export picks Qwen3-MoE for
a model with query/key norms, Mixtral for one without (and with renormalised top-k weights
and no shared experts); any other model has no Hugging Face architecture here.
"""

from __future__ import annotations

from jaxmp.hf import HFError, HFFormat, Tensor, require_fields  # noqa: F401
from jaxmp.models.llama_hf import _rope, layer_tensor, rope_parameters
from jaxmp.models.llama_hf import tensors as llama_tensors

SHAPE_INTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
              "max_position_embeddings", "num_key_value_heads", "num_experts_per_tok")


def _need(hf: dict, name: str, ok: bool, want: str, arch: str) -> None:
    if not ok:
        raise HFError(f"config.json: {name}={hf.get(name)!r} is not supported; jaxmp's "
                      f"{arch} needs {want}")


def _common(hf: dict, arch: str, experts: int, mlp: int, head_dim: int) -> dict:
    """The MoEConfig fields both architectures set the same way."""
    d, n = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    _need(hf, "hidden_act", hf.get("hidden_act", "silu") == "silu", "silu (SwiGLU)", arch)
    _need(hf, "attention_bias", not hf.get("attention_bias"), "false", arch)
    window = hf.get("sliding_window")
    _need(hf, "sliding_window", not hf.get("use_sliding_window", window is not None) or
          window is None, "null (full attention)", arch)
    theta, scaling = _rope(hf)
    return dict(num_layers=hf.get("num_hidden_layers", 32), d_model=d, num_heads=n,
                num_kv_heads=hf.get("num_key_value_heads") or n, mlp_dim=mlp,
                num_experts=experts, experts_per_token=hf.get("num_experts_per_tok", 2),
                head_size=0 if head_dim == d // n else head_dim,
                seq_len=hf.get("max_position_embeddings", 4096),
                vocab_size=hf.get("vocab_size", 32000), rope_theta=theta, rope_scaling=scaling,
                rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def mixtral_from_hf(hf: dict) -> dict:
    require_fields(hf, (*SHAPE_INTS, "intermediate_size", "num_local_experts"),
                   ("rms_norm_eps",))
    d, n = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    _need(hf, "head_dim", hf.get("head_dim") in (None, d // n),
          f"hidden_size / heads = {d // n}", "Mixtral")
    return dict(**_common(hf, "Mixtral", hf.get("num_local_experts", 8),
                          hf.get("intermediate_size", 14336), d // n),
                norm_topk_prob=True, qk_norm=False)


def qwen3_moe_from_hf(hf: dict) -> dict:
    require_fields(hf, (*SHAPE_INTS, "moe_intermediate_size", "num_experts",
                        "num_local_experts", "head_dim"), ("rms_norm_eps",))
    _need(hf, "decoder_sparse_step", hf.get("decoder_sparse_step", 1) == 1,
          "1 (every layer a mixture of experts)", "Qwen3-MoE")
    _need(hf, "mlp_only_layers", not hf.get("mlp_only_layers"), "[] (no dense layers)",
          "Qwen3-MoE")
    d, n = hf.get("hidden_size", 2048), hf.get("num_attention_heads", 32)
    experts = hf.get("num_local_experts") or hf.get("num_experts") or 128
    return dict(**_common(hf, "Qwen3-MoE", experts, hf.get("moe_intermediate_size", 768),
                          hf.get("head_dim") or d // n),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), qk_norm=True)


def _to_hf(cfg: dict, base: dict, extra: dict) -> dict:
    rope = rope_parameters(cfg)
    out = {"hidden_act": "silu", "attention_dropout": 0.0, "sliding_window": None}
    out.update(base)
    for old in ("rope_theta", "rope_scaling"):
        out.pop(old, None)
    out.update(num_hidden_layers=cfg["num_layers"], hidden_size=cfg["d_model"],
               num_attention_heads=cfg["num_heads"], num_key_value_heads=cfg["num_kv_heads"],
               head_dim=cfg.get("head_size") or cfg["d_model"] // cfg["num_heads"],
               max_position_embeddings=cfg["seq_len"], vocab_size=cfg["vocab_size"],
               rms_norm_eps=cfg["rms_eps"], tie_word_embeddings=cfg["tie_embeddings"],
               num_experts_per_tok=cfg["experts_per_token"],
               router_aux_loss_coef=cfg["router_aux_loss_coef"], rope_parameters=rope, **extra)
    return out


def mixtral_to_hf(cfg: dict, base: dict) -> dict:
    return _to_hf(cfg, base, dict(intermediate_size=cfg["mlp_dim"],
                                  num_local_experts=cfg["num_experts"]))


def qwen3_moe_to_hf(cfg: dict, base: dict) -> dict:
    return _to_hf(cfg, base, dict(
        moe_intermediate_size=cfg["mlp_dim"], intermediate_size=base.get(
            "intermediate_size", cfg["mlp_dim"]), num_experts=cfg["num_experts"],
        num_local_experts=cfg["num_experts"], norm_topk_prob=cfg["norm_topk_prob"],
        decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False,
        use_sliding_window=False))


def _tensors(cfg: dict, router: str, expert: str, names: tuple[str, str, str]) -> list[Tensor]:
    d, m, e = cfg["d_model"], cfg["mlp_dim"], cfg["num_experts"]
    gate, up, down = (f"{expert}.{{j}}.{n}.weight" for n in names)
    return [*llama_tensors(cfg, mlp=False),
            layer_tensor("mlp/router", router, (e, d), (e, d)),
            layer_tensor("mlp/gate", gate, (m, d), (m, d), experts=e),
            layer_tensor("mlp/up", up, (m, d), (m, d), experts=e),
            layer_tensor("mlp/down", down, (d, m), (d, m), experts=e)]


def _mixtral_accepts(cfg: dict) -> str | None:
    if cfg.get("qk_norm") or cfg.get("head_size"):
        return "no query/key norms or head size of its own"
    if not cfg.get("norm_topk_prob", True) or cfg.get("shared_mlp_dim"):
        return "top-k weights renormalised and no shared experts"
    return None


def _qwen3_accepts(cfg: dict) -> str | None:
    if not cfg.get("qk_norm"):
        return "per-head query/key norms (qk_norm)"
    return "no shared experts" if cfg.get("shared_mlp_dim") else None


SHAPES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "head_dim")
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight")
MIXTRAL = HFFormat(
    model_type="mixtral", architecture="MixtralForCausalLM", config_from_hf=mixtral_from_hf,
    config_to_hf=mixtral_to_hf, accepts=_mixtral_accepts, ignored=IGNORED,
    tensors=lambda cfg: _tensors(cfg, "block_sparse_moe.gate.weight",
                                 "block_sparse_moe.experts", ("w1", "w3", "w2")),
    shape_keys=(*SHAPES, "intermediate_size", "num_local_experts"))
QWEN3_MOE = HFFormat(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", config_from_hf=qwen3_moe_from_hf,
    config_to_hf=qwen3_moe_to_hf, accepts=_qwen3_accepts, ignored=IGNORED,
    tensors=lambda cfg: _tensors(cfg, "mlp.gate.weight", "mlp.experts",
                                 ("gate_proj", "up_proj", "down_proj")),
    shape_keys=(*SHAPES, "moe_intermediate_size", "num_experts", "num_local_experts"))
