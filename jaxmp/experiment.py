"""A training run end to end: config tree -> (validated) run -> steps, logs, checkpoints.

    run = prepare(cfg)        # every check before any compute: family, mesh, layout, data
    state = resume_or_init(run)
    loop: step -> queue metrics -> checkpoint / log (each a small part below)

experiments/train.py turns flags into a RunConfig (jaxmp.config) and calls `train(cfg)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxmp import budget, rundir, throughput
from jaxmp.checkpoint import CheckpointError, CheckpointRecord, Checkpoints, remove_leftovers
from jaxmp.config import LayoutConfig, RunConfig
from jaxmp.data import is_byte_source, validation_source
from jaxmp.distributed import DistributedError, PeerWatch
from jaxmp.mesh import format_mesh, make_mesh
from jaxmp.models import registry
from jaxmp.models.registry import Batches, Family
from jaxmp.pipeline import PipelineSpec, bubble_fraction, stage_layers
from jaxmp.pretrained import Source, open_source
from jaxmp.sharding import DEFAULT_RULES, Rules, parse_rule_overrides
from jaxmp.tokenizer import TextCodec, read_tokenizer
from jaxmp.train import Trainer, TrainState


class PeerLost(DistributedError):
    """Another process of the job stopped: this one cannot go on."""
    peer_lost = True  # the entry point exits at once (JAX's shutdown would wait for it)


class NonFiniteLoss(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


def log(msg: str) -> None:
    """Progress lines come from process 0 only. A reader that has gone away (the launcher
    killed, a closed pipe) must not stop the run before it checkpoints: output then goes
    nowhere."""
    if jax.process_index() == 0:
        try:
            print(msg, flush=True)
        except (BrokenPipeError, OSError):
            sys.stdout = open(os.devnull, "w")


# ---------------------------------------------------------------- the run, prepared
@dataclasses.dataclass
class Run:
    """Everything a run needs, built and validated before any step is compiled."""
    cfg: RunConfig
    family: Family
    model_cfg: Any
    mesh: Mesh
    pipeline: PipelineSpec
    trainer: Trainer
    batches: Batches
    ckpts: Checkpoints
    record: CheckpointRecord
    resume_from: int | None = None  # the checkpoint step to resume from (None: start anew)
    created_dir: bool = False       # the checkpoint directory is this run's own
    source: Source | None = None    # pretrained weights to start from (--init_from)
    eval_batches: Batches | None = None  # the validation split (--eval_every)
    lock: rundir.RunLock | None = None   # the run directory's writer lock (process 0)
    notes: list[str] = dataclasses.field(default_factory=list)  # what a resume changes


def build_rules(layout: LayoutConfig) -> Rules:
    activations = parse_rule_overrides(layout.activation_rules)
    if layout.sequence_parallel:  # (RunConfig.validate checks it agrees with the rules)
        activations["sequence"] = ("tensor",)
    return DEFAULT_RULES.override(params=parse_rule_overrides(layout.rules),
                                  activations=activations)


def model_config(cfg: RunConfig) -> tuple[Family, Any]:
    """The family and its config, from the model section (family modules imported first)
    or from the weights --init_from names."""
    family, model_cfg, _ = _model(cfg)
    return family, model_cfg


def _model(cfg: RunConfig) -> tuple[Family, Any, Source | None]:
    registry.import_modules(cfg.model.family_module)
    if not cfg.model.init_from:
        family = registry.get(cfg.model.family)
        return family, family.make_config(cfg.model, cfg.data.data), None
    source = open_source(cfg.model.init_from)
    if cfg.model.model and cfg.model.model != source.family.name:
        raise ValueError(f"model={cfg.model.model} but init_from={cfg.model.init_from} holds a "
                         f"{source.family.name} model; drop --model")
    return source.family, source.model_config(cfg.model), source


def _chat(cfg: RunConfig, source: Source | None) -> dict | None:
    """The chat template the run's checkpoints carry: --tokenizer's directory's (its
    tokenizer_config.json or chat_template.jinja), else the pretrained model's."""
    from jaxmp.chat import read_chat

    path = cfg.data.tokenizer
    own = read_chat(path) if path and os.path.isdir(path) else None
    return own or (source.chat if source else None)


def _tokenizer(cfg: RunConfig, source: Source | None, model_cfg: Any) -> dict | None:
    """The tokenizer the run's checkpoints carry: --tokenizer, else the tokenizer.json
    beside the data (experiments.prepare writes one), else the pretrained model's."""
    path = cfg.data.tokenizer
    if path is None and not is_byte_source(cfg.data.data):
        beside = os.path.join(os.path.dirname(os.path.abspath(cfg.data.data)), "tokenizer.json")
        path = beside if os.path.isfile(beside) else None
    tokenizer = read_tokenizer(path) if path else (source.tokenizer if source else None)
    if tokenizer is not None and hasattr(model_cfg, "vocab_size"):
        TextCodec(model_cfg.vocab_size, tokenizer)  # no larger than the model's vocabulary
    return tokenizer


def layout(cfg: RunConfig, family: Family, model_cfg: Any, devices: Any = None,
           ) -> tuple[Mesh, PipelineSpec, Rules]:
    """Mesh (over `devices`, default all), pipeline and rules of the layout section,
    checked against the model."""
    mesh = make_mesh(cfg.layout.mesh, devices)
    pipe = PipelineSpec(mesh.shape["pipe"], cfg.layout.microbatches, cfg.layout.pipeline_repeats,
                        fsdp_gather_once=cfg.layout.pipeline_fsdp_gather_once)
    if pipe.enabled:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        per_shard = cfg.data.batch_size // max(1, cfg.optimizer.grad_accum_steps) // shards
        pipe.validate(model_cfg.num_layers, per_shard, family.layers_name)
    return mesh, pipe, build_rules(cfg.layout)


def make_trainer(cfg: RunConfig, family: Family, model_cfg: Any, mesh: Mesh,
                 pipe: PipelineSpec, rules: Rules) -> Trainer:
    """The run's Trainer: the family's model in this layout, its loss, the run's optimizer."""
    seed = cfg.data.seed
    return Trainer(lambda: family.build(model_cfg, pipe, nnx.Rngs(seed)), family.loss, mesh,
                   rules=rules, optimizer=cfg.optimizer_config(), seed=seed,
                   shard_state=cfg.layout.shard_state)


def _check_paths(cfg: RunConfig) -> None:
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
        _check_ckpt_dir(cfg.checkpoint.ckpt_dir)
    if cfg.demo.serve_mesh:
        from jaxmp.mesh import parse_mesh

        parse_mesh(cfg.demo.serve_mesh, None)  # the axes and sizes; the device count later


def _last_complete(directory: str) -> str:
    """The newest complete checkpoint step in a run directory, read from the file system
    alone (a peer is lost: no collective can run)."""
    from jaxmp.checkpoint import TMP_MARK

    steps = sorted(int(e) for e in os.listdir(directory)
                   if e.isdigit() and TMP_MARK not in e)
    return f"step {steps[-1]} in {directory}" if steps else f"none yet in {directory}"


def _check_profile(cfg: RunConfig, start: int) -> None:
    """--profile_dir traces the run's third to fifth steps (after compilation)."""
    end = min(cfg.steps, cfg.run_until) if cfg.run_until else cfg.steps
    if cfg.log.profile_dir and end - start < Profiler.STEPS:
        raise ValueError(f"profile_dir={cfg.log.profile_dir}: the trace covers this run's steps "
                         f"3 to 5, but it takes {end - start}; train at least "
                         f"{Profiler.STEPS} steps, or drop --profile_dir")


def _check_ckpt_dir(path: str) -> None:
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


def check_writable(path: str, name: str, *, directory: bool) -> None:
    """`path` is (or can be created as) a writable directory / file."""
    if os.path.exists(path):
        if directory != os.path.isdir(path):
            kind = "a directory" if directory else "a file"
            raise ValueError(f"{name}={path} exists and is not {kind}")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{name}={path} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while directory and not os.path.exists(parent):  # directories are created with parents
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"{name}={path} cannot be created: {parent} is not a writable directory")


def prepare(cfg: RunConfig) -> Run:
    """Validate everything and build the run (no step is compiled yet). What the run will
    write is checked first; the checkpoint directory is created last, and removed again if
    the checkpoints in it rule the run out."""
    cfg.validate()
    check_same_flags(cfg)
    _check_paths(cfg)
    family, model_cfg, source = _model(cfg)
    if getattr(model_cfg, "attention", None) == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"attention=cudnn needs an NVIDIA GPU (this run's backend is "
                         f"{jax.default_backend()}); use auto, xla or chunked")
    mesh, pipe, rules = layout(cfg, family, model_cfg)
    seed = cfg.data.seed
    trainer = make_trainer(cfg, family, model_cfg, mesh, pipe, rules)
    budget.check_run_fits(trainer, model_cfg, cfg.data.batch_size, cfg.optimizer.grad_accum_steps)
    batches = family.batches(model_cfg, cfg.data.data, cfg.data.batch_size, seed)
    for example in batches.example().values():  # the batch splits over accumulation and data
        trainer.batch_spec(example)
    evals = _eval_batches(cfg, family, model_cfg)
    data = {"source": cfg.data.data, "seed": seed, "batch_size": cfg.data.batch_size}
    tokenizer = _tokenizer(cfg, source, model_cfg)
    _check_demo(cfg, family, model_cfg, trainer, tokenizer)
    record = CheckpointRecord.create(
        family.name, family.stack, model_cfg, mesh, rules, pipe, data,
        tokenizer=tokenizer, hf_config=source and source.hf_config,
        run_config=rundir.config_json(cfg), chat=_chat(cfg, source))
    path = cfg.checkpoint.ckpt_dir or _fresh_run_dir()
    created = not os.path.exists(path)
    lock = _lock(path)  # before anything in the directory is read, created or deleted
    try:
        ckpts = Checkpoints(path, keep=cfg.checkpoint.keep_checkpoints,
                            async_save=cfg.checkpoint.async_checkpoint)
    except BaseException:
        lock.release()
        if created and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        raise
    run = Run(cfg, family, model_cfg, mesh, pipe, trainer, batches, ckpts, record,
              created_dir=created, source=source, eval_batches=evals, lock=lock)
    try:
        run.resume_from = resume_plan(run)
        _check_profile(cfg, run.resume_from or 0)
    except BaseException:
        close_run_dir(run)
        raise
    return run


def _check_demo(cfg: RunConfig, family: Family, model_cfg: Any, trainer: Trainer,
                tokenizer: dict | None) -> None:
    """The closing serve demo's settings, checked before training (a run that trained to
    its end must not then fail on them): the serving mesh divides the model, the prompt is
    not empty and leaves room in the context for a completion."""
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


def _lock(path: str) -> rundir.RunLock:
    """The run directory's writer lock, taken by process 0; every process learns whether it
    got it (a second training on the directory fails at once, on every process)."""
    lock = rundir.RunLock(path)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except rundir.RunDirError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not int(ok) and error is None:
            error = rundir.RunDirError(f"ckpt_dir={lock.directory} is in use by another training "
                                       "(process 0 could not lock it; its error says by whom)")
    if error is not None:
        raise error
    return lock


def _eval_batches(cfg: RunConfig, family: Family, model_cfg: Any) -> Batches | None:
    """The validation batches of --eval_every (checked before anything is computed)."""
    if not cfg.eval.eval_every:
        return None
    if family.eval_batches is None:
        raise ValueError(f"eval_every={cfg.eval.eval_every}: the {family.name} family has no "
                         "validation split; leave eval_every at 0")
    source = validation_source(cfg.data.data, cfg.eval.eval_data)
    try:
        return family.eval_batches(model_cfg, source, cfg.data.batch_size, cfg.data.seed)
    except ValueError as e:  # the data module names --data; this is the validation source
        name = "eval_data" if cfg.eval.eval_data else "the validation split (beside --data)"
        raise type(e)(str(e).replace(f"data={source}", f"{name} {source}", 1)
                      if name != "eval_data" else str(e).replace("data=", "eval_data=", 1)
                      ) from None


def close_run_dir(run: Run) -> None:
    """Close the checkpoints and release the run lock; a directory this run created and
    left empty is removed."""
    try:
        run.ckpts.close()
    finally:
        path = run.ckpts.directory
        if jax.process_index() == 0:  # a save that failed (a full disk) leaves no temp dir
            remove_leftovers(path)
        if run.lock is not None:
            run.lock.release()
    if run.created_dir and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)


def _fresh_run_dir() -> str:
    """runs/<date-time>, with a suffix if that exists already."""
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}", n + 1
    return path


def check_same_flags(cfg: RunConfig) -> None:
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


def describe(run: Run) -> None:
    """The run's opening lines: model, mesh, pipeline stages, parameter plan."""
    log(f"jaxmp: {run.family.name} {json.dumps(run.model_cfg.to_json())}")
    log(f"mesh {format_mesh(run.mesh)} over {run.mesh.size} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es) x {jax.local_device_count()} local "
        "device(s)")
    p = run.pipeline
    if p.enabled:
        log(f"pipeline: {p.stages} stages, {p.microbatches} micro-batches, {p.repeats} "
            f"repeat(s); bubble fraction {bubble_fraction(p.stages, p.microbatches, p.repeats):.3f}")
        for s, layers in enumerate(stage_layers(run.model_cfg.num_layers, p)):
            log(f"  stage {s} (pipe index {s}): layers {layers}")
    log(run.trainer.plan().format())


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
FREE_MODEL = ("remat", "attention", "scan_layers")


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
        if key == "dtype" and "dtype" in allowed:
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


def _say(msg: str) -> None:
    """A line to stderr from a signal handler (os.write: no buffered-writer lock)."""
    try:
        os.write(2, msg.encode())
    except OSError:
        pass


# ---------------------------------------------------------------- parts of the loop
DUPLICATE_S = 0.3  # a second Ctrl-C sooner than this is the same request delivered twice


class StopSignal:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 0. Second: abort at once
    (orbax only ever lists fully written checkpoints, so the last complete one survives)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._at = 0.0
        self.stopping: str | None = None  # the agreed stop (see `agreed`)
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            # the same signal again within DUPLICATE_S is a duplicate (the terminal and the
            # launcher's forwarding, or the kernel's parent-death signal, deliver one each
            # within milliseconds), not a person's second request
            if time.monotonic() - self._at < DUPLICATE_S:
                return
            _say(f"second {name}: aborting now; the last complete checkpoint is kept\n")
            os._exit(128 + signum)
        # No print here: the handler can run while the main thread is inside print (a
        # re-entrant write raises); the loop logs the request when it sees it (`agreed`).
        self.requested, self._at = name, time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self) -> str | None:
        """Whether to stop after this step, as every process sees it: with several
        processes a stop any of them received (the signals arrive at slightly different
        steps) stops all of them after the same step, so their collective checkpoint
        matches. The request is read once, before the processes compare: a signal that
        arrives later counts at the next step on every process alike. The loop must act
        on this answer only (`stopping`), never on `requested`, which a handler may set
        at any moment."""
        mine = self.requested
        stop = bool(mine)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(np.asarray(multihost_utils.process_allgather(np.int32(stop))).any())
        if stop and not self.stopping:
            self.stopping = mine or "SIGTERM (another process)"
            log(f"{self.stopping} received: finishing this step, then checkpointing and exiting")
        return self.stopping


class Pending:
    """Step metrics still on the device; `check` fetches them and stops at the first
    non-finite step (whose update the train step did not apply)."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, dict]] = []
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []  # (step, validation loss)
        self.last: dict = {}

    def add(self, step: int, metrics: dict) -> None:
        self.queue.append((step, metrics))

    def check(self) -> None:
        if not self.queue:
            return
        fetched = jax.device_get([m for _, m in self.queue])
        for (s, _), m in zip(self.queue, fetched):
            if not bool(m["finite"]):
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {s} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}); the update was not applied and no "
                    "checkpoint was written from it. Lower learning_rate, or use "
                    "dtype=float32")
            self.losses.append(float(m["loss"]))
        self.queue.clear()
        self.last = fetched[-1]


class Progress:
    """Progress lines and the metrics file (DESIGN.md's keys), from process 0."""

    def __init__(self, run: Run, start: int):
        self.run, self.steps = run, run.cfg.steps
        self.t_last, self.step_last, self.start = time.perf_counter(), start, start
        fpt = run.family.flops_per_token
        self.flops_per_token = fpt(run.model_cfg) if fpt else None
        self.path = run.cfg.log.metrics_file
        self.file = None
        if self.path and jax.process_index() == 0:
            try:
                self.file = open(self.path, "a")
            except OSError as e:
                raise OSError(f"metrics_file={self.path}: cannot open ({e.strerror})") from None

    def report(self, done: int, m: dict, eval_loss: float | None = None) -> None:
        now = time.perf_counter()
        dt = (now - self.t_last) / max(1, done - self.step_last)
        self.t_last, self.step_last = now, done
        tps = self.run.batches.tokens_per_step / dt
        util = (throughput.mfu(tps, self.flops_per_token, self.run.mesh.size)
                if self.flops_per_token else None)
        log(f"step {done:6d}/{self.steps}  loss {float(m['loss']):.4f}  "
            f"grad_norm {float(m['grad_norm']):.3f}  lr {float(m['learning_rate']):.2e}  "
            f"{tps:,.0f} {self.run.batches.unit}/s  {dt * 1e3:.1f} ms/step  "
            f"ETA {dt * (self.steps - done):.0f}s"
            + (f"  MFU {util:.1%}" if util is not None else "")
            + (f"  eval_loss {eval_loss:.4f}" if eval_loss is not None else "")
            + ("  (includes compile)" if done == self.start + 1 else ""))
        if self.file:
            row = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                   "learning_rate": float(m["learning_rate"]), "step_time_s": dt,
                   "tokens_per_s": tps, "mfu": util}
            if eval_loss is not None:
                row["eval_loss"] = eval_loss
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:  # name the metrics file, not the checkpoints, at fault
                raise OSError(f"metrics_file={self.path}: cannot write step {done} "
                              f"({e.strerror}); the last checkpoint is intact") from None

    def close(self) -> None:
        if self.file:
            self.file.close()


class Profiler:
    """A profiler trace of the run's steps 3-4 (after compilation), when asked."""

    STEPS = 5  # the run must take this many steps for the trace to close

    def __init__(self, directory: str | None, start: int):
        self.directory, self.first, self.last = directory, start + 2, start + 4

    def before(self, step: int) -> None:
        if self.directory and step == self.first:
            jax.profiler.start_trace(self.directory)

    def after(self, step: int, state: Any) -> None:
        if self.directory and step == self.last:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()


# ---------------------------------------------------------------- the loop
@dataclasses.dataclass
class RunResult:
    state: TrainState
    trainer: Trainer
    losses: list[float]  # per step, for the steps this run took
    first_loss: float
    last_loss: float
    ckpt_dir: str | None = None
    stopped_by: str | None = None
    completion: str | None = None
    eval_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)


def train(cfg: RunConfig) -> RunResult:
    run = prepare(cfg)
    stop, pending = StopSignal(), Pending()
    progress: Progress | None = None
    try:
        describe(run)
        state = resume_or_init(run)
        if jax.process_index() == 0:
            rundir.write_config(run.ckpts.directory, cfg)
        ck = cfg.checkpoint
        log(f"checkpoints: {run.ckpts.directory} every {ck.ckpt_every} steps, keeping "
            f"{ck.keep_checkpoints}")
        start = int(jax.device_get(state.step))
        end = min(cfg.steps, cfg.run_until) if cfg.run_until else cfg.steps
        t0, progress = time.perf_counter(), Progress(run, start)
        with stop, PeerWatch(lambda: _last_complete(run.ckpts.directory)) as peers:
            try:
                state, saved = _loop(run, state, start, end, pending, progress, stop)
            except jax.errors.JaxRuntimeError as e:
                if jax.process_count() == 1:
                    raise
                raise PeerLost(peers.lost_message(
                    f"{peers.dead_peers()} ({str(e).splitlines()[0][:100]})")) from None
    finally:
        if progress:
            progress.close()
        close_run_dir(run)  # waits for an asynchronous save in flight
    result = _finish(run, state, pending.losses, saved, stop.stopping,
                     time.perf_counter() - t0)
    result.eval_losses = pending.eval_losses
    return result


def _loop(run: Run, state: TrainState, start: int, end: int, pending: Pending,
          progress: Progress, stop: StopSignal) -> tuple[TrainState, int]:
    """The steps: train, queue the metrics, checkpoint and log when due."""
    cfg = run.cfg
    example = run.batches.example()
    shardings, step_fn = run.trainer.batch_sharding(example), run.trainer.compiled_step(example)
    profiler, saved = Profiler(cfg.log.profile_dir, start), start
    evaluate = Evaluator(run) if run.eval_batches is not None else None
    for step in range(start, end):
        profiler.before(step)
        state, metrics = step_fn(state, run.batches.device(step, shardings))
        done = step + 1
        pending.add(done, metrics)
        profiler.after(step, state)
        stopping = stop.agreed()
        if done % cfg.checkpoint.ckpt_every == 0 or done == end or stopping:
            pending.check()  # never checkpoint a state whose steps were not checked
            run.ckpts.save(state, run.record, wait=bool(stopping))
            saved = done
            log(f"checkpoint step {done}: "
                + ("committed" if stopping else "saving in the background"))
        if stopping:
            log(f"stopped by {stopping} after step {done}; checkpoint committed in "
                f"{run.ckpts.directory}")
            break
        eval_loss = None
        if evaluate and (done % cfg.eval.eval_every == 0 or done == end):
            eval_loss = evaluate(state.params)
            pending.eval_losses.append((done, eval_loss))
        if done % cfg.log.log_every == 0 or done in (end, start + 1) or eval_loss is not None:
            pending.check()
            progress.report(done, pending.last, eval_loss)
    pending.check()
    return state, saved


class Evaluator:
    """The validation loss: the same eval_batches batches every time, on the training
    mesh, through the step's own layout (pipeline, accumulation parts)."""

    def __init__(self, run: Run):
        example = run.eval_batches.example()
        self.fn = run.trainer.compiled_eval(example)
        self.shardings = run.trainer.batch_sharding(example)
        self.source, self.count = run.eval_batches, run.cfg.eval.eval_batches

    def __call__(self, params: Any) -> float:
        """The batches are streamed: each is placed, evaluated and dropped in turn (host and
        device memory stay one batch, whatever --eval_batches is)."""
        total = None
        for i in range(self.count):
            loss = self.fn(params, self.source.device(i, self.shardings))
            total = loss if total is None else total + loss
        return float(jax.device_get(total)) / self.count


def _finish(run: Run, state: TrainState, losses: list[float], saved: int,
            stopped_by: str | None, seconds: float) -> RunResult:
    first = losses[0] if losses else math.nan
    last = losses[-1] if losses else math.nan
    log(f"trained {len(losses)} steps in {seconds:.1f}s; loss {first:.4f} -> {last:.4f}; "
        f"last checkpoint: step {saved} in {run.ckpts.directory}")
    result = RunResult(state, run.trainer, losses, first, last, run.ckpts.directory, stopped_by)
    demo = run.cfg.demo
    if (run.family.generates and demo.serve_mesh and not stopped_by and saved == run.cfg.steps
            and jax.process_count() == 1):
        result.completion = serve_demo(run.ckpts.directory, demo.serve_mesh, demo.serve_prompt)
    return result


def serve_demo(ckpt_dir: str, mesh: str, prompt: str) -> str:
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
