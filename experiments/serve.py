"""Serve a checkpoint on any mesh: greedy or sampled completions with a KV cache.

    python -m experiments.serve --ckpt_dir=runs/X --mesh=tensor:4 --prompt='def main(' \\
        --max_new_tokens=64 --temperature=0
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from jaxmp.cli import flagtree
from jaxmp.cli.startup import parse_flags, run_guarded
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
    if not out:
        raise ValueError(f"prompt_file={path} holds no prompt (one per non-empty line)")
    return out


def _check_before_restore(cfg: ServeConfig, prompts: list[str]) -> dict | None:
    """The request against the model the directory holds (its record or config.json):
    every error before the weights are read or anything is compiled. Returns the
    tokenizer to use (--tokenizer, else the model's own)."""
    from jaxmp.pretrained import open_source
    from jaxmp.serve import check_request
    from jaxmp.tokenizer import TextCodec, read_tokenizer

    source = open_source(cfg.ckpt_dir, step=cfg.step, name="ckpt_dir")
    if not source.family.generates:
        raise ValueError(f"ckpt_dir={cfg.ckpt_dir} holds a {source.family.name} model, which "
                         "does not generate text; serve a language model (gpt, llama)")
    model_cfg = source.family.config_from_json(source.config)
    tokenizer = read_tokenizer(cfg.tokenizer) if cfg.tokenizer else source.tokenizer
    codec = TextCodec(model_cfg.vocab_size, tokenizer)
    check_request(model_cfg, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, codec)
    return tokenizer


def serve() -> None:
    """Restore, generate (once to compile, once timed), print and write the completions."""
    from jaxmp.mesh import format_mesh
    from jaxmp.run.console import check_writable
    from jaxmp.serve import Server

    cfg = flagtree.build(ServeConfig)
    if not cfg.ckpt_dir:
        raise ValueError("--ckpt_dir is required (the directory a training run wrote)")
    if cfg.http is not None:
        return serve_http(cfg)
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


def check_http(cfg: ServeConfig) -> None:
    """The HTTP settings, before anything is loaded."""
    import ipaddress
    import socket

    if not 0 < cfg.http < 65536:
        raise ValueError(f"--http={cfg.http} must be a port in 1..65535")
    for name in ("slots", "max_queue", "max_body_bytes", "decode_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)} must be >= 1")
    if cfg.prefix_cache_tokens is not None and cfg.prefix_cache_tokens < 0:
        raise ValueError(f"--prefix_cache_tokens={cfg.prefix_cache_tokens} must be >= 0 "
                         "(0: no prefix cache)")
    from jaxmp.mesh import batch_shards, parse_mesh

    sizes = parse_mesh(cfg.mesh, None)
    shards, label = batch_shards(sizes)
    if shards > 0 and cfg.slots % shards:
        raise ValueError(f"--slots={cfg.slots} must be a multiple of {label}={shards} of "
                         f"--mesh={cfg.mesh}")
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(cfg.host)).is_loopback
    except (OSError, ValueError):
        raise ValueError(f"--host={cfg.host} is not an address this machine can bind") from None
    if not loopback and not cfg.api_key and not cfg.allow_public:
        raise ValueError(f"--host={cfg.host} would serve the network without an API key; add "
                         "--api_key=KEY, or --allow_public to do it anyway")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("--http needs FastAPI and uvicorn: pip install -e '.[serve]'") from None


def listen(cfg: ServeConfig):
    """The listening socket, bound before anything is loaded: a port in use is a clear error
    now, not after minutes of loading, and a client that connects as soon as the `serving`
    line is printed waits in the backlog instead of being refused."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.http))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"--http={cfg.http}: cannot listen on {cfg.host} "
                         f"({e.strerror})") from None
    return sock


def serve_http(cfg: ServeConfig) -> None:
    """The OpenAI completions API on --host:--http until SIGTERM / Ctrl-C, which stops
    accepting, lets the requests in flight finish, and exits 0."""
    import uvicorn

    from jaxmp.engine import Engine
    from jaxmp.http import HTTPLimits, make_app
    from jaxmp.mesh import format_mesh
    from jaxmp.serve import Server
    from jaxmp.tokenizer import read_tokenizer

    check_http(cfg)
    sock = listen(cfg)
    tokenizer = read_tokenizer(cfg.tokenizer) if cfg.tokenizer else None  # None: the model's
    chat = None
    if cfg.chat_template:
        from jaxmp.chat import read_template_file
        from jaxmp.pretrained import open_source

        own = open_source(cfg.ckpt_dir, step=cfg.step, name="ckpt_dir").chat
        chat = read_template_file(cfg.chat_template, own)
    server = Server.from_checkpoint(cfg.ckpt_dir, cfg.mesh, step=cfg.step, tokenizer=tokenizer)
    engine = Engine(server, slots=cfg.slots, max_queue=cfg.max_queue, max_len=cfg.max_len,
                    decode_steps=cfg.decode_steps, prefix_cache_tokens=cfg.prefix_cache_tokens)
    t0 = time.perf_counter()
    engine.warm_up()
    engine.start()
    limits = HTTPLimits(api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes,
                        model_name=os.path.basename(os.path.abspath(cfg.ckpt_dir)), chat=chat)
    print(f"serving http://{cfg.host}:{cfg.http} ({server.family.name} on "
          f"{format_mesh(server.mesh)}, {cfg.slots} slots; compiled in "
          f"{time.perf_counter() - t0:.1f}s)", flush=True)
    import signal

    stopped: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        # uvicorn handles the signal (stop accepting, finish the requests in flight) and then
        # re-raises it to the handler it found: this one, so the exit is a clean 0
        signal.signal(sig, lambda signum, frame: stopped.append(signal.Signals(signum).name))
    try:
        uvicorn.Server(uvicorn.Config(make_app(engine, limits), log_level="warning",
                                      timeout_graceful_shutdown=None)).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    print(f"stopped{' by ' + stopped[0] if stopped else ''}: every request in flight was "
          "answered", flush=True)


def console() -> None:
    """The `jaxmp-serve` console script (pyproject's [project.scripts])."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
