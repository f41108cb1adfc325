"""Full-state checkpoint resume: optimizer moments across layer storage orders, the values a
corrupted-checkpoint fall-back restores, and a killed save's leftover after the next start.

One module fixture trains a circular pipeline (data:2,pipe:2,tensor:2, p=2 m=2 r=4: the
stacked `layers` axis is stored as [0, 2, 4, 6, 1, 3, 5, 7]), saves steps 1 and 2 with the
sidecar that `experiment.train` writes, and takes step 3 on the same layout as the reference.
r=4 rather than r=2: r=2's order [0, 1, 4, 5, 2, 3, 6, 7] is its own inverse, so a restore
that indexed by the saved order instead of its inverse would restore it correctly.
"""

import os
import re
import shutil
import signal
import subprocess
import sys

import helpers
import jax
import numpy as np
import optax
import pytest
from helpers import CFG, ROOT, batches, trainer

from jaxmp.checkpoint import CheckpointError, CheckpointRecord, Checkpoints
from jaxmp.config import RunConfig
from jaxmp.pipeline import PipelineSpec, storage_order
from jaxmp.run import train
from jaxmp.sharding import DEFAULT_RULES

slow = pytest.mark.slow  # whole runs and subprocesses: the full suite only

TRAIN_MESH, TRAIN_PIPE = "data:2,pipe:2,tensor:2", PipelineSpec(2, 2, 4)
# (a) no pipeline (r=1, identity order) on another mesh; (b) another pipe size with its own
# circular order [0, 4, 1, 5, 2, 6, 3, 7] (neither the identity nor the training order).
TARGETS = {"tensor8-no-pipeline": ("tensor:8", PipelineSpec()),
           "pipe4-circular": ("pipe:4,tensor:2", PipelineSpec(4, 4, 2))}
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _meta(mesh, pipe: PipelineSpec) -> CheckpointRecord:
    """The record `experiment.train` writes, and whose layer order it restores into."""
    return CheckpointRecord.create("gpt", "blocks", CFG, mesh, DEFAULT_RULES, pipe)


def canonical(tree, pipe: PipelineSpec):
    """Host copy of `tree` with every leaf under a 'blocks' key put in canonical layer order
    (params, and Adam's mu / nu, which mirror them)."""
    position = np.argsort(storage_order(CFG.num_layers, pipe.stages, pipe.repeats))

    def fix(path, x):
        x = np.asarray(x)
        return x[position] if "['blocks']" in jax.tree_util.keystr(path) else x
    return jax.tree_util.tree_map_with_path(fix, jax.device_get(tree))


def assert_trees(got, want, **tol) -> None:
    """Same structure; every leaf equal (exactly, or within `tol`), failures name the leaf."""
    g, w = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert [jax.tree_util.keystr(p) for p, _ in g] == [jax.tree_util.keystr(p) for p, _ in w]
    for (path, a), (_, b) in zip(g, w):
        assert np.shape(a) == np.shape(b), jax.tree_util.keystr(path)
        if tol:
            np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **tol)
        else:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def adam(state):
    return next(s for s in jax.tree_util.tree_leaves(
        state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState))


def counts(state) -> list[int]:
    """Every optimizer step counter (Adam's bias correction, the learning-rate schedule)."""
    return [int(c) for p, c in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
            if jax.tree_util.keystr(p).endswith(".count")]


def restore(path, target: str, step=None):
    """Restore the full state onto a target layout as `experiment.train` does on resume."""
    tr = _target_trainer(target)
    meta = _meta(tr.mesh, TARGETS[target][1])
    ckpts = Checkpoints(path, create=False)
    try:
        return tr, ckpts.restore(tr.abstract_state(), step=step, layer_order=meta.layer_order)
    finally:
        ckpts.close()


_trainers: dict = {}


def _target_trainer(target: str):
    if target not in _trainers:
        _trainers[target] = trainer(*TARGETS[target])
    return _trainers[target]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Steps 1 and 2 saved from the circular layout, step 3 taken there (the reference)."""
    tr = trainer(TRAIN_MESH, TRAIN_PIPE)
    data = batches(3)
    path = str(tmp_path_factory.mktemp("resume"))
    ckpts = Checkpoints(path)
    meta = _meta(tr.mesh, TRAIN_PIPE)
    assert meta.layer_order == [0, 2, 4, 6, 1, 3, 5, 7]
    state, saved = tr.init_state(), {}
    for b in data[:2]:
        state, _ = tr.step(state, tr.put_batch(b))
        step = ckpts.save(state, meta, wait=True)
        saved[step] = canonical(state, TRAIN_PIPE)  # before the next step donates `state`
    ckpts.close()
    state, m = tr.step(state, tr.put_batch(data[2]))
    # The tests below cannot pass vacuously: every layer of params, mu and nu differs from
    # the others (a wrong layer order shows), and every array differs between steps 1 and 2.
    s1, s2 = saved[1], saved[2]
    for tree in (s2.params["blocks"], adam(s2).mu["blocks"], adam(s2).nu["blocks"]):
        for x in jax.tree_util.tree_leaves(tree):
            assert len({r.tobytes() for r in x.reshape(CFG.num_layers, -1)}) == CFG.num_layers
    assert counts(s1) == [1, 1] and counts(s2) == [2, 2]
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        assert not np.array_equal(a, b)
    return dict(path=path, tr=tr, data=data, saved=saved, loss3=float(m["loss"]),
                state3=canonical(state, TRAIN_PIPE))


@slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_full_state_resume_reorders_moments_and_continues_the_run(run, target):
    """Catches: Adam's mu / nu restored in the wrong layer order (inverse permutation or
    the saved storage order) or not re-ordered at all while the params are; the step counter
    or the optimizer counts lost; restored arrays not in the target's shardings. The restored
    state must equal step 2's saved state exactly (in canonical order), and one more step on
    the new layout must match step 3 of the original run."""
    tr, state = restore(run["path"], target)
    got = canonical(state, TARGETS[target][1])
    assert int(got.step) == 2 and counts(got) == [2, 2]
    assert_trees(got, run["saved"][2])
    for (path, a), sh in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                             jax.tree_util.tree_leaves(tr.state_shardings)):
        assert a.sharding.is_equivalent_to(sh, a.ndim), jax.tree_util.keystr(path)

    state, m = tr.step(state, tr.put_batch(run["data"][2]))
    got = canonical(state, TARGETS[target][1])
    assert int(got.step) == 3 and counts(got) == [3, 3]
    np.testing.assert_allclose(float(m["loss"]), run["loss3"], rtol=1e-5)
    assert_trees(got.params, run["state3"].params, rtol=1e-5, atol=1e-6)


@slow
def test_train_resumes_a_circular_run_on_another_pipe_size(tmp_path):
    """The same through `experiment.train`, the resume path users run. Catches train()
    restoring without the target's layer order (or with the checkpoint's): a run on the
    circular layout (p=2, r=4) saved at step 2, resumed on pipe:4 with r=2, must take step 3
    like the run that went on. The existing resume tests use r=1 layouts (identity orders)."""
    common = dict(num_layers=8, d_model=32, num_heads=4, seq_len=32, batch_size=8, steps=3,
                  ckpt_every=2, log_every=1, serve_mesh="", warmup_steps=1)
    straight = train(RunConfig.flat(**common, ckpt_dir=str(tmp_path), mesh=TRAIN_MESH,
                                    microbatches=2, pipeline_repeats=4))
    assert Checkpoints(str(tmp_path), create=False).steps() == [2, 3]
    shutil.rmtree(tmp_path / "3")  # as if the run had stopped after its step-2 checkpoint
    pipe = PipelineSpec(4, 4, 2)
    resumed = train(RunConfig.flat(**common, ckpt_dir=str(tmp_path), mesh="pipe:4,tensor:2",
                                   microbatches=pipe.microbatches, pipeline_repeats=pipe.repeats))
    assert len(straight.losses) == 3 and len(resumed.losses) == 1
    assert int(resumed.state.step) == 3
    np.testing.assert_allclose(resumed.losses[0], straight.losses[2], rtol=1e-5)
    assert_trees(canonical(resumed.state.params, pipe),
                 canonical(straight.state.params, TRAIN_PIPE), rtol=1e-5, atol=1e-6)


def _corrupt(step_dir) -> None:
    """Overwrite the array data of one item, as in test_checkpoint's corruption test."""
    for root, _, files in os.walk(step_dir / "params"):
        for f in files:
            if not f.startswith("_") and "manifest" not in f:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")


@slow
def test_corrupted_latest_falls_back_to_the_previous_steps_values(run, tmp_path):
    """Catches a fall-back that reports the previous step but restores other values (the
    corrupted step's, initial ones, or layers in the saved storage order): after step 2 is
    corrupted, following the error's advice (--step=N) onto another layout must give every
    array of step 1 exactly, optimizer moments included."""
    copy = tmp_path / "c"
    shutil.copytree(run["path"], copy)
    _corrupt(copy / "2")
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 in .* is unreadable") as err:
        restore(str(copy), "pipe4-circular")
    step = int(re.search(r"step=(\d+)", str(err.value)).group(1))
    assert step == 1
    _, state = restore(str(copy), "pipe4-circular", step=step)
    assert_trees(canonical(state, TARGETS["pipe4-circular"][1]), run["saved"][1])


KILLED_SAVE = """
import os, signal, sys, time
import jax.numpy as jnp
import numpy as np
from jaxmp.checkpoint import CheckpointRecord, Checkpoints
from jaxmp.train import TrainState
w = jnp.asarray(np.random.default_rng(0).standard_normal(4_000_000, np.float32))
state = TrainState(jnp.int32(4), {"w": w}, {}, jnp.zeros((2,), jnp.uint32))
record = CheckpointRecord("toy", {}, "", {}, {}, [], "blocks")
Checkpoints(sys.argv[1]).save(state, record)  # asynchronous: returns before the commit
while not any(e.startswith("4") for e in os.listdir(sys.argv[1])):  # orbax may create the
    time.sleep(0.001)  # temporary directory in the background; its commit comes >= 50 ms later
os.kill(os.getpid(), signal.SIGKILL)
"""


def _leftovers(path) -> list[str]:
    return sorted(e for e in os.listdir(path) if TMP_SUFFIX in e)


def _restore_and_check(ckpts, run, steps):
    """Restore each step onto the training layout; every array must equal the saved one."""
    tr = run["tr"]
    for step in steps:
        state = ckpts.restore(tr.abstract_state(), step=step)
        assert_trees(canonical(state, TRAIN_PIPE), run["saved"][step])
    return state


@slow
def test_killed_save_leftover_is_cleaned_at_next_start_and_good_steps_intact(run, tmp_path):
    """Catches: the temporary directory of a save killed before its commit (step 4, after
    complete steps 1 and 2) listed as a step; removed by a read-only reader (a server opening
    a live run's directory would delete its save in flight); not removed by the next training
    start (Checkpoints(create=True), whose cleanup thread the next save waits for); the
    killed save or that cleanup damaging the complete steps; the resumed run (step 3, saved
    and read back) not continuing exactly."""
    copy = tmp_path / "c"
    shutil.copytree(run["path"], copy)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = helpers.CHILD_XLA_FLAGS
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(copy)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _leftovers(copy) == ["4" + TMP_SUFFIX] and "4" not in os.listdir(copy), os.listdir(copy)

    reader = Checkpoints(str(copy), create=False)
    assert reader.steps() == [1, 2]
    _restore_and_check(reader, run, (1, 2))
    assert _leftovers(copy) == ["4" + TMP_SUFFIX]  # a reader leaves it alone

    ckpts = Checkpoints(str(copy))  # a training start
    assert ckpts.steps() == [1, 2]
    state = _restore_and_check(ckpts, run, (1, 2))
    state, _ = run["tr"].step(state, run["tr"].put_batch(run["data"][2]))
    ckpts.save(state, _meta(run["tr"].mesh, TRAIN_PIPE), wait=True)
    ckpts.close()
    assert _leftovers(copy) == [], os.listdir(copy)
    reader = Checkpoints(str(copy), create=False)
    assert reader.steps() == [1, 2, 3]
    _restore_and_check(reader, run, (1, 2))  # intact after the cleanup
    again = reader.restore(run["tr"].abstract_state(), step=3)
    assert_trees(canonical(again, TRAIN_PIPE), run["state3"])
