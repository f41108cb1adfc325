"""The checks a run passes before anything is computed: the paths it will write, the
checkpoint directory's place, the profile's length, the same flags on every process, the
sequence a context axis splits."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from jaxmp import rundir
from jaxmp.config import RunConfig
from jaxmp.run.console import check_writable

PROFILE_STEPS = 5  # a profiled run must take this many steps for the trace to close


def paths(cfg: RunConfig) -> None:
    """Files the run will write, checked before anything is computed or created."""
    if not cfg.checkpoint.ckpt_dir and jax.process_count() > 1:
        raise ValueError("a multi-process run needs ckpt_dir, on storage every process can reach")
    if cfg.log.metrics_file:
        check_writable(cfg.log.metrics_file, "metrics_file", directory=False)
    if cfg.log.profile_dir:
        check_writable(cfg.log.profile_dir, "profile_dir", directory=True)
    if cfg.checkpoint.ckpt_dir:
        check_writable(cfg.checkpoint.ckpt_dir, "ckpt_dir", directory=True)
        if cfg.model.init_from and (os.path.abspath(cfg.model.init_from)
                                    == os.path.abspath(cfg.checkpoint.ckpt_dir)):
            raise ValueError("init_from and ckpt_dir are the same directory; to continue that "
                             "run use --ckpt_dir alone (it resumes), else give a new ckpt_dir")
        ckpt_dir(cfg.checkpoint.ckpt_dir)
    from jaxmp.run import loggers

    loggers.check(cfg)
    if cfg.demo.serve_mesh:
        from jaxmp.mesh import parse_mesh

        parse_mesh(cfg.demo.serve_mesh, None)  # the axes and sizes; the device count later


def last_complete(directory: str) -> str:
    """The newest complete checkpoint step in a run directory, read from the file system
    alone (a peer is lost: no collective can run)."""
    from jaxmp.checkpoint import TMP_MARK

    steps = sorted(int(e) for e in os.listdir(directory)
                   if e.isdigit() and TMP_MARK not in e)
    return f"step {steps[-1]} in {directory}" if steps else f"none yet in {directory}"


def profile(cfg: RunConfig, start: int) -> None:
    """--profile_dir traces the run's third to fifth steps (after compilation)."""
    end = min(cfg.steps, cfg.run_until) if cfg.run_until else cfg.steps
    if cfg.log.profile_dir and end - start < PROFILE_STEPS:
        raise ValueError(f"profile_dir={cfg.log.profile_dir}: the trace covers this run's steps "
                         f"3 to 5, but it takes {end - start}; train at least "
                         f"{PROFILE_STEPS} steps, or drop --profile_dir")


def ckpt_dir(path: str) -> None:
    """A checkpoint directory is a run's own: not a Hugging Face model, not a place inside
    another run (one of its step directories, or below its files)."""
    from jaxmp.hf import is_hf_directory

    if is_hf_directory(path):
        raise ValueError(f"ckpt_dir={path} is a Hugging Face model directory; start from it "
                         "with --init_from and give a new --ckpt_dir for the run")
    here = os.path.abspath(path)
    parent = os.path.dirname(here)
    while parent != here:
        if os.path.isfile(os.path.join(parent, rundir.CONFIG_JSON)) or (
                os.path.basename(here).isdigit()
                and os.path.isdir(os.path.join(parent, os.path.basename(here), "meta"))):
            raise ValueError(f"ckpt_dir={path} is inside the run directory {parent}; resume that "
                             "run with --ckpt_dir=" + parent + ", or give a directory of its own")
        here, parent = parent, os.path.dirname(parent)


def same_flags(cfg: RunConfig) -> None:
    """Every process of a multi-process job must run the same configuration."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils

    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
    every = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
    differ = [i for i, d in enumerate(every) if d != every[0]]
    if differ:
        raise ValueError(f"process {differ[0]} was started with other training flags than "
                         "process 0; start every process with the same flags")


def context(mesh: Any, model_cfg: Any, family: str) -> None:
    """A `context` axis needs a sequence model whose length splits into 2 x context equal
    chunks (the zig-zag layout that balances the causal work)."""
    c = mesh.shape.get("context", 1)
    if c == 1:
        return
    t = getattr(model_cfg, "seq_len", None)
    if t is None:
        raise ValueError(f"mesh axis context={c} splits a sequence, and the {family} family has "
                         "none; drop context from --mesh")
    if t % (2 * c):
        raise ValueError(f"seq_len={t} does not split into 2 x context = {2 * c} equal chunks "
                         f"(the load-balanced causal layout); use a seq_len divisible by {2 * c}")


def schedule(pipe: Any, mesh: str) -> None:
    """A pipeline schedule other than gpipe needs pipeline stages to schedule."""
    if not pipe.enabled and pipe.schedule != "gpipe":
        raise ValueError(f"--pipeline_schedule={pipe.schedule} schedules pipeline stages, and "
                         f"--mesh={mesh or '(none)'} has no pipe axis; add pipe:N to --mesh or "
                         "drop the flag")


def zero_bubble_fp8(pipe: Any, model_cfg: Any) -> None:
    """zb's split backward runs the weight GEMMs through its own taps, not FP8's: refused
    rather than silently run in higher precision."""
    if pipe.enabled and pipe.schedule == "zb" \
            and getattr(model_cfg, "matmul_precision", "default") == "fp8":
        raise ValueError("--matmul_precision=fp8 does not run with --pipeline_schedule=zb (its "
                         "split backward pass would compute the GEMMs at full precision); use "
                         "--pipeline_schedule=1f1b or gpipe, or --matmul_precision=default")


def zero_bubble_context(pipe: Any, mesh: Any, context_attention: str) -> None:
    """zb with ring attention over a context axis is refused: the ring's collective-permutes
    would run inside the per-device switch, where stages take different branches (measured
    wrong on XLA's CPU backend; all-gathers and all-reduces there are fine)."""
    if pipe.enabled and pipe.schedule == "zb" and mesh.shape.get("context", 1) > 1 \
            and context_attention == "ring":
        raise ValueError("--pipeline_schedule=zb with a context axis needs "
                         "--context_attention=allgather (ring attention's permutes cannot run "
                         "inside its per-stage switch); or use --pipeline_schedule=1f1b")
