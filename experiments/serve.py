"""Serve a checkpoint on any mesh: greedy or sampled completions with a KV cache.

    python -m experiments.serve --ckpt_dir=runs/X --mesh=tensor:4 --prompt='def main(' \\
        --max_new_tokens=64 --temperature=0
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from experiments.common import run_guarded

F = flags.FLAGS
flags.DEFINE_string("ckpt_dir", None, "Checkpoint directory written by experiments.train.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest complete one).")
flags.DEFINE_string("mesh", "", "Serving mesh, e.g. tensor:4 or data:2,tensor:2 ('' = 1 device).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable). Text, or 'ids:1,2,3'.")
flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("output_file", None, "JSON lines: prompt, completion, tokens.")


def main(argv: list[str]) -> int:
    return run_guarded(argv, serve)


def serve() -> None:
    """Restore, generate (once to compile, once timed), print and write the completions."""
    from jaxmp.mesh import format_mesh
    from jaxmp.serve import Server

    if not F.ckpt_dir:
        raise ValueError("--ckpt_dir is required (the directory a training run wrote)")
    prompts = list(F.prompt)
    if F.prompt_file:
        with open(F.prompt_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass --prompt=TEXT (repeatable) or --prompt_file")
    server = Server(F.ckpt_dir, F.mesh, step=F.step)
    print(f"restored step {server.step} onto {format_mesh(server.mesh)} in "
          f"{server.restore_seconds:.2f}s", flush=True)
    args = dict(max_new_tokens=F.max_new_tokens, temperature=F.temperature, top_k=F.top_k,
                seed=F.seed)
    server.generate(prompts, **args)  # compile
    t0 = time.perf_counter()
    outs = server.generate(prompts, **args)
    dt = time.perf_counter() - t0
    rows = []
    for text, out in zip(prompts, outs):
        completion = server.decode_text(out.tokens)
        print(f"--- {text!r}\n{text}{completion}")
        rows.append({"prompt": text, "completion": completion, "tokens": out.tokens})
    n = sum(len(o.tokens) for o in outs)
    print(f"{n} tokens in {dt:.3f}s: {n / dt:,.1f} tokens/s (batch {len(prompts)})")
    if F.output_file:
        with open(F.output_file, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
