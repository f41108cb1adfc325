"""The train entry point's closing demo: the final checkpoint restored onto another mesh
(`--serve_mesh`) and a prompt completed greedily. Its settings are checked on the
prepared run, before any step (a run that trained to its end must not then fail on them).

    result = demo.train_and_serve(cfg)    # experiments.train
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxmp.config import RunConfig
from jaxmp.mesh import format_mesh
from jaxmp.run.build import Run
from jaxmp.run.console import log
from jaxmp.run.hooks import Hook
from jaxmp.run.loop import RunResult, train
from jaxmp.tokenizer import TextCodec


def check(run: Run) -> None:
    """The closing serve demo's settings, checked before training (a run that trained to
    its end must not then fail on them): the serving mesh divides the model, the prompt is
    not empty and leaves room in the context for a completion."""
    cfg, family, model_cfg, trainer = run.cfg, run.family, run.model_cfg, run.trainer
    tokenizer = run.record.tokenizer
    demo = cfg.demo
    if not (family.generates and demo.serve_mesh and jax.process_count() == 1):
        return
    from jaxmp.serve import serving_mesh
    from jaxmp.sharding import param_specs

    skip = "or --serve_mesh= to skip the closing serve demo"
    try:
        mesh = serving_mesh(demo.serve_mesh, jax.devices())
    except ValueError:
        mesh = None  # more devices than there are: the demo serves on one (and says so)
    if mesh is not None:
        try:
            param_specs(trainer.abstract_params, trainer.axes, mesh, trainer.rules)
        except ValueError as e:
            raise ValueError(f"serve_mesh={demo.serve_mesh}: {e}; choose a serving mesh that "
                             f"divides the model, {skip}") from None
    if not demo.serve_prompt.strip():
        raise ValueError(f"serve_prompt is empty; give the demo a prompt, {skip}")
    codec = TextCodec(model_cfg.vocab_size, tokenizer)
    if codec.text or demo.serve_prompt.startswith("ids:"):
        n = len(codec.encode(demo.serve_prompt))
        if n >= model_cfg.seq_len:
            raise ValueError(f"serve_prompt is {n} tokens but the model's context is seq_len="
                             f"{model_cfg.seq_len}, which leaves no room for a completion; "
                             f"shorten it, {skip}")


def train_and_serve(cfg: RunConfig, hooks: Sequence[Hook] = ()) -> RunResult:
    """What `experiments.train` does: train (the demo's settings checked first), then, if
    the run reached its last step, serve the final checkpoint (`result.completion`)."""
    generates: list[bool] = []

    def checked(run: Run) -> None:
        check(run)
        generates.append(run.family.generates)
    result = train(cfg, hooks, checks_before=[checked])
    if (generates[0] and cfg.demo.serve_mesh and not result.stopped_by
            and result.last_saved == cfg.steps and jax.process_count() == 1):
        result.completion = serve(result.ckpt_dir, cfg.demo.serve_mesh, cfg.demo.serve_prompt)
    return result


def serve(ckpt_dir: str, mesh: str, prompt: str) -> str:
    """Restore the final checkpoint on another mesh and complete a prompt greedily. A mesh
    that needs more devices than there are is replaced by one device, and the log says so."""
    from jaxmp.mesh import MeshError
    from jaxmp.serve import Server, mesh_devices

    try:
        mesh_devices(mesh, len(jax.devices()))
    except MeshError as e:
        log(f"serve demo: {e.args[0].split(';')[0]}; serving on one device instead")
        mesh = ""
    server = Server.from_checkpoint(ckpt_dir, mesh)
    if not server.codec.text and not prompt.startswith("ids:"):
        log(f"serve demo skipped: this model's {server.cfg.vocab_size}-token vocabulary has no "
            "tokenizer (pass --tokenizer to train, or serve_prompt='ids:...')")
        return ""
    new = min(48, server.cfg.seq_len - len(server.encode(prompt)))
    out = server.generate([prompt], max_new_tokens=new, temperature=0.0)[0]
    text = server.decode_text(out.tokens)
    log(f"served step {server.step} on {format_mesh(server.mesh)} "
        f"(restored in {server.restore_seconds:.2f}s); greedy completion of {prompt!r}:")
    log(prompt + text)
    return text
