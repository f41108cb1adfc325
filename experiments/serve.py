"""Serve a checkpoint on any mesh: greedy or sampled completions with a KV cache.

    python -m experiments.serve --ckpt_dir=runs/X --mesh=tensor:4 --prompt='def main(' \\
        --max_new_tokens=64 --temperature=0
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from experiments import flagtree
from experiments.common import parse_flags, run_guarded
from jaxmp.config import ServeConfig

flagtree.define(ServeConfig)
flags.adopt_module_key_flags(flagtree)


def main(argv: list[str]) -> int:
    return run_guarded(argv, serve)


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 file; a bad byte names the file and line."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise OSError(f"prompt_file={path}: cannot read ({e.strerror})") from None
    out = []
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt_file={path} line {n} is not UTF-8 (byte {e.start}: "
                             f"{raw[e.start:e.start + 1]!r})") from None
        if line.strip():
            out.append(line)
    return out


def _check_before_restore(cfg: ServeConfig, prompts: list[str]) -> dict | None:
    """The request against the model the directory holds (its record or config.json):
    every error before the weights are read or anything is compiled. Returns the
    tokenizer to use (--tokenizer, else the model's own)."""
    from jaxmp.pretrained import open_source
    from jaxmp.serve import check_request
    from jaxmp.tokenizer import TextCodec, read_tokenizer

    source = open_source(cfg.ckpt_dir, step=cfg.step, name="ckpt_dir")
    model_cfg = source.family.config_from_json(source.config)
    tokenizer = read_tokenizer(cfg.tokenizer) if cfg.tokenizer else source.tokenizer
    codec = TextCodec(model_cfg.vocab_size, tokenizer)
    check_request(model_cfg, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, codec)
    return tokenizer


def serve() -> None:
    """Restore, generate (once to compile, once timed), print and write the completions."""
    from jaxmp.experiment import check_writable
    from jaxmp.mesh import format_mesh
    from jaxmp.serve import Server

    cfg = flagtree.build(ServeConfig)
    if not cfg.ckpt_dir:
        raise ValueError("--ckpt_dir is required (the directory a training run wrote)")
    prompts = list(cfg.prompt) + (read_prompts(cfg.prompt_file) if cfg.prompt_file else [])
    if not prompts:
        raise ValueError("no prompt: pass --prompt=TEXT (repeatable) or --prompt_file")
    if cfg.output_file:
        check_writable(cfg.output_file, "output_file", directory=False)
    tokenizer = _check_before_restore(cfg, prompts)
    server = Server.from_checkpoint(cfg.ckpt_dir, cfg.mesh, step=cfg.step, tokenizer=tokenizer)
    what = f"step {server.step}" if server.step is not None else cfg.ckpt_dir
    print(f"restored {what} onto {format_mesh(server.mesh)} in "
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
        with open(cfg.output_file, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
