"""The resume policy: which checkpoint a run continues from, what it refuses (another
model, other settings unless allowed, steps it would overwrite), and the state restored."""

from __future__ import annotations

import os
import time

import jax

from jaxmp import rundir
from jaxmp.checkpoint import CheckpointError, CheckpointRecord
from jaxmp.config import RunConfig
from jaxmp.run.build import Run
from jaxmp.run.console import log
from jaxmp.train import TrainState


def resume_plan(run: Run) -> int | None:
    """The step to resume from, or None to start anew; whatever the checkpoints already in
    the directory rule out is an error here, before any compute. Checkpoints are deleted
    only on an explicit --overwrite."""
    ck, ckpts = run.cfg.checkpoint, run.ckpts
    steps, where = ckpts.steps(), f"ckpt_dir={ckpts.directory}"
    if not steps:
        if ck.resume or ck.resume_step is not None:
            raise ValueError(f"{where} holds no checkpoint to resume; check the path, or drop "
                             "--resume / --resume_step to start a new run")
        return None
    if ck.resume is False:
        if not ck.overwrite:
            raise ValueError(f"{where} holds checkpoints of an earlier run (steps {steps}); "
                             "starting over would delete them: resume it, use another "
                             "--ckpt_dir, or add --overwrite to delete them")
        log(f"--overwrite: deleting the checkpoints of an earlier run in {ckpts.directory}: "
            f"steps {steps}")
        ckpts.delete(steps)
        return None
    step = steps[-1] if ck.resume_step is None else ck.resume_step
    _check_resumable(run, steps, step)
    return step


def _check_resumable(run: Run, steps: list[int], step: int) -> None:
    ck, cfg, ckpts = run.cfg.checkpoint, run.cfg, run.ckpts
    where = f"ckpt_dir={ckpts.directory}"
    if step not in steps:
        raise ValueError(f"resume_step={step}: {where} has no checkpoint for it; steps: {steps}")
    later = [s for s in steps if s > step]
    if later and not ck.overwrite:
        raise ValueError(f"resume_step={step}: {where} also holds later steps {later}, which "
                         "this run would overwrite; add --overwrite to delete them")
    if step > cfg.steps:
        raise ValueError(f"{where} is at step {step}, past steps={cfg.steps}; raise --steps to "
                         "train on, or use another --ckpt_dir")
    saved = ckpts.record(step)
    shape, dtype, notes = _model_changes(saved, run.record, cfg)
    if shape:
        raise ValueError(f"{where} step {step} holds another model: {'; '.join(shape)}; use "
                         "the model flags it was trained with, or another --ckpt_dir")
    refused = dtype
    if saved.run_config is not None:
        more, notes2 = rundir.config_changes(saved.run_config, cfg, step)
        refused, notes = refused + more, notes + notes2
    if refused:
        names = ",".join(line.split(":")[0] for line in refused)
        raise ValueError(
            f"{where} step {step} was trained with other settings; resuming would change "
            f"{'; '.join(refused)}. Resume with its flags (--flagfile="
            f"{os.path.join(ckpts.directory, rundir.FLAGFILE)}), allow the change with "
            f"--allow_config_change={names}, or use another --ckpt_dir")
    run.notes = notes
    if cfg.run_until is not None and cfg.run_until <= step:
        raise ValueError(f"run_until={cfg.run_until} is not after the checkpoint's step {step}")
    if later:
        log(f"--overwrite: deleting steps {later}, after --resume_step={step}")
        ckpts.delete(later)


# Model settings that change neither the parameters nor the arithmetic: free on resume.
FREE_MODEL = ("remat", "attention", "scan_layers", "fused_loss", "loss_chunk")


def _model_changes(saved: CheckpointRecord, now: CheckpointRecord,
                   cfg: RunConfig) -> tuple[list[str], list[str], list[str]]:
    """Model settings that differ from the checkpoint's, one line each: (shape: refused,
    the saved parameters are another model's; dtype: refused unless
    --allow_config_change names it; notes: allowed changes)."""
    if saved.family != now.family:
        return [f"model: {saved.family!r} in the checkpoint, {now.family!r} now"], [], []
    shape, dtype, notes = [], [], []
    allowed = rundir.parse_allowed(cfg.checkpoint.allow_config_change)
    for key in sorted(set(saved.config) | set(now.config)):
        was, new = saved.config.get(key), now.config.get(key)
        if was == new or key in FREE_MODEL:
            continue
        if key == "matmul_precision":  # the parameters are the same: allowed, said
            if (was or "default") != (new or "default"):  # (older records lack the key)
                notes.append(f"matmul_precision {was or 'default'!r} -> {new or 'default'!r}")
        elif key == "dtype" and "dtype" in allowed:
            notes.append(f"dtype {was!r} -> {new!r} (allowed by --allow_config_change)")
        elif key == "dtype":
            dtype.append(f"dtype: {was!r} in the checkpoint, {new!r} now")
        else:
            shape.append(f"{key}: {was!r} in the checkpoint, {new!r} now")
    return shape, dtype, notes


def resume_or_init(run: Run) -> TrainState:
    """The planned checkpoint (checked to be the same model) restored into this layout, or
    a new state."""
    ckpts, step = run.ckpts, run.resume_from
    if step is None and run.source is not None:
        tr = run.trainer
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            tr.abstract_params, tr.param_shardings)
        t0 = time.perf_counter()
        params = run.source.load(target, run.record.layer_order, run.model_cfg)
        log(f"initialised from {run.source.kind} {run.source.path} in "
            f"{time.perf_counter() - t0:.2f}s (fresh optimizer state)")
        return tr.state_from_params(params)
    if step is None:
        return run.trainer.init_state()
    try:
        state = ckpts.restore(run.trainer.abstract_state(), step=step,
                              layer_order=run.record.layer_order)
    except CheckpointError as e:
        earlier = [s for s in ckpts.steps() if s < step]
        hint = (f"; resume from step {earlier[-1]} with --resume_step={earlier[-1]} "
                "--overwrite" if earlier else "")
        raise CheckpointError(f"{str(e).split('; ')[0]}{hint}") from None
    log(f"resumed from {ckpts.directory} step {step} (trained on {ckpts.record(step).mesh})"
        + (f"; init_from={run.source.path} is not read" if run.source else ""))
    for note in run.notes:
        log(f"resume: {note}")
    return state
