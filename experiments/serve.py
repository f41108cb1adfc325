"""Serve a checkpoint on any mesh: greedy or sampled completions with a KV cache.

    python -m experiments.serve --ckpt_dir=runs/X --mesh=tensor:4 --prompt='def main(' \\
        --max_new_tokens=64 --temperature=0
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from experiments import flagtree
from experiments.common import run_guarded
from jaxmp.config import ServeConfig

flagtree.define(ServeConfig)
flags.adopt_module_key_flags(flagtree)


def main(argv: list[str]) -> int:
    return run_guarded(argv, serve)


def serve() -> None:
    """Restore, generate (once to compile, once timed), print and write the completions."""
    from jaxmp.mesh import format_mesh
    from jaxmp.serve import Server

    cfg = flagtree.build(ServeConfig)
    if not cfg.ckpt_dir:
        raise ValueError("--ckpt_dir is required (the directory a training run wrote)")
    prompts = list(cfg.prompt)
    if cfg.prompt_file:
        with open(cfg.prompt_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass --prompt=TEXT (repeatable) or --prompt_file")
    server = Server.from_checkpoint(cfg.ckpt_dir, cfg.mesh, step=cfg.step)
    print(f"restored step {server.step} onto {format_mesh(server.mesh)} in "
          f"{server.restore_seconds:.2f}s", flush=True)
    args = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                seed=cfg.seed)
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
    if cfg.output_file:
        with open(cfg.output_file, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
