"""Plant plausible bugs one at a time in a scratch copy and report which the suite catches.

    python tests/mutations.py                 # every mutation (about 15 minutes on 2 cores)
    python tests/mutations.py kv_position     # some, by name
    python tests/mutations.py --list

Not part of the test run (pytest collects test_*.py only). Each mutation replaces one
exact piece of library code (it must occur exactly once, so a refactor that moves the code
makes the script fail loudly rather than test nothing), then runs the tests that should
catch it. "caught" means pytest reported failing tests (exit 1); a patch that breaks the
import or collection is reported as "broken", never as caught. The table it prints is
recorded in BUILD_NOTES.md.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("kv_position", "KV-cache decode position off by one", "jaxmp/serve.py",
             "nxt, cache = decode(tok[:, None], cache, lengths + i)",
             "nxt, cache = decode(tok[:, None], cache, lengths + i + 1)",
             ("tests/test_checkpoint.py", "-k", "kv_cache or mixed or greedy")),
    Mutation("accum_sum", "gradient accumulation sums instead of averaging", "jaxmp/train.py",
             "return jax.tree_util.tree_map(lambda x: x / accum, (loss, aux, grads))",
             "return loss / accum, jax.tree_util.tree_map(lambda x: x / accum, aux), grads",
             ("tests/test_equivalence.py", "-k", "gradients")),
    Mutation("decay_all", "weight decay on every parameter", "jaxmp/optim.py",
             'return bool(meta.get("weight_decay", True)) and sum(n != "layers" for n in names) >= 2',
             "return True",
             ("tests/test_optimizer.py",)),
    Mutation("warmup_off_by_one", "warm-up one step longer", "jaxmp/optim.py",
             "warm = max(0, min(self.warmup_steps, self.total_steps - 1))",
             "warm = max(0, min(self.warmup_steps + 1, self.total_steps - 1))",
             ("tests/test_optimizer.py",)),
    Mutation("no_clipping", "global-norm clipping dropped", "jaxmp/optim.py",
             "optax.clip_by_global_norm(self.clip_norm),", "optax.identity(),",
             ("tests/test_optimizer.py",)),
    Mutation("remat_ignored", "--remat block/dots silently ignored", "jaxmp/stack.py",
             '    if policy == "none":\n        return fn', "    return fn",
             ("tests/test_optimizer.py", "-k", "remat")),
    Mutation("dp_per_tick", "pipeline reduces data-parallel gradients every tick",
             "jaxmp/pipeline.py", "if d == 1 or state is not None or b % d:", "if True:",
             ("tests/test_bench.py", "-k", "structure_quick")),
    Mutation("microbatch_order", "pipeline returns micro-batches in the wrong row order",
             "jaxmp/pipeline.py", "y = constrain(y.swapaxes(0, 1).reshape(b, *x.shape[1:]), x_names)",
             "y = constrain(y.reshape(b, *x.shape[1:]), x_names)",
             ("tests/test_pipeline.py", "-k", "gradients_match")),
    Mutation("opt_state_replicated", "optimizer state not sharded like its parameters",
             "jaxmp/train.py", "                return hit[1]", "                return default",
             ("tests/test_equivalence.py", "tests/test_parallel_options.py", "-m", "not slow",
              "-k", "state_bytes or sharded_state")),
    Mutation("rules_override_ignored", "rule overrides lose to the defaults", "jaxmp/sharding.py",
             "p = {**dict(self.params), **dict(params or {})}",
             "p = {**dict(params or {}), **dict(self.params)}",
             ("tests/test_sharding.py",)),
    Mutation("storage_order_identity", "circular pipeline stores layers in canonical order",
             "jaxmp/pipeline.py",
             "return [j * p * k + s * k + i for s in range(p) for j in range(r) for i in range(k)]",
             "return list(range(num_layers))",
             ("tests/test_pipeline.py", "-k", "schedule or storage or order")),
    Mutation("resume_moments_unordered", "restore re-orders the parameters' layers, not Adam's",
             "jaxmp/checkpoint.py",
             'hit = any(getattr(k, "key", None) == stack for k in path)',
             'hit = any(getattr(k, "key", None) == stack for k in path) and '
             'getattr(path[0], "name", "") == "params"',
             ("tests/test_checkpoint_resume.py",)),
    Mutation("layernorm_variance", "LayerNorm variance without subtracting the mean",
             "jaxmp/layers.py", "var = jnp.square(x32 - mean).mean(-1, keepdims=True)",
             "var = jnp.square(x32).mean(-1, keepdims=True)",
             ("tests/test_models.py", "-k", "independent")),
    Mutation("gelu_exact", "erf GELU instead of GPT-2's tanh GELU", "jaxmp/models/gpt.py",
             "_gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=True))",
             "_gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=False))",
             ("tests/test_models.py", "-k", "independent")),
    Mutation("unrolled_layer_order", "--noscan_layers applies the layers in reverse",
             "jaxmp/stack.py", "is_leaf=lambda x: isinstance(x, list)) for i in range(num)]",
             "is_leaf=lambda x: isinstance(x, list)) for i in reversed(range(num))]",
             ("tests/test_models.py", "-k", "unrolled")),
    Mutation("serve_norms_bf16", "server casts LayerNorm parameters to bf16 too",
             "jaxmp/serve.py", "lambda x, f32: x if f32 else x.astype(dtype)",
             "lambda x, f32: x.astype(dtype)",
             ("tests/test_models.py", "-k", "serving_params or norms_are_served")),
    Mutation("rmsnorm_untagged", "Llama's RMSNorm scale not tagged float32 (served in bf16)",
             "jaxmp/models/llama.py",
             'self.scale = param(None, (dim,), names, None, 1.0, float32=True)',
             'self.scale = param(None, (dim,), names, None, 1.0)',
             ("tests/test_models.py", "-k", "norms_are_served")),
    Mutation("stage_weights_replicated", "pipeline stage weights replicated over pipe",
             "jaxmp/sharding.py", '"length": ("pipe", "tensor"), "layers": "pipe", "stage": "pipe",\n'
             '            "kv_heads": "tensor", "experts": "expert"},',
             '"length": ("pipe", "tensor"), "layers": "pipe",\n            "kv_heads": "tensor", '
             '"experts": "expert"},',
             ("tests/test_sharding.py", "tests/test_pipeline.py", "-k", "weight_gathers or pipe4 or pipe8")),
    Mutation("hf_qkv_heads_major", "c_attn split as (heads, 3, head_dim) instead of (3, heads, "
             "head_dim)", "jaxmp/models/gpt_hf.py",
             'layer("attn/qkv/kernel", "attn.c_attn.weight", (d, 3 * d), (d, 3, n, h)),',
             'layer("attn/qkv/kernel", "attn.c_attn.weight", (d, 3 * d), (d, n, 3, h)),',
             ("tests/test_hf.py", "-k", "logits or greedy")),
    Mutation("hf_layer_order", "import ignores the pipeline's storage order", "jaxmp/hf.py",
             "t.key.format(i=layer_order[q])", "t.key.format(i=q)",
             ("tests/test_hf.py", "-k", "storage_order")),
    Mutation("hf_rows_offset", "a shard reads its rows from the start of the tensor",
             "jaxmp/hf.py", "r0, r1 = first.start * lead, first.stop * lead",
             "r0, r1 = 0, (first.stop - first.start) * lead",
             ("tests/test_hf.py", "-k", "sharded_import or storage_order")),
    Mutation("eval_on_train", "validation loss computed on the training data",
             "jaxmp/run/build.py",
             "source = validation_source(cfg.data.data, cfg.eval.eval_data)",
             "source = cfg.data.data",
             ("tests/test_finetune.py", "-k", "finetune_on")),

    Mutation("engine_slot_zero", "every prefill writes its cache rows into slot 0",
             "jaxmp/engine_programs.py", "at = (0, slots[g], 0, 0, 0)", "at = (0, 0, 0, 0, 0)",
             ("tests/test_http.py", "-k", "sixteen")),
    Mutation("echo_logprob_shift", "prompt log-probabilities scored against the wrong token",
             "jaxmp/engine_programs.py", "nxt = jnp.roll(tokens, -1, axis=1)", "nxt = tokens",
             ("tests/test_http.py", "-k", "echo")),

    Mutation("replica_grads_summed", "accumulated data replicas' gradients summed, not averaged",
             "jaxmp/train.py",
             "return jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), out)",
             "return (jnp.mean(out[0]), jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), "
             "out[1]), jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), out[2]))",
             ("tests/test_equivalence.py", "-k", "gradients")),
    Mutation("state_not_spread", "shard_state leaves the state replicated over data",
             "jaxmp/train.py", "if shard_state else self.param_specs)", "if False else self.param_specs)",
             ("tests/test_parallel_options.py", "-k", "at_rest")),
    Mutation("gather_once_ignored", "pipeline_fsdp_gather_once ignored", "jaxmp/pipeline.py",
             '(("fsdp",) if spec.fsdp_gather_once else ())', "()",
             ("tests/test_parallel_options.py", "-k", "gathers_once")),
    Mutation("sp_saves_gathered", "sequence parallelism keeps the gathered projection inputs",
             "jaxmp/layers.py",
             "return jax.checkpoint(lambda h: dense(gather_sequence(h)))(constrain(x, RESIDUAL))",
             "return dense(gather_sequence(x))",
             ("tests/test_parallel_options.py", "-k", "predicted")),
    Mutation("decode_slices_in_loop", "decode slices the stacked weights inside the token loop",
             "jaxmp/serve.py", "layers = model.stack.split(getattr(model, self.family.stack))",
             "layers = None", ("tests/test_parallel_options.py", "-k", "in_place")),
    Mutation("cache_write_row", "KV-cache write puts every row's keys in row 0", "jaxmp/layers.py",
             "rows = jnp.arange(b)[:, None]", "rows = jnp.zeros((b, 1), jnp.int32)",
             ("tests/test_checkpoint.py", "-k", "kv_cache or mixed or greedy")),
    Mutation("rope_direction", "rotary embedding rotates the other way", "jaxmp/models/llama.py",
             "rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)",
             "rotated = jnp.concatenate([x32[..., half:], -x32[..., :half]], axis=-1)",
             ("tests/test_llama.py", "-k", "transformers")),
    Mutation("llama_decode_positions", "decode rotates new tokens as if at position 0",
             "jaxmp/models/llama.py",
             "positions = index[:, None] + jnp.arange(tokens.shape[1])[None, :]",
             "positions = jnp.zeros_like(index)[:, None] + jnp.arange(tokens.shape[1])[None, :]",
             ("tests/test_llama.py", "-k", "kv_cache or greedy")),
    Mutation("llama_head_tied_anyway", "untied head ignored (logits from the embedding)",
             "jaxmp/models/llama.py",
             "table = self.embed if self.lm_head is None else self.lm_head",
             "table = self.embed", ("tests/test_llama.py", "-k", "transformers")),
    Mutation("ring_allreduce", "planner costs an all-reduce like an all-gather",
             "jaxmp/plan/planner.py",
             'RING_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n,',
             'RING_FACTOR = {"all-reduce": lambda n: (n - 1) / n,',
             ("tests/test_plan.py", "-k", "ring")),
    Mutation("link_stride", "planner maps an axis to hosts ignoring its stride",
             "jaxmp/plan/planner.py",
             "    group = ids[tuple(slice(None) if a in over else 0 for a in names)].reshape(-1)",
             "    group = np.arange(math.prod(mesh[a] for a in over))",
             ("tests/test_plan.py", "-k", "nvlink")),
    Mutation("depth_extrapolation", "reduced-depth plan interpolates from the wrong end",
             "jaxmp/plan/planner.py",
             "        w = (layers - self.layers) / (other.layers - self.layers)",
             "        w = (layers - other.layers) / (other.layers - self.layers)",
             ("tests/test_plan.py", "-k", "linear or shallow")),
    Mutation("search_fit_on_state", "search judges a fit on the state alone",
             "jaxmp/plan/planner.py",
             "        return self.spare_bytes >= 0",
             "        return self.target.memory_bytes >= self.params_bytes + self.opt_bytes",
             ("tests/test_plan.py", "-k", "search")),
    Mutation("chunk_mask", "chunked attention's causal mask ignores the block's start",
             "jaxmp/layers.py",
             "        pos = start + jnp.arange(c)",
             "        pos = jnp.arange(c)",
             ("tests/test_models.py", "-k", "chunked")),

    # ---- round two (issue 23): written against classes of gap, each caught by the quick
    # subset (-m "not slow") unless its entry says why it needs a slow layout.
    # -- collective kinds, flags through the entry path, option pairs, quick layouts
    Mutation("grads_all_reduced", "sharded-state gradients all-reduced, then sliced (same "
             "numbers, twice the traffic)", "jaxmp/train.py",
             "grads = jax.lax.with_sharding_constraint(grads, self.state_shardings.params)",
             "grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)",
             ("tests/test_parallel_options.py", "-m", "not slow", "-k", "sharded_state")),
    Mutation("accum_reduce_per_part", "data replicas' gradients reduced at every accumulation "
             "part", "jaxmp/train.py",
             "if d == 1 or self._has_random_streams or b % (d * accum):", "if True:",
             ("tests/test_parallel_options.py", "-m", "not slow", "-k", "sharded_state")),
    Mutation("sp_flag_dropped", "--sequence_parallel never reaches the rules",
             "jaxmp/run/build.py", 'activations["sequence"] = ("tensor",)', "pass",
             ("tests/test_parallel_options.py", "-m", "not slow", "-k", "sequence")),
    Mutation("gather_once_flag_dropped", "--pipeline_fsdp_gather_once never reaches the pipeline",
             "jaxmp/run/build.py",
             "fsdp_gather_once=cfg.layout.pipeline_fsdp_gather_once)", "fsdp_gather_once=False)",
             ("tests/test_parallel_options.py", "-m", "not slow", "-k", "gather_once")),
    Mutation("shard_state_flag_dropped", "--shard_state never reaches the trainer (always off)",
             "jaxmp/run/build.py", "shard_state=cfg.layout.shard_state)", "shard_state=False)",
             ("tests/test_parallel_options.py", "-m", "not slow", "-k", "sharded_state")),
    Mutation("round_by_repeats", "pipeline round index divides by the repeats, not the "
             "micro-batches", "jaxmp/pipeline.py", "return _clip(item(t, s) // m, 0, r - 1)",
             "return _clip(item(t, s) // r, 0, r - 1)",
             ("tests/test_pipeline.py", "-m", "not slow")),
    Mutation("read_slot_by_stages", "stage 0 reads its fresh micro-batch from slot t % p",
             "jaxmp/pipeline.py",
             "fresh = jax.lax.dynamic_index_in_dim(buf, read_slot(t, m), 1, keepdims=False)",
             "fresh = jax.lax.dynamic_index_in_dim(buf, read_slot(t, p), 1, keepdims=False)",
             ("tests/test_pipeline.py", "-m", "not slow", "-k", "matches or match")),
    Mutation("eval_accum_sum", "evaluation sums its accumulation parts' losses",
             "jaxmp/train.py",
             "return jnp.mean(jax.lax.map(loss, _accumulation_parts(batch, accum)))",
             "return jnp.sum(jax.lax.map(loss, _accumulation_parts(batch, accum)))",
             ("tests/test_pipeline.py", "tests/test_equivalence.py", "-m", "not slow", "-k",
              "gradients")),
    Mutation("resume_data_restarts", "a resumed run reads the data from the first batch again",
             "jaxmp/run/loop.py", "state, metrics = step_fn(state, run.batches.device(step, shardings))",
             "state, metrics = step_fn(state, run.batches.device(step - start, shardings))",
             ("tests/test_rundir.py", "-k", "resume_and_replay")),
    # (end of layout section)
    # -- numeric references and config round trips (Hugging Face)
    Mutation("llama3_smooth_ends_swapped",
             "Llama 3 rope scaling interpolates its smoothed band from the wrong ends",
             "jaxmp/models/llama.py",
             "    mid = (1 - smooth) * inv / factor + smooth * inv",
             "    mid = (1 - smooth) * inv + smooth * inv / factor",
             ("tests/test_hf_reference.py", "-m", "not slow", "-k", "rope or scaled")),
    Mutation("llama3_bands_swapped", "Llama 3 rope scaling's band boundaries swapped",
             "jaxmp/models/llama.py",
             "low_wavelen, high_wavelen = original / low, original / high",
             "low_wavelen, high_wavelen = original / high, original / low",
             ("tests/test_hf_reference.py", "-m", "not slow", "-k", "rope or scaled")),
    Mutation("rope_theta_legacy_key_only",
             "import reads rope_theta only from the pre-transformers-5 top-level key",
             "jaxmp/models/llama_hf.py",
             'theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))',
             'theta = float(hf.get("rope_theta", 10000.0))',
             ("tests/test_hf_reference.py", "-m", "not slow", "-k", "rope or scaled")),
    Mutation("rms_eps_import_default", "import reads rms_norm_eps under the wrong name (default)",
             "jaxmp/models/llama_hf.py",
             'rms_eps=float(hf.get("rms_norm_eps", 1e-6))',
             'rms_eps=float(hf.get("rms_eps", 1e-6))',
             ("tests/test_hf_reference.py", "-m", "not slow", "-k", "scaled")),
    Mutation("rope_theta_export_default", "export writes the default rope_theta",
             "jaxmp/models/llama_hf.py",
             'rope = {"rope_theta": cfg["rope_theta"], "rope_type": "default"}',
             'rope = {"rope_theta": 10000.0, "rope_type": "default"}',
             ("tests/test_roundtrip.py", "-m", "not slow", "-k", "hf_export")),
    Mutation("kv_heads_export_as_heads", "export writes num_key_value_heads = num_heads",
             "jaxmp/models/llama_hf.py",
             'num_key_value_heads=cfg["num_kv_heads"]',
             'num_key_value_heads=cfg["num_heads"]',
             ("tests/test_roundtrip.py", "-m", "not slow", "-k", "hf_export")),
    Mutation("rope_original_max_seq_len",
             "export writes max_position_embeddings as the scaling's original context",
             "jaxmp/models/llama_hf.py",
             "original_max_position_embeddings=original)",
             'original_max_position_embeddings=cfg["seq_len"])',
             ("tests/test_roundtrip.py", "-m", "not slow", "-k", "hf_export")),
    Mutation("n_inner_export_dropped", "GPT-2 export leaves n_inner out (4 x n_embd read back)",
             "jaxmp/models/gpt_hf.py",
             'n_inner=None if cfg["mlp_ratio"] == 4 else cfg["mlp_ratio"] * d)',
             "n_inner=None)",
             ("tests/test_roundtrip.py", "-m", "not slow", "-k", "hf_export")),
    Mutation("erf_gelu_accepted", "GPT-2 import accepts the erf GELU as the tanh one",
             "jaxmp/models/gpt_hf.py",
             'TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")',
             'TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")',
             ("tests/test_hf_reference.py", "-m", "not slow", "-k", "gelu")),
    Mutation("layer_norm_eps", "LayerNorm epsilon 1e-6 instead of GPT-2's 1e-5", "jaxmp/layers.py",
             "def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Any = jnp.float32):",
             "def __init__(self, dim: int, *, eps: float = 1e-6, dtype: Any = jnp.float32):",
             ("tests/test_hf_reference.py", "-m", "not slow", "-k", "layer_norm")),
    Mutation("rope_scaling_list_record", "a checkpoint's rope_scaling read back as a list",
             "jaxmp/models/llama.py",
             'd["rope_scaling"] = tuple(d["rope_scaling"])',
             'd["rope_scaling"] = list(d["rope_scaling"])',
             ("tests/test_roundtrip.py", "-m", "not slow", "-k", "record")),
    # (end of reference section)
    # -- sampling distributions and streaming
    Mutation("top_p_cut_inclusive", "top-p keeps a token whose preceding mass equals p",
             "jaxmp/sampling.py", "cut = jnp.where(before < top_p[:, None], order, jnp.inf)",
             "cut = jnp.where(before <= top_p[:, None], order, jnp.inf)",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "engine_sampler")),
    Mutation("top_p_drops_reaching_token", "top-p drops the token that reaches p (one fewer)",
             "jaxmp/sampling.py", "before = jnp.cumsum(probs, axis=-1) - probs",
             "before = jnp.cumsum(probs, axis=-1)",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "engine_sampler")),
    Mutation("top_k_keeps_one_more", "engine top-k keeps k+1 tokens", "jaxmp/sampling.py",
             "kth = jnp.take_along_axis(order, (k - 1)[:, None], axis=-1)",
             "kth = jnp.take_along_axis(order, jnp.minimum(k, vocab - 1)[:, None], axis=-1)",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "engine_sampler")),
    Mutation("temperature_multiplies", "engine multiplies logits by the temperature",
             "jaxmp/sampling.py", "scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]",
             "scaled = logits * temperature[:, None]",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "engine_sampler")),
    Mutation("top_p_ignores_top_k", "top-p measured on the whole distribution, not the top-k",
             "jaxmp/sampling.py",
             "probs = jax.nn.softmax(jnp.where(order >= kth, order, -jnp.inf), axis=-1)",
             "probs = jax.nn.softmax(order, axis=-1)",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "engine_sampler")),
    Mutation("generate_top_k_ignored", "Server.generate ignores top_k", "jaxmp/serve.py",
             "full(top_k or 0, np.int32)", "full(0, np.int32)",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "generate")),
    Mutation("generate_temp_ignored", "Server.generate samples at temperature 1",
             "jaxmp/serve.py", "full(temperature, np.float32)", "full(1.0, np.float32)",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "generate")),
    Mutation("generate_keys_by_step", "Server.generate keys its draws by the step, not the "
             "position (unlike the engine)", "jaxmp/serve.py",
             "step_keys = jax.vmap(jax.random.fold_in)(keys, lengths - 1 + i)",
             "step_keys = jax.vmap(jax.random.fold_in)(keys, 0 * lengths + i)",
             ("tests/test_openai_api.py", "-k", "same_tokens_for_a_seed")),
    Mutation("engine_first_draw_key", "the engine keys the first draw like the second (the "
             "position after the prompt)", "jaxmp/engine_programs.py",
             "                                                start + n - 1)",
             "                                                start + n)",
             ("tests/test_openai_api.py", "-k", "same_tokens_for_a_seed")),
    Mutation("engine_first_listed_stop", "stop cut at the first listed stop, not the first "
             "in the text", "jaxmp/engine.py",
             'return self._finish(slot, "stop", text=s.text[:min(hits)])',
             'return self._finish(slot, "stop", text=s.text[:hits[0]])',
             ("tests/test_sampling.py", "-m", "not slow", "-k", "stream")),
    Mutation("stream_hold_short", "stream holds back one character too few",
             "jaxmp/openai_responses.py",
             "self.hold = max((len(x) for x in stops), default=1) - 1",
             "self.hold = max((len(x) for x in stops), default=2) - 2",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "stream")),
    Mutation("stream_negative_hold", "stream's hold slice goes negative on short texts",
             "jaxmp/openai_responses.py", "whole[:max(0, len(whole) - self.hold)]",
             "whole[:len(whole) - self.hold]",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "stream")),
    Mutation("stream_partial_char_held", "stream counts an incomplete character as "
             "held text", "jaxmp/openai_responses.py", 'whole = text.rstrip("\\ufffd")',
             "whole = text",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "stream")),
    Mutation("stream_ignores_stop_hits", "stream sends text a stop sequence then removes",
             "jaxmp/openai_responses.py", "safe = text[:min(hits)] if hits else ", "safe = ",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "stream")),
    Mutation("stream_rest_uncut", "stream's last chunk sends the uncut text (the stop too)",
             "jaxmp/openai_responses.py", "return done.text[len(self.sent):]",
             "return self.codec.decode(self.ids)[len(self.sent):]",
             ("tests/test_sampling.py", "-m", "not slow", "-k", "stream")),
    # (end of sampling section)

    # serving that real clients trust (#25)
    Mutation("no_disconnect_watch", "disconnects noticed only when the next token is sent",
             "jaxmp/http.py", "        message = await request.receive()\n",
             "        message = {'type': 'http.request'}\n        await asyncio.sleep(3600)\n",
             ("tests/test_openai_api.py", "-k", "dropped_client")),
    Mutation("group_failure_shared", "a request that fails in a prefill group fails the group",
             "jaxmp/engine.py", "            if len(handles) == 1:\n",
             "            if True:\n                [h.put(Done('error', error=str(e))) "
             "for h in handles[1:]]\n",
             ("tests/test_openai_api.py", "-k", "isolates")),
    Mutation("seed_low_32_bits", "only the low 32 bits of a seed count", "jaxmp/sampling.py",
             "return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)",
             "return np.array([0, seed & 0xFFFFFFFF], np.uint32)",
             ("tests/test_openai_api.py", "-k", "seeds")),
    Mutation("ids_text_prompt", "an API text prompt 'ids:1,2' read as token ids",
             "jaxmp/openai_fields.py", "    return codec.encode_text(value)",
             "    return codec.encode(value)",
             ("tests/test_openai_api.py", "-k", "seeds")),
    Mutation("stream_model_default", "streamed chunks name the default model, not the served one",
             "jaxmp/http.py", '"created": created, "model": model, **payload}',
             '"created": created, "model": "jaxmp", **payload}',
             ("tests/test_openai_api.py", "-k", "sdk_completions")),
    Mutation("prefix_load_wrong_block", "a cached block copied to the wrong positions",
             "jaxmp/engine_programs.py", "(0, g, j * block, 0, 0)) for r, p in zip(rows, pool))",
             "(0, g, (j + 1) * block, 0, 0)) for r, p in zip(rows, pool))",
             ("tests/test_openai_api.py", "-k", "prefix_cache")),
    Mutation("prefix_whole_prompt", "a hit may cover the whole prompt (no token left to "
             "choose the first new one)", "jaxmp/prefix_cache.py",
             "usable = keys[:(len(r.prompt) - 1) // block]", "usable = keys",
             ("tests/test_openai_api.py", "-k", "prefix_cache")),
    Mutation("prefix_echo_start", "an echo hit starts after the last cached token (its "
             "score missing)", "jaxmp/prefix_cache.py",
             "start = max(0, cached - 1) if r.prompt_logprobs else cached", "start = cached",
             ("tests/test_openai_api.py", "-k", "prefix_cache")),
    Mutation("prefix_key_not_chained", "a block's key ignores the tokens before it",
             "jaxmp/prefix_cache.py", "h = hashlib.sha256(h + chunk.tobytes()).digest()",
             "h = hashlib.sha256(chunk.tobytes()).digest()",
             ("tests/test_openai_api.py", "-k", "prefix_cache")),
    Mutation("prefix_positions_key", "the first token's draw keyed on the prefilled part's "
             "length, not the prompt's", "jaxmp/engine_programs.py",
             "                                                start + n - 1)",
             "                                                n - 1)",
             ("tests/test_openai_api.py", "tests/test_http.py", "-m", "not slow", "-k",
              "prefix or seed")),
    Mutation("warm_up_skips_scoring", "warm-up leaves prompt scoring to compile at the first "
             "echo request", "jaxmp/engine.py",
             "        for length in self.lengths():\n            self._run_prefill([], 1, length, True)\n",
             "",
             ("tests/test_openai_api.py", "-k", "compilation")),
    Mutation("chat_template_no_trim", "chat templates rendered without trim_blocks",
             "jaxmp/chat.py", "ImmutableSandboxedEnvironment(trim_blocks=True,",
             "ImmutableSandboxedEnvironment(trim_blocks=False,",
             ("tests/test_openai_api.py", "-k", "chat_template")),
    Mutation("chat_no_eos_stop", "chat replies run past the end-of-turn token",
             "jaxmp/openai_fields.py",
             "    if eos is not None and (i := tok.token_to_id(eos)) is not None:\n"
             "        return (i,)\n",
             "    return ()\n",
             ("tests/test_openai_api.py", "-k", "stop_token")),
    Mutation("error_body_detail", "404/405 answered with Starlette's {'detail': ...}",
             "jaxmp/http.py", "    @app.exception_handler(HTTPException)\n", "",
             ("tests/test_openai_api.py", "-k", "errors_map")),
    Mutation("include_usage_ignored", "stream_options.include_usage sends no usage chunk",
             "jaxmp/http.py", "        if spec.include_usage:\n", "        if False:\n",
             ("tests/test_openai_api.py", "-k", "sdk_completions")),
    Mutation("best_of_first_n", "best_of returns the first n samples, not the most likely",
             "jaxmp/openai_responses.py",
             "mine = sorted(mine, key=lambda r: -sum(t.logprob for t in r[1]))[:self.n]",
             "mine = mine[:self.n]",
             ("tests/test_openai_api.py", "-k", "best_of")),
    # the mixture of experts (issue 27)
    Mutation("moe_topk_not_renormalised", "top-k router weights not renormalised",
             "jaxmp/experts.py", "    if normalize:\n        weights = weights /",
             "    if False:\n        weights = weights /",
             ("tests/test_moe.py", "-k", "router or dropless")),
    Mutation("moe_aux_wrong_axis", "router probabilities averaged over experts, not tokens",
             "jaxmp/experts.py", "jnp.sum(counts / tokens * jnp.mean(probs, axis=-2), axis=-1)",
             "jnp.sum(counts / tokens * jnp.mean(probs, axis=-1, keepdims=True), axis=-1)",
             ("tests/test_moe.py", "-k", "load_balancing")),
    Mutation("moe_aux_no_factor", "load-balancing loss without its factor E",
             "jaxmp/experts.py", "    return num * jnp.sum(counts / tokens",
             "    return jnp.sum(counts / tokens",
             ("tests/test_moe.py", "-k", "load_balancing")),
    Mutation("moe_z_no_square", "router z-loss without the square", "jaxmp/experts.py",
             "jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)), axis=-1)",
             "jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1), axis=-1)",
             ("tests/test_moe.py", "-k", "z_loss")),
    Mutation("moe_buffer_balanced", "dropless buffers sized for a balanced routing",
             "jaxmp/experts.py", "    rows = n * min(k, local)\n",
             "    rows = -(-n * k // shards)\n",
             ("tests/test_moe.py", "-k", "dropless")),
    Mutation("moe_capacity_position_major", "capacity ranks second choices with first ones",
             "jaxmp/experts.py", "    slot_major = experts.transpose(0, 2, 1).reshape(b, k * t)",
             "    slot_major = experts.reshape(b, k * t)",
             ("tests/test_moe.py", "-k", "capacity")),
    Mutation("moe_dropped_not_zeroed", "a dropped assignment's weight kept",
             "jaxmp/experts.py", "    w = jnp.where(kept, weights, 0.0).astype(vals.dtype)",
             "    w = weights.astype(vals.dtype)",
             ("tests/test_moe.py", "-k", "capacity")),
    Mutation("moe_no_all_to_all", "experts computed on the sending shard (no all-to-all)",
             "jaxmp/experts.py",
             "    return jax.lax.all_to_all(a, axes, 0, 0, tiled=True) if shards > 1 else a",
             "    return a",
             ("tests/test_moe.py", "-k", "dropless or capacity or all_to_all")),
    Mutation("moe_no_tensor_psum", "the experts' tensor-parallel all-reduce dropped",
             "jaxmp/experts.py", "    if tensor_axes:\n        y = jax.lax.psum(y, tensor_axes)\n",
             "", ("tests/test_moe.py", "-k", "dropless or capacity")),
    Mutation("moe_stats_last_layer", "routing statistics of the last layer only",
             "jaxmp/models/moe.py", "h[..., d:] + stats[:, None, :].astype(h.dtype)",
             "0 * h[..., d:] + stats[:, None, :].astype(h.dtype)",
             ("tests/test_moe.py", "-k", "statistics")),
    Mutation("moe_mixtral_w1_w3", "Mixtral's w1 (gate) and w3 (up) swapped on import",
             "jaxmp/models/moe_hf.py", '("w1", "w3", "w2")', '("w3", "w1", "w2")',
             ("tests/test_moe_hf.py", "-k", "logits")),
    Mutation("moe_qk_norm_skipped", "Qwen3's per-head query/key norms not applied",
             "jaxmp/models/llama.py", "        if self.q_norm is not None:\n",
             "        if False:\n", ("tests/test_moe_hf.py", "-k", "logits")),
    Mutation("moe_metric_dropped", "aux_loss never reaches the metrics file",
             "jaxmp/run/hooks.py",
             'EXTRA_METRICS = ("aux_loss", "router_z_loss", "dropped_fraction")',
             'EXTRA_METRICS = ("router_z_loss", "dropped_fraction")',
             ("tests/test_moe.py", "-k", "router_metrics")),
    # context parallelism (issue 28)
    Mutation("ctx_zigzag_one_device", "device 0 holds its two zig-zag chunks swapped",
             "jaxmp/context.py",
             "np.concatenate([chunks[i], chunks[2 * c - 1 - i]])",
             "np.concatenate([chunks[i], chunks[2 * c - 1 - i]][::-1 if i == 0 else 1])",
             ("tests/test_context.py", "-k", "zigzag")),
    Mutation("ctx_no_rescale", "online softmax: the running output not rescaled by a new max",
             "jaxmp/context.py", "acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv",
             "acc = acc + pv", ("tests/test_context.py", "-k", "plain_attention")),
    Mutation("ctx_mask_off_by_a_chunk", "causal mask offset by one local block",
             "jaxmp/context.py", "mask = kpos[None, :] <= qpos[..., :, None]\n",
             "mask = kpos[None, :] <= qpos[..., :, None] + qpos.shape[-1]\n",
             ("tests/test_context.py", "-k", "plain_attention")),
    Mutation("ctx_grads_not_home", "ring backward: the last block's key/value gradients stay",
             "jaxmp/context.py", "    dkv = _shift(dkv, axes, c)  # the last block",
             "    dkv = dkv  # the last block", ("tests/test_context.py", "-k", "plain_attention")),
    Mutation("ctx_skip_visible_block", "a partly visible key block skipped",
             "jaxmp/context.py", "return jnp.min(kpos) <= jnp.max(qpos)",
             "return jnp.max(kpos) <= jnp.max(qpos)",
             ("tests/test_context.py", "-k", "plain_attention")),
    Mutation("ctx_allgather_positions", "all-gather attention: the keys' positions not gathered",
             "jaxmp/context.py", "pos, gather(pos, 0), c)", "pos, jnp.tile(pos, c), c)",
             ("tests/test_context.py", "-k", "plain_attention")),
    Mutation("ctx_targets_not_permuted", "the zig-zag order applied to inputs, not targets",
             "jaxmp/models/decoder.py", "return inputs[:, order], targets[:, order], order",
             "return inputs[:, order], targets, order",
             ("tests/test_context.py", "-k", "layouts or zigzag_order")),
    Mutation("ctx_rope_storage_order", "rotary positions of the storage order, not the tokens'",
             "jaxmp/models/llama.py",
             "return positions, (jnp.arange(t) if positions is None else positions)[None, :]",
             "return positions, jnp.arange(t)[None, :]",
             ("tests/test_context.py", "-k", "zigzag_order")),
    Mutation("ctx_cache_local_max", "split KV cache: partial softmaxes merged without the max",
             "jaxmp/context.py", "m_all = jax.lax.pmax(m, axes)", "m_all = m",
             ("tests/test_context.py", "-k", "cache_split")),
    Mutation("sched_wrong_slot", "1F1B backward reads the next slot of the kept inputs",
             "jaxmp/scheduled.py", "store, forward_index(mb, j, p, r) % store.shape[0]",
             "store, (forward_index(mb, j, p, r) + 1) % store.shape[0]",
             ("tests/test_scheduled.py", "-m", "not slow")),
    Mutation("sched_cooldown_dropped", "1F1B: the last cool-down tick (its weight gradients) "
             "not run", "jaxmp/scheduled.py",
             "return first_backward(p, r), r * m + p - 1, num_ticks(p, m, r)",
             "return first_backward(p, r), r * m + p - 1, num_ticks(p, m, r) - 1",
             ("tests/test_scheduled.py", "-m", "not slow")),
    Mutation("sched_warmup_off_by_one", "1F1B: the first backward one tick late",
             "jaxmp/scheduled.py", "    return r * p - 1\n", "    return r * p\n",
             ("tests/test_scheduled.py", "-m", "not slow")),
    Mutation("sched_tail_every_tick", "1F1B: the loss counted for items not leaving the last "
             "round", "jaxmp/scheduled.py", "last = valid_l & (jl == r - 1)", "last = valid_l",
             ("tests/test_scheduled.py", "-m", "not slow")),
    Mutation("compare_ratio_inverted", "side-by-side bench: the train-step ratio the wrong "
             "way up (time over time)", "experiments/bench/compare.py",
             'out = {"train step": self.step_s("torch") / self.step_s("jaxmp")}',
             'out = {"train step": self.step_s("jaxmp") / self.step_s("torch")}',
             ("tests/test_compare.py",)),
    Mutation("search_no_1f1b", "the planner's search never tries the 1f1b schedule",
             "jaxmp/plan/search.py", 'return ("gpipe", "1f1b", "zb")', 'return ("gpipe", "zb")',
             ("tests/test_plan.py", "-k", "1f1b")),
    Mutation("search_no_zb", "the planner's search never tries the zb schedule",
             "jaxmp/plan/search.py", 'return ("gpipe", "1f1b", "zb")', 'return ("gpipe", "1f1b")',
             ("tests/test_plan.py", "-k", "candidates")),
    Mutation("zb_residual_slot", "zb: B reads the next micro-batch's residuals",
             "jaxmp/zerobubble.py", "get(next(kept), i)", "get(next(kept), i + 1)",
             ("tests/test_zerobubble.py", "-m", "not slow")),
    Mutation("zb_w_dropped", "zb: the deferred weight gradients are computed, never added",
             "jaxmp/zerobubble.py", 'return dict(st, gw=add(st["gw"], dw)), zero_h, zero_h',
             "return st, zero_h, zero_h", ("tests/test_zerobubble.py", "-m", "not slow")),
    Mutation("zb_b_has_dw", "the split backward also gives the GEMM weights their gradient "
             "(W then adds it again)", "jaxmp/wgrad.py", "return dx, None, x, g",
             "return dx, jax.linear_transpose(lambda a: jax.lax.dot_general(x, a.astype(dtype), "
             "dims), w)(g)[0], x, g", ("tests/test_zerobubble.py", "-m", "not slow")),
    Mutation("zb_arrival_same_stage", "zb: a forward output filed on the sending stage",
             "jaxmp/zerobubble.py", "from_prev[t, s + 1] = i", "from_prev[t, s] = i",
             ("tests/test_zerobubble.py", "-m", "not slow")),
    Mutation("zb_loss_unscaled", "zb: the tail's output gradient not divided by the rows",
             "jaxmp/zerobubble.py", "jnp.full_like(losses, 1.0 / self.total)",
             "jnp.full_like(losses, 1.0)", ("tests/test_zerobubble.py", "-k", "quick")),
    Mutation("fused_lse_local", "fused loss: the log-sum-exp's sum not reduced over the "
             "vocabulary's axes", "jaxmp/fused_loss.py",
             "jnp.log(_psum(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1), va))",
             "jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))",
             ("tests/test_fused_loss.py",)),
    Mutation("fused_dw_unreduced", "fused loss: the weight gradient not summed over the batch "
             "and length axes", "jaxmp/fused_loss.py", "return total, rows, dx, _psum(dw, ba + la)",
             "return total, rows, dx, dw", ("tests/test_fused_loss.py",)),
    Mutation("fused_padding_unmasked", "fused loss: the padded vocabulary entries left in the "
             "softmax", "jaxmp/fused_loss.py",
             "logits = jnp.where(ids < vocab_size, logits, NEG_INF)", "logits = logits",
             ("tests/test_fused_loss.py",)),
    Mutation("fused_no_row_mean", "fused loss: the gradient misses the row mean's 1/T",
             "jaxmp/fused_loss.py", "- hit) / length).astype(dtype)", "- hit)).astype(dtype)",
             ("tests/test_fused_loss.py",)),
    Mutation("fused_bwd_ignores_g", "fused loss: the backward pass ignores the loss's scale",
             "jaxmp/fused_loss.py", "return (dx * g.astype(dx.dtype), dw * g, None)",
             "return (dx, dw, None)", ("tests/test_fused_loss.py",)),
    Mutation("fused_vocab_offset", "fused loss: every vocabulary slice thinks it starts at 0",
             "jaxmp/fused_loss.py", "offset = jax.lax.axis_index(va) * v if va else 0",
             "offset = 0", ("tests/test_fused_loss.py",)),
    Mutation("fused_flag_ignored", "--fused_loss never reaches the model (always unfused)",
             "jaxmp/models/decoder.py", 'if not getattr(cfg, "fused_loss", False) or',
             "if True or",
             ("tests/test_fused_loss.py",)),
    Mutation("fp8_grad_e4m3", "FP8: the output gradient quantised to E4M3, not E5M2",
             "jaxmp/fp8.py", "qg, sg = quantize(g, E5M2)", "qg, sg = quantize(g, E4M3)",
             ("tests/test_fp8.py",)),
    Mutation("fp8_scale_inverted", "FP8: the scale is max(format) / amax", "jaxmp/fp8.py",
             "return jnp.where(amax > 0, amax / jnp.finfo(fmt).max.astype(jnp.float32), 1.0)",
             "return jnp.where(amax > 0, jnp.finfo(fmt).max.astype(jnp.float32) / amax, 1.0)",
             ("tests/test_fp8.py",)),
    Mutation("fp8_never_on", "FP8: the weight GEMMs never take the FP8 path", "jaxmp/wgrad.py",
             "    if fp8.active():", "    if False:", ("tests/test_fp8.py",)),
    Mutation("fp8_loss_default", "--matmul_precision never reaches the loss's trace",
             "jaxmp/models/decoder.py",
             'with fp8.matmuls(getattr(model.cfg, "matmul_precision", "default")):',
             'with fp8.matmuls("default"):', ("tests/test_fp8.py",)),
    Mutation("fp8_bwd_weight_unquantised", "FP8: the backward pass uses the weight's codes "
             "without their scale", "jaxmp/fp8.py",
             "xd, wd = dequantize(qx, sx, dtype), dequantize(qw, sw, dtype)",
             "xd, wd = dequantize(qx, sx, dtype), qw.astype(dtype)", ("tests/test_fp8.py",)),
)


def scratch_copy() -> str:
    """A copy of the working tree (no .git, no runs/), in a temporary directory."""
    dst = tempfile.mkdtemp(prefix="jaxmp-mutant-")
    ignore = shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache",
                                    ".ruff_cache")
    shutil.copytree(ROOT, dst, dirs_exist_ok=True, ignore=ignore)
    return dst


def apply(m: Mutation, root: str) -> None:
    path = os.path.join(root, m.path)
    with open(path) as f:
        text = f.read()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name}: the code to replace occurs {text.count(m.old)} "
                         f"times in {m.path} (expected once); update tests/mutations.py")
    text = text.replace(m.old, m.new)
    ast.parse(text)  # a mutation must stay valid Python
    with open(path, "w") as f:
        f.write(text)


def run(m: Mutation) -> dict:
    root = scratch_copy()
    try:
        apply(m, root)
        env = {**os.environ, "PYTHONPATH": root, "PYTHONUNBUFFERED": "1"}
        env.pop("XLA_FLAGS", None)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               *m.tests], cwd=root, env=env, capture_output=True, text=True,
                              timeout=1800)
        secs = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    status = {1: "caught", 0: "MISSED"}.get(proc.returncode, f"broken (pytest exit {proc.returncode})")
    return {"name": m.name, "what": m.what, "status": status, "seconds": secs,
            "by": failed[0] if failed else "", "tail": proc.stdout[-1500:]}


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for m in MUTATIONS:
            print(f"{m.name:26s} {m.what}")
        return 0
    chosen = [m for m in MUTATIONS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"error: unknown mutation(s) {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    rows = []
    for m in chosen:
        r = run(m)
        rows.append(r)
        print(f"{r['name']:26s} {r['status']:8s} {r['seconds']:6.0f} s  {r['by']}", flush=True)
        if r["status"] != "caught":
            print(r["tail"], flush=True)
    print("\n| mutation | planted bug | result | caught by |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['name']}` | {r['what']} | {r['status']} | `{r['by']}` |")
    return 0 if all(r["status"] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
