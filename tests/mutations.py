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
             "return jax.tree_util.tree_map(lambda x: x / accum, (loss, grads))",
             "return loss / accum, grads",
             ("tests/test_equivalence.py", "-k", "gradients")),
    Mutation("decay_all", "weight decay on every parameter", "jaxmp/train.py",
             'return bool(meta.get("weight_decay", True)) and sum(n != "layers" for n in names) >= 2',
             "return True",
             ("tests/test_optimizer.py",)),
    Mutation("warmup_off_by_one", "warm-up one step longer", "jaxmp/train.py",
             "warm = max(0, min(self.warmup_steps, self.total_steps - 1))",
             "warm = max(0, min(self.warmup_steps + 1, self.total_steps - 1))",
             ("tests/test_optimizer.py",)),
    Mutation("no_clipping", "global-norm clipping dropped", "jaxmp/train.py",
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
             ("tests/test_equivalence.py", "-k", "state_bytes")),
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
    Mutation("gelu_exact", "erf GELU instead of GPT-2's tanh GELU", "jaxmp/layers.py",
             "_gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=True))",
             "_gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=False))",
             ("tests/test_models.py", "-k", "independent")),
    Mutation("unrolled_layer_order", "--noscan_layers applies the layers in reverse",
             "jaxmp/stack.py", "is_leaf=lambda x: isinstance(x, list)) for i in range(num)]",
             "is_leaf=lambda x: isinstance(x, list)) for i in reversed(range(num))]",
             ("tests/test_models.py", "-k", "unrolled")),
    Mutation("serve_norms_bf16", "server casts LayerNorm parameters to bf16 too",
             "jaxmp/serve.py", "return x if f32 else x.astype(dtype)", "return x.astype(dtype)",
             ("tests/test_models.py", "-k", "serving_params")),
    Mutation("stage_weights_replicated", "pipeline stage weights replicated over pipe",
             "jaxmp/sharding.py", '"length": ("pipe", "tensor"), "layers": "pipe", "stage": "pipe",\n'
             '            "kv_heads": "tensor"},',
             '"length": ("pipe", "tensor"), "layers": "pipe",\n            "kv_heads": "tensor"},',
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
             "jaxmp/experiment.py",
             "source = validation_source(cfg.data.data, cfg.eval.eval_data)",
             "source = cfg.data.data",
             ("tests/test_finetune.py", "-k", "finetune_on")),

    Mutation("engine_slot_zero", "every prefill writes its cache rows into slot 0",
             "jaxmp/engine.py", "at = (0, slots[g], 0, 0, 0)", "at = (0, 0, 0, 0, 0)",
             ("tests/test_http.py", "-k", "sixteen")),
    Mutation("echo_logprob_shift", "prompt log-probabilities scored against the wrong token",
             "jaxmp/engine.py", "nxt = jnp.roll(tokens, -1, axis=1)", "nxt = tokens",
             ("tests/test_http.py", "-k", "echo")),

    Mutation("replica_grads_summed", "accumulated data replicas' gradients summed, not averaged",
             "jaxmp/train.py",
             "return jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), (loss, grads))",
             "return jnp.mean(loss), jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), grads)",
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
             "experiments/plan.py",
             'RING_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n,',
             'RING_FACTOR = {"all-reduce": lambda n: (n - 1) / n,',
             ("tests/test_plan.py", "-k", "ring")),
    Mutation("link_stride", "planner maps an axis to hosts ignoring its stride",
             "experiments/plan.py",
             "    group = ids[tuple(slice(None) if a in over else 0 for a in names)].reshape(-1)",
             "    group = np.arange(math.prod(mesh[a] for a in over))",
             ("tests/test_plan.py", "-k", "nvlink")),
    Mutation("depth_extrapolation", "reduced-depth plan interpolates from the wrong end",
             "experiments/plan.py",
             "        w = (layers - self.layers) / (other.layers - self.layers)",
             "        w = (layers - other.layers) / (other.layers - self.layers)",
             ("tests/test_plan.py", "-k", "linear or shallow")),
    Mutation("search_fit_on_state", "search judges a fit on the state alone",
             "experiments/plan.py",
             "        return self.spare_bytes >= 0",
             "        return self.target.memory_bytes >= self.params_bytes + self.opt_bytes",
             ("tests/test_plan.py", "-k", "search")),
    Mutation("chunk_mask", "chunked attention's causal mask ignores the block's start",
             "jaxmp/layers.py",
             "        pos = start + jnp.arange(c)",
             "        pos = jnp.arange(c)",
             ("tests/test_models.py", "-k", "chunked")),
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
