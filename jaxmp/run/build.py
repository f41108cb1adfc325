"""Building a run from its config tree: the family and model, the mesh, pipeline and
rules, the trainer, the data, the checkpoint directory (locked), and the resume plan;
every check before any step is compiled.

    run = prepare(cfg)        # raises, one line naming the flag, on anything wrong
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxmp import budget, rundir
from jaxmp.checkpoint import CheckpointRecord, Checkpoints, remove_leftovers
from jaxmp.config import LayoutConfig, RunConfig
from jaxmp.data import is_byte_source, validation_source
from jaxmp.mesh import batch_shards, format_mesh, make_mesh
from jaxmp.models import registry
from jaxmp.models.registry import Batches, Family
from jaxmp.pipeline import PipelineSpec, bubble_factor, stage_layers
from jaxmp.pretrained import Source, open_source
from jaxmp.run import checks
from jaxmp.run.console import log
from jaxmp.sharding import DEFAULT_RULES, Rules, parse_rule_overrides
from jaxmp.tokenizer import TextCodec, read_tokenizer
from jaxmp.train import Trainer


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
        activations["sequence"] = ("context", "tensor")  # within the context slice
    return DEFAULT_RULES.override(params=parse_rule_overrides(layout.rules),
                                  activations=activations,
                                  context_attention=layout.context_attention)


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
                        fsdp_gather_once=cfg.layout.pipeline_fsdp_gather_once,
                        schedule=cfg.layout.pipeline_schedule)
    checks.schedule(pipe, cfg.layout.mesh)
    if pipe.enabled:
        shards = batch_shards(mesh)[0]
        per_shard = cfg.data.batch_size // max(1, cfg.optimizer.grad_accum_steps) // shards
        pipe.validate(model_cfg.num_layers, per_shard, family.layers_name)
    checks.context(mesh, model_cfg, family.name)
    checks.zero_bubble_context(pipe, mesh, cfg.layout.context_attention)
    checks.zero_bubble_fp8(pipe, model_cfg)
    return mesh, pipe, build_rules(cfg.layout)


def make_trainer(cfg: RunConfig, family: Family, model_cfg: Any, mesh: Mesh,
                 pipe: PipelineSpec, rules: Rules) -> Trainer:
    """The run's Trainer: the family's model in this layout, its loss, the run's optimizer."""
    seed = cfg.data.seed
    return Trainer(lambda: family.build(model_cfg, pipe, nnx.Rngs(seed)), family.loss, mesh,
                   rules=rules, optimizer=cfg.optimizer_config(), seed=seed,
                   shard_state=cfg.layout.shard_state)


def prepare(cfg: RunConfig) -> Run:
    """Validate everything and build the run (no step is compiled yet). What the run will
    write is checked first; the checkpoint directory is created last, and removed again if
    the checkpoints in it rule the run out."""
    cfg.validate()
    checks.same_flags(cfg)
    checks.paths(cfg)
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
        from jaxmp.run.resume import resume_plan

        run.resume_from = resume_plan(run)
        checks.profile(cfg, run.resume_from or 0)
    except BaseException:
        close_run_dir(run)
        raise
    return run


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


def describe(run: Run) -> None:
    """The run's opening lines: model, mesh, pipeline stages, parameter plan."""
    log(f"jaxmp: {run.family.name} {json.dumps(run.model_cfg.to_json())}")
    log(f"mesh {format_mesh(run.mesh)} over {run.mesh.size} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es) x {jax.local_device_count()} local "
        "device(s)")
    p = run.pipeline
    if p.enabled:
        bubble = 1 - 1 / bubble_factor(p.stages, p.microbatches, p.repeats, p.schedule)
        log(f"pipeline: {p.stages} stages, {p.microbatches} micro-batches, {p.repeats} "
            f"repeat(s), schedule {p.schedule}; bubble fraction {bubble:.3f}")
        for s, layers in enumerate(stage_layers(run.model_cfg.num_layers, p)):
            log(f"  stage {s} (pipe index {s}): layers {layers}")
    log(run.trainer.plan().format())
