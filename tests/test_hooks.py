"""The loop's parts as hooks: research code's own hook at the right steps on a pipeline
layout (with the metrics the loop reports), an early stop from a hook that checkpoints
first, and the TensorBoard logger read back with tensorboard's own reader.

Bugs these catch: a hook called at the wrong steps (off by one, not at the last step,
before the step's update), metrics handed to a hook from another step, a stop request
that skips the checkpoint or goes on training, TensorBoard scalars that differ from the
metrics file (another step, another field, a missing eval loss), a logging flag that
never reaches the loop, a bad logging flag found only after training.
"""

from __future__ import annotations

import json

import pytest

from jaxmp.config import RunConfig
from jaxmp.run import Hook, train
from jaxmp.run import every as every_n

# a tiny GPT on data:2,pipe:2,tensor:2 (2 micro-batches): the hooks run around the
# pipelined step; validation every 3 steps
TINY = dict(num_layers=2, d_model=32, num_heads=4, seq_len=16, batch_size=8, steps=7,
            ckpt_every=3, log_every=2, serve_mesh="", warmup_steps=1,
            mesh="data:2,pipe:2,tensor:2", microbatches=2, eval_every=3, eval_batches=1,
            async_checkpoint=False)


@pytest.mark.slow
def test_hooks_run_at_their_steps_and_tensorboard_matches_the_metrics_file(tmp_path):
    seen: list[tuple[int, float, float | None]] = []

    class Record(Hook):
        every = 3

        def on_step(self, info):
            seen.append((info.step, info.metrics()["loss"], info.eval_loss))

    starts, ends, every_two = [], [], []

    class Bounds(Hook):
        def on_start(self, info):
            starts.append(info.step)

        def on_end(self, info):
            ends.append(info.step)

    tb, metrics = tmp_path / "tb", tmp_path / "m.jsonl"
    result = train(RunConfig.flat(**TINY, ckpt_dir=str(tmp_path / "ck"), metrics_file=str(metrics),
                                  tensorboard_dir=str(tb)),
                   hooks=[Record(), Bounds(), every_n(2, lambda i: every_two.append(i.step),
                                                      at_end=False)])
    assert [s for s, _, _ in seen] == [3, 6, 7]  # every 3 and the last step
    assert [loss for _, loss, _ in seen] == [result.losses[s - 1] for s in (3, 6, 7)]
    assert [e for s, _, e in seen] == [v for _, v in result.eval_losses][:2] + [
        dict(result.eval_losses)[7]]
    assert (starts, ends, every_two) == ([0], [7], [2, 4, 6])
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in rows}, rel=1e-6)
    assert sorted(loss) == [1, 2, 3, 4, 6, 7]  # logged steps: 1, every 2, evaluated, last
    lr = {e.step: e.value for e in acc.Scalars("train/learning_rate")}
    assert lr == pytest.approx({r["step"]: r["learning_rate"] for r in rows}, rel=1e-6)
    evals = {e.step: e.value for e in acc.Scalars("eval/loss")}
    assert evals == pytest.approx(dict(result.eval_losses), rel=1e-6)



@pytest.mark.slow
def test_a_hook_that_stops_the_run_checkpoints_that_step_first(tmp_path):
    """info.stop from research code: the step is checkpointed (committed), nothing runs
    after it, and the losses are the uninterrupted run's."""
    def plateau(info):
        if info.step == 4:
            info.stop("loss plateau")
    stopped = train(RunConfig.flat(**TINY, ckpt_dir=str(tmp_path / "ck2")),
                    hooks=[every_n(1, plateau)])
    straight = train(RunConfig.flat(**TINY, run_until=4, ckpt_dir=str(tmp_path / "ck3")))
    assert stopped.stopped_by == "loss plateau" and len(stopped.losses) == 4
    assert stopped.last_saved == 4 and stopped.losses == straight.losses
    from jaxmp.checkpoint import Checkpoints

    assert Checkpoints(str(tmp_path / "ck2"), create=False).steps()[-1] == 4


def test_bad_logging_flags_are_refused_before_anything_runs(tmp_path):
    from jaxmp.run import prepare

    with pytest.raises(ValueError, match="wandb_mode='sometimes' must be one of online"):
        prepare(RunConfig.flat(**TINY, ckpt_dir=str(tmp_path / "a"), wandb_mode="sometimes"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="tensorboard_dir=.* exists and is not a directory"):
        prepare(RunConfig.flat(**TINY, ckpt_dir=str(tmp_path / "b"),
                               tensorboard_dir=str(tmp_path / "file")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_wandb_logger_gets_the_metrics_file_rows(tmp_path, monkeypatch):
    """--wandb_project through the loop: wandb.init with the project, the mode and the run's
    config, one log call per logged step with the metrics file's numbers at that step,
    finish at the end. (wandb itself is an optional extra: a stand-in module records the
    calls; what wandb does with them is its own business.)"""
    import sys
    import types

    calls: dict = {"log": []}

    class FakeRun:
        def log(self, row, step):
            calls["log"].append((step, row))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    metrics = tmp_path / "m.jsonl"
    train(RunConfig.flat(**TINY, ckpt_dir=str(tmp_path / "ck"), metrics_file=str(metrics),
                         wandb_project="proj", wandb_mode="offline"))
    assert calls["init"]["project"] == "proj" and calls["init"]["mode"] == "offline"
    assert calls["init"]["config"]["steps"] == TINY["steps"] and calls.get("finished")
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [s for s, _ in calls["log"]] == [r["step"] for r in rows]
    for (_, logged), row in zip(calls["log"], rows):
        assert logged["train/loss"] == row["loss"]
        assert logged.get("eval/loss") == row.get("eval_loss")


@pytest.mark.slow
def test_hook_edge_cases_a_new_user_tried(tmp_path):
    """A hook's every checked before anything runs; a stop asked in on_start trains no
    step; a hook whose close() raises still lets the run close its directory (the lock
    released, the save committed: the next run resumes). Bugs: every=0 running only at
    the end or None failing after compilation, a step taken after a stop, a lock held
    until the process exits."""
    from jaxmp.run import prepare

    for bad in (0, -1, None, 2.5):
        class Bad(Hook):
            every = bad
        with pytest.raises(ValueError, match=f"every={bad!r} must be an integer >= 1"):
            train(RunConfig.flat(**TINY, ckpt_dir=str(tmp_path / "bad")), hooks=[Bad()])
    assert not (tmp_path / "bad").exists()

    class StopAtOnce(Hook):
        def on_start(self, info):
            info.stop("nothing to do")
    r = train(RunConfig.flat(**TINY, ckpt_dir=str(tmp_path / "none")), hooks=[StopAtOnce()])
    assert r.losses == [] and r.stopped_by == "nothing to do"

    class BadClose(Hook):
        def close(self):
            raise RuntimeError("close failed")
    cfg = RunConfig.flat(**{**TINY, "steps": 3}, ckpt_dir=str(tmp_path / "ck"))
    with pytest.raises(RuntimeError, match="close failed"):
        train(cfg, hooks=[BadClose()])
    run = prepare(RunConfig.flat(**{**TINY, "steps": 5}, ckpt_dir=str(tmp_path / "ck")))
    try:
        assert run.resume_from == 3  # the lock was released and step 3 committed
    finally:
        from jaxmp.run.build import close_run_dir

        close_run_dir(run)
