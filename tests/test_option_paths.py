"""Every option flag reaches the object it configures, through the functions the entry
point calls: absl parses the flags (jaxmp.cli.flagtree, as experiments.train does),
jaxmp.run.prepare builds the run, and the model, mesh, pipeline, rules, trainer and
optimizer it holds carry each non-default value. A flag parsed into the config but dropped
on the way (a field not passed on, a default written in its place) fails here; what each
object then does with its setting is tested against one device and against the compiled
program elsewhere (helpers.layout_trainer builds those trainers through the same path)."""

import dataclasses

import jax
import pytest
from absl import flags

from jaxmp import run as experiment
from jaxmp.cli import flagtree
from jaxmp.config import RunConfig
from jaxmp.pipeline import PipelineSpec, storage_order
from jaxmp.run.build import close_run_dir

OPTIMIZER = {"learning_rate": 0.005, "warmup_steps": 3, "weight_decay": 0.05, "clip_norm": 0.5,
             "b1": 0.8, "b2": 0.9, "eps": 1e-7, "min_lr_ratio": 0.2, "grad_accum_steps": 2}


def parse(*argv: str) -> RunConfig:
    fv = flags.FlagValues()
    flagtree.define(RunConfig, fv)
    fv(["train", *argv])
    return flagtree.build(RunConfig, fv)


@pytest.mark.parametrize("family,shape", [
    ("gpt", ["--num_heads=4"]),
    ("llama", ["--num_heads=4", "--num_kv_heads=2"])])
def test_every_layout_model_and_optimizer_flag_reaches_the_run(tmp_path, family, shape):
    """Flags with non-default values for every layout option (mesh, micro-batches, circular
    rounds, gather-once, sequence parallelism, sharded state, rule overrides, the context
    attention kind), model option
    (dtype, remat, attention kernel, scan) and optimizer setting, parsed as the entry point
    parses them, end up in the prepared run."""
    cfg = parse(f"--model={family}", "--num_layers=4", "--d_model=32", "--seq_len=16", *shape,
                "--dtype=bfloat16", "--remat=dots", "--attention=chunked", "--noscan_layers",
                "--mesh=fsdp:2,pipe:2,tensor:2", "--microbatches=4", "--pipeline_repeats=2",
                "--pipeline_fsdp_gather_once", "--sequence_parallel", "--noshard_state",
                "--context_attention=allgather",
                "--rules=vocab=", "--activation_rules=batch=fsdp", "--batch_size=16",
                "--steps=9", "--seed=3", f"--ckpt_dir={tmp_path / 'run'}", "--serve_mesh=",
                *(f"--{k}={v}" for k, v in OPTIMIZER.items()))
    run = experiment.prepare(cfg)
    try:
        m = run.model_cfg
        assert (m.num_layers, m.d_model, m.num_heads, m.seq_len) == (4, 32, 4, 16)
        assert (m.dtype, m.remat, m.attention, m.scan_layers) == ("bfloat16", "dots", "chunked",
                                                                 False)
        if family == "llama":
            assert m.num_kv_heads == 2
        assert {k: v for k, v in run.mesh.shape.items() if v > 1} == {"fsdp": 2, "pipe": 2,
                                                                      "tensor": 2}
        assert run.pipeline == PipelineSpec(2, 4, 2, fsdp_gather_once=True)
        assert run.record.layer_order == storage_order(4, 2, 2) != list(range(4))
        tr = run.trainer
        params, activations = dict(tr.rules.params), dict(tr.rules.activations)
        assert activations["sequence"] == ("context", "tensor")  # (context first: its slice)
        assert activations["batch"] == ("fsdp",) and activations["length"] == ("context",)
        assert tr.rules.context_attention == "allgather" == run.record.rules["context_attention"]
        assert params.get("vocab") in ((), None)
        assert tr.shard_state is False and tr.seed == 3
        want = dataclasses.replace(tr.opt, **OPTIMIZER, total_steps=9)
        assert tr.opt == want, (tr.opt, want)
        # the model the trainer builds is the configured one, in the pipeline's layout
        model = tr.model(jax.tree_util.tree_map(lambda a: a, tr.abstract_params))
        assert model.cfg == m
    finally:
        close_run_dir(run)
