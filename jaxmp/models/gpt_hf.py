"""GPT-2 in Hugging Face's format (transformers' GPT2LMHeadModel).

GPT-2's projections are Conv1D layers: weights stored (in, out), the layout jaxmp's
kernels use, so no transpose. c_attn packs q, k and v along its output ([q | k | v], each
head-major), which is jaxmp's (3, heads, head_dim). The LM head is tied to wte (no
lm_head.weight in save_pretrained's files); attn.bias / attn.masked_bias are causal-mask
buffers older files carry, not weights. jaxmp's vocabulary is padded to a multiple of 128:
zero rows on import, cut off on export.
"""

from __future__ import annotations

from jaxmp.hf import HFError, HFFormat, Tensor, require_fields

# transformers' names for the tanh approximation jaxmp's GPT uses
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def config_from_hf(hf: dict) -> dict:
    """config.json -> GPTConfig fields; whatever GPT cannot represent is an error."""
    def need(name: str, ok: bool, want: str) -> None:
        if not ok:
            raise HFError(f"config.json: {name}={hf.get(name)!r} is not supported; jaxmp's GPT "
                          f"needs {want}")
    require_fields(hf, ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_inner"),
                   ("layer_norm_epsilon",))
    d = hf.get("n_embd", 768)
    need("activation_function", hf.get("activation_function", "gelu_new") in TANH_GELU,
         "the tanh GELU (gelu_new)")
    need("layer_norm_epsilon", abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "1e-05")
    need("tie_word_embeddings", hf.get("tie_word_embeddings", True), "tied embeddings (true)")
    need("scale_attn_weights", hf.get("scale_attn_weights", True), "true")
    need("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx"),
         "false")
    need("add_cross_attention", not hf.get("add_cross_attention"), "false")
    inner = hf.get("n_inner") or 4 * d
    need("n_inner", inner % d == 0, f"a multiple of n_embd={d}")
    return dict(num_layers=hf.get("n_layer", 12), d_model=d, num_heads=hf.get("n_head", 12),
                seq_len=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                mlp_ratio=inner // d)


def config_to_hf(cfg: dict, base: dict) -> dict:
    """GPTConfig fields -> config.json, keeping what `base` (the imported config.json, if
    any) says about everything jaxmp does not model (token ids, dropout, ...)."""
    d = cfg["d_model"]
    out = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
           "tie_word_embeddings": True, "scale_attn_weights": True,
           "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
           "bos_token_id": cfg["vocab_size"] - 1, "eos_token_id": cfg["vocab_size"] - 1}
    out.update(base)
    out.update(n_layer=cfg["num_layers"], n_embd=d, n_head=cfg["num_heads"],
               n_positions=cfg["seq_len"], vocab_size=cfg["vocab_size"],
               n_inner=None if cfg["mlp_ratio"] == 4 else cfg["mlp_ratio"] * d)
    out.pop("n_ctx", None)
    return out


def tensors(cfg: dict) -> list[Tensor]:
    d, n = cfg["d_model"], cfg["num_heads"]
    h, m, v = d // n, cfg["mlp_ratio"] * d, cfg["vocab_size"]
    padded = -(-v // 128) * 128
    layer = lambda path, key, hf, shape: Tensor(f"blocks/{path}", f"transformer.h.{{i}}.{key}",
                                                hf, shape, stacked=True)
    return [
        Tensor("wte/embedding", "transformer.wte.weight", (v, d), (padded, d)),
        Tensor("wpe", "transformer.wpe.weight", (cfg["seq_len"], d), (cfg["seq_len"], d)),
        layer("ln1/scale", "ln_1.weight", (d,), (d,)),
        layer("ln1/bias", "ln_1.bias", (d,), (d,)),
        layer("attn/qkv/kernel", "attn.c_attn.weight", (d, 3 * d), (d, 3, n, h)),
        layer("attn/qkv/bias", "attn.c_attn.bias", (3 * d,), (3, n, h)),
        layer("attn/out/kernel", "attn.c_proj.weight", (d, d), (n, h, d)),
        layer("attn/out/bias", "attn.c_proj.bias", (d,), (d,)),
        layer("ln2/scale", "ln_2.weight", (d,), (d,)),
        layer("ln2/bias", "ln_2.bias", (d,), (d,)),
        layer("mlp/fc/kernel", "mlp.c_fc.weight", (d, m), (d, m)),
        layer("mlp/fc/bias", "mlp.c_fc.bias", (m,), (m,)),
        layer("mlp/proj/kernel", "mlp.c_proj.weight", (m, d), (m, d)),
        layer("mlp/proj/bias", "mlp.c_proj.bias", (d,), (d,)),
        Tensor("ln_f/scale", "transformer.ln_f.weight", (d,), (d,)),
        Tensor("ln_f/bias", "transformer.ln_f.bias", (d,), (d,)),
    ]


GPT2 = HFFormat(
    model_type="gpt2", architecture="GPT2LMHeadModel", config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, tensors=tensors, optional_prefix="transformer.",
    ignored=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)", r"lm_head\.weight"),
    shape_keys=("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_inner"))
