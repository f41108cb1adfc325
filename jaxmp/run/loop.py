"""The training loop: steps, and the hooks that act on them.

    result = train(cfg)                          # prepare, then run every step
    result = train(cfg, hooks=[every(100, fn)])  # with research code's own hooks

One step per iteration: the compiled train step, its metrics queued on the device (read
only when a hook asks), then the hooks in order (jaxmp.run.hooks). A first SIGTERM or
Ctrl-C finishes the step, checkpoints and returns; a second aborts at once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxmp import fp8, rundir
from jaxmp.config import RunConfig
from jaxmp.distributed import DistributedError, PeerWatch
from jaxmp.run import checks
from jaxmp.run.build import Run, close_run_dir, describe, prepare
from jaxmp.run.console import log, say
from jaxmp.run.hooks import (
    CheckpointHook,
    EvalHook,
    Hook,
    Pending,
    ProfileHook,
    ProgressHook,
    StepInfo,
    StopHook,
)
from jaxmp.run.resume import resume_or_init
from jaxmp.train import Trainer, TrainState


class PeerLost(DistributedError):
    """Another process of the job stopped: this one cannot go on."""
    peer_lost = True  # the entry point exits at once (JAX's shutdown would wait for it)


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
            say(f"second {name}: aborting now; the last complete checkpoint is kept\n")
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


@dataclasses.dataclass
class RunResult:
    state: TrainState
    trainer: Trainer
    losses: list[float]  # per step, for the steps this run took
    first_loss: float
    last_loss: float
    ckpt_dir: str | None = None
    stopped_by: str | None = None
    eval_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    last_saved: int = 0  # the step of the last checkpoint written
    completion: str | None = None  # what an entry point's closing demo generated


def train(cfg: RunConfig, hooks: Sequence[Hook] = (),
          checks_before: Sequence[Callable[[Run], Any]] = ()) -> RunResult:
    """Prepare the run (every check before any compute; `checks_before` are more, given
    the prepared run) and take its steps with the built-in hooks and `hooks`."""
    check_hooks(hooks)
    run = prepare(cfg)
    try:
        for check in checks_before:
            check(run)
    except BaseException:
        close_run_dir(run)
        raise
    return execute(run, hooks)


def loggers(cfg: RunConfig) -> list[Any]:
    """The metric loggers the log flags ask for (process 0 only)."""
    if jax.process_index() != 0:
        return []
    from jaxmp.run import loggers as sinks

    return sinks.from_config(cfg)


def check_hooks(hooks: Sequence[Hook]) -> None:
    """Each hook is a Hook with an integer `every` >= 1 (before anything runs)."""
    for h in hooks:
        if not isinstance(h, Hook):
            raise TypeError(f"hooks: {h!r} is not a jaxmp.run.Hook (wrap a function with "
                            "jaxmp.run.every(n, fn))")
        every = getattr(h, "every", None)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"hook {type(h).__name__}: every={every!r} must be an integer "
                             ">= 1 (the steps between its calls)")


def _close(hooks: Sequence[Hook], run: Run) -> None:
    """Close every hook, then the run directory (waiting for a save in flight, releasing
    the lock), whatever fails; the first failure is raised afterwards."""
    errors: list[BaseException] = []
    for h in hooks:
        try:
            h.close()
        except Exception as e:  # the others and the run directory still close
            errors.append(e)
    close_run_dir(run)
    if errors:
        raise errors[0]


def execute(run: Run, hooks: Sequence[Hook] = ()) -> RunResult:
    """Take the prepared run's steps; closes the run directory however it ends."""
    cfg = run.cfg
    try:
        check_hooks(hooks)
    except BaseException:
        close_run_dir(run)
        raise
    stop, pending = StopSignal(), Pending()
    built: list[Hook] = []
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
        saving = CheckpointHook(run, start)
        built = [StopHook(stop), ProfileHook(cfg.log.profile_dir, start)]
        built += [EvalHook(run)] if run.eval_batches is not None else []
        built += [*hooks, saving, ProgressHook(run, start, loggers(cfg))]
        t0 = time.perf_counter()
        with stop, PeerWatch(lambda: checks.last_complete(run.ckpts.directory)) as peers:
            try:
                state, stopped_by = _loop(run, state, start, end, pending, built)
            except jax.errors.JaxRuntimeError as e:
                if jax.process_count() == 1:
                    raise
                raise PeerLost(peers.lost_message(
                    f"{peers.dead_peers()} ({str(e).splitlines()[0][:100]})")) from None
    finally:
        _close(built, run)  # waits for an asynchronous save in flight
    return _finish(run, state, pending, saving.saved, stopped_by, time.perf_counter() - t0)


def _loop(run: Run, state: TrainState, start: int, end: int, pending: Pending,
          hooks: list[Hook]) -> tuple[TrainState, str | None]:
    """The steps: train, queue the metrics, run the hooks that are due. Returns the state
    and why the run stopped early (None: it reached its end)."""
    example = run.batches.example()
    shardings, step_fn = run.trainer.batch_sharding(example), run.trainer.compiled_step(example)
    if getattr(run.model_cfg, "matmul_precision", "default") == "fp8":
        log(fp8.check_step(run.trainer, example))
    info = StepInfo(run, start, end, state, pending)
    for h in hooks:
        h.on_start(info)
    if info.stopping:  # asked to stop before the first step: nothing to train or save
        return state, info.stopping
    for step in range(start, end):
        for h in hooks:
            h.before_step(step)
        state, metrics = step_fn(state, run.batches.device(step, shardings))
        pending.add(step + 1, metrics)
        info = StepInfo(run, step + 1, end, state, pending, stopping=info.stopping)
        for h in hooks:
            if h.due(info):
                h.on_step(info)
        if info.stopping:
            break
    pending.check()
    for h in hooks:
        h.on_end(info)
    return state, info.stopping


def _finish(run: Run, state: TrainState, pending: Pending, saved: int,
            stopped_by: str | None, seconds: float) -> RunResult:
    losses = pending.losses
    first = losses[0] if losses else math.nan
    last = losses[-1] if losses else math.nan
    log(f"trained {len(losses)} steps in {seconds:.1f}s; loss {first:.4f} -> {last:.4f}; "
        f"last checkpoint: step {saved} in {run.ckpts.directory}")
    return RunResult(state, run.trainer, losses, first, last, run.ckpts.directory, stopped_by,
                     pending.eval_losses, saved)
