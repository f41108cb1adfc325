"""One writer per run directory, the run's config saved beside its checkpoints (JSON and a
flagfile that replays it), and resumes that refuse to change the run silently."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from absl import flags

from jaxmp import rundir
from jaxmp.cli import flagtree
from jaxmp.config import RunConfig
from jaxmp.run import prepare, train
from jaxmp.run.build import close_run_dir

# data:2,fsdp:2 x 2 accumulation parts, a warm-up and validation every 2 steps: a resume
# must restore the sharded state, the schedule's position, the data order and evaluation.
TINY = dict(num_layers=2, d_model=32, num_heads=4, seq_len=16, batch_size=8, steps=4,
            ckpt_every=2, log_every=1, serve_mesh="", warmup_steps=3, mesh="data:2,fsdp:2,tensor:2",
            grad_accum_steps=2, eval_every=2, eval_batches=1, async_checkpoint=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run stopped after step 2 (--run_until), with its checkpoint, config and
    metrics. (Every later run of the same layout here reuses its compiled programs.)"""
    root = tmp_path_factory.mktemp("run")
    path = str(root / "ckpt")
    result = train(RunConfig.flat(**TINY, ckpt_dir=path, run_until=2,
                                  metrics_file=str(root / "first.jsonl")))
    return path, result


def test_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path):
    """A second lock on a held directory fails at once naming the holder (pid); the lock
    file goes when released, and a released directory can be locked again. Catches a lock
    that is advisory only in name (two opens both succeed) or a stale lock file that blocks
    the next run after a clean exit."""
    first = rundir.RunLock(str(tmp_path))
    first.acquire()
    with pytest.raises(rundir.RunDirError, match=rf"in use by another training \(pid {os.getpid()}"):
        rundir.RunLock(str(tmp_path)).acquire()
    first.release()
    assert not os.path.exists(tmp_path / rundir.LOCK)
    again = rundir.RunLock(str(tmp_path))
    again.acquire()
    again.release()


def test_a_running_training_holds_its_directory(trained, tmp_path):
    """prepare() of a second training on a directory whose lock is held fails before it
    touches the checkpoints; the first run's checkpoints are intact."""
    path, _ = trained
    holder = rundir.RunLock(path)
    holder.acquire()
    try:
        with pytest.raises(rundir.RunDirError, match="in use by another training"):
            prepare(RunConfig.flat(**TINY, ckpt_dir=path, overwrite=True, resume=False))
    finally:
        holder.release()
    assert sorted(os.listdir(path)) == ["2", rundir.CONFIG_JSON, rundir.FLAGFILE]


def test_saved_config_and_flagfile_rebuild_the_run(trained):
    """run_config.json equals the run's config; the flagfile parsed by absl, as
    experiments.train parses --flagfile, rebuilds the same RunConfig (every field, so a
    field written as its default instead of its value fails); the checkpoint's record holds
    the config too."""
    path, _ = trained
    cfg = RunConfig.flat(**TINY, ckpt_dir=path, run_until=2,
                         metrics_file=os.path.join(os.path.dirname(path), "first.jsonl"))
    with open(os.path.join(path, rundir.CONFIG_JSON)) as f:
        assert json.load(f) == rundir.config_json(cfg)
    fv = flags.FlagValues()
    flagtree.define(RunConfig, fv)
    fv(["train", f"--flagfile={os.path.join(path, rundir.FLAGFILE)}"])
    assert flagtree.build(RunConfig, fv) == cfg
    from jaxmp.checkpoint import Checkpoints
    ckpts = Checkpoints(path, create=False)
    try:
        assert ckpts.record(2).run_config == rundir.config_json(cfg)
    finally:
        ckpts.close()


@pytest.mark.parametrize("change,what", [
    (dict(learning_rate=0.01), "learning_rate: 0.001 in the checkpoint, 0.01 now"),
    (dict(warmup_steps=1), "warmup_steps: 3 in the checkpoint, 1 now"),
    (dict(batch_size=16), "batch_size: 8 in the checkpoint, 16 now"),
    (dict(grad_accum_steps=1), "grad_accum_steps: 2 in the checkpoint, 1 now"),
    (dict(seed=5), "seed: 0 in the checkpoint, 5 now"),
    (dict(weight_decay=0.0), "weight_decay: 0.1 in the checkpoint, 0.0 now"),
    (dict(steps=3), "steps: 4 in the checkpoint, 3 now"),
    (dict(dtype="bfloat16"), "dtype: 'float32' in the checkpoint, 'bfloat16' now"),
])
def test_resume_refuses_a_silent_change(trained, change, what):
    """Resuming with another learning rate, schedule, batch, accumulation, seed, decay,
    shorter schedule or compute dtype is refused, naming the setting, both values and the
    flag that allows it: a resume that accepted it would change the run silently (the
    learning rate jumps, the data order changes)."""
    path, _ = trained
    name = what.split(":")[0]
    with pytest.raises(ValueError, match=rf"{name}: .*--allow_config_change={name}") as e:
        prepare(RunConfig.flat(**{**TINY, **change}, ckpt_dir=path))
    assert what in str(e.value)
    assert sorted(os.listdir(path)) == ["2", rundir.CONFIG_JSON, rundir.FLAGFILE]


def test_resume_allows_what_is_named_and_what_is_free(trained):
    """--allow_config_change=learning_rate lets the learning rate change (with a note of
    the rate before and after); the mesh, remat, logging and a longer --steps are free (the
    longer schedule is noted); a model of another shape is refused, naming the field."""
    path, _ = trained
    run = prepare(RunConfig.flat(**{**TINY, "learning_rate": 0.01, "steps": 6,
                                    "mesh": "fsdp:4,tensor:2", "remat": "block", "log_every": 3},
                                 ckpt_dir=path, allow_config_change="learning_rate"))
    try:
        assert run.resume_from == 2
        notes = " | ".join(run.notes)
        assert "learning_rate 0.001 -> 0.01: the learning rate at step 3 goes from" in notes
        assert "steps 4 -> 6" in notes and "ends at step 6" in notes
    finally:
        close_run_dir(run)
    with pytest.raises(ValueError, match=r"holds another model: d_model: 32 in the checkpoint, 64"):
        prepare(RunConfig.flat(**{**TINY, "d_model": 64}, ckpt_dir=path))
    with pytest.raises(ValueError, match="allow_config_change: mesh is not a setting"):
        prepare(RunConfig.flat(**TINY, ckpt_dir=path, allow_config_change="mesh"))


@pytest.mark.slow
def test_resume_and_replay_equal_the_straight_run(trained, tmp_path):
    """The real training loop (jaxmp.run.train) stopped by --run_until after its step-2
    checkpoint and resumed takes steps 3 and 4 like the run that went straight on: the
    same losses, gradient norms, learning rates and validation losses, and the same final
    state. The straight run is the saved flagfile replayed into a new directory without
    --run_until, so it also shows the flagfile replays the run. A resume that restarts the
    schedule or the data order, drops Adam's moments or step counters, or evaluates on
    other batches fails here; so does a flagfile that writes a default for a value."""
    path, first = trained
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(path, resumed_dir)
    rest = train(RunConfig.flat(**TINY, ckpt_dir=str(resumed_dir),
                                metrics_file=str(tmp_path / "rest.jsonl")))
    fv = flags.FlagValues()
    flagtree.define(RunConfig, fv)
    fv(["train", f"--flagfile={os.path.join(path, rundir.FLAGFILE)}",
        f"--ckpt_dir={tmp_path / 'straight'}", "--run_until=4",
        f"--metrics_file={tmp_path / 'straight.jsonl'}"])
    straight = train(flagtree.build(RunConfig, fv))
    assert [len(first.losses), len(rest.losses), len(straight.losses)] == [2, 2, 4]
    np.testing.assert_allclose(first.losses + rest.losses, straight.losses, rtol=1e-6)
    read = lambda f: [json.loads(line) for line in open(f)]
    got = read(os.path.join(os.path.dirname(path), "first.jsonl")) + read(tmp_path / "rest.jsonl")
    want = read(tmp_path / "straight.jsonl")
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3, 4]
    for key in ("loss", "learning_rate", "grad_norm", "eval_loss"):
        np.testing.assert_allclose([m.get(key, 0) for m in got], [m.get(key, 0) for m in want],
                                   rtol=1e-6, err_msg=key)
    assert sum("eval_loss" in m for m in want) == 2
    flat = lambda t: jax.tree_util.tree_leaves(jax.device_get(t))
    for a, b in zip(flat(rest.state), flat(straight.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_trainings_on_one_directory_started_a_second_apart(tmp_path):
    """Two `experiments.train` processes on one --ckpt_dir, the second started about a
    second after the first took the directory: the second exits 2 at once with one line
    naming the first (its pid), the first runs to its end and its checkpoints are all
    there. (Before the lock both ran and the second replaced the first's checkpoints.)"""
    import subprocess
    import sys
    import time

    from helpers import ROOT

    ckpt = tmp_path / "ckpt"
    args = [sys.executable, "-m", "experiments.train", "--num_layers=2", "--d_model=32",
            "--num_heads=4", "--seq_len=16", "--batch_size=8", "--steps=30", "--ckpt_every=10",
            "--mesh=data:8", "--serve_mesh=", f"--ckpt_dir={ckpt}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (ckpt / rundir.LOCK).exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        t0 = time.time()
        second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        took = time.time() - t0
        out, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by another training (pid {first.pid}" in lines[0], lines
    assert first.returncode == 0, out[-2000:]
    assert sorted(e for e in os.listdir(ckpt) if e.isdigit()) == ["10", "20", "30"]
    print(f"second training refused after {took:.1f}s")
