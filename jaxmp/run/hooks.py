"""The training loop's parts, as hooks: each sees every step's `StepInfo` and acts when due.

    class LossSpike(Hook):          # research code adds its own with one argument
        every = 10
        def on_step(self, info):
            if info.metrics()["loss"] > 10:
                info.stop("loss spike")          # checkpoint this step, then stop

    train(cfg, hooks=[LossSpike(), every(50, lambda info: print(info.step))])

A hook's `on_step` runs after each step whose number is a multiple of `every` (and after
the run's last step when `at_end`), `before_step` before each step, `on_start` before the
first step and `on_end` after the last. The built-in hooks run in this order around the
research ones: the stop signal, the profiler, evaluation, [the hooks passed to train],
checkpointing, progress lines with the metrics file and the loggers (TensorBoard,
Weights & Biases). Every process runs every hook: a hook that calls `info.stop` must
decide the same on every process (the metrics are the same everywhere).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax

from jaxmp import throughput
from jaxmp.run.console import log

# metrics a loss function may report beside the loss, written to the metrics file as they
# come (a mixture of experts' router losses and dropped tokens)
EXTRA_METRICS = ("aux_loss", "router_z_loss", "dropped_fraction")


class NonFiniteLoss(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


class Pending:
    """Step metrics still on the device; `check` fetches them and stops at the first
    non-finite step (whose update the train step did not apply)."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, dict]] = []
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []  # (step, validation loss)
        self.last: dict = {}
        self.last_step = 0
        self.eval_seconds = 0.0  # time spent evaluating since the last progress line

    def add(self, step: int, metrics: dict) -> None:
        self.queue.append((step, metrics))

    def check(self) -> dict:
        """The newest step's metrics as Python floats (every queued step checked)."""
        if not self.queue:
            return self.last
        fetched = jax.device_get([m for _, m in self.queue])
        for (s, _), m in zip(self.queue, fetched):
            if not bool(m["finite"]):
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {s} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}); the update was not applied and no "
                    "checkpoint was written from it. Lower learning_rate, or use "
                    "dtype=float32")
            self.losses.append(float(m["loss"]))
        self.last_step = self.queue[-1][0]
        self.last = {k: float(v) for k, v in fetched[-1].items()}
        self.queue.clear()
        return self.last


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step."""
    run: Any                       # the prepared run (jaxmp.run.build.Run)
    step: int                      # steps completed
    end: int                       # the step this run stops at
    state: Any                     # the train state after the step
    pending: Pending
    stopping: str | None = None    # why the run stops after this step, if it does
    eval_loss: float | None = None  # the validation loss, when evaluated at this step

    def metrics(self) -> dict:
        """This step's metrics (loss, grad_norm, learning_rate, ...) as floats: fetching
        waits for the step (hooks that run rarely keep the loop asynchronous)."""
        return self.pending.check()

    def stop(self, reason: str) -> None:
        """Stop after this step (the checkpoint hook saves it first)."""
        if not self.stopping:
            self.stopping = reason
            log(f"{reason}: stopping after step {self.step}")

    @property
    def last(self) -> bool:
        return self.step == self.end or self.stopping is not None


class Hook:
    """A part of the loop (see the module docstring)."""
    every: int = 1
    at_end: bool = True

    def due(self, info: StepInfo) -> bool:
        return (self.every > 0 and info.step % self.every == 0) or (self.at_end and info.last)

    def on_start(self, info: StepInfo) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def on_step(self, info: StepInfo) -> None:
        pass

    def on_end(self, info: StepInfo) -> None:
        pass

    def close(self) -> None:
        pass


class FunctionHook(Hook):
    def __init__(self, every_n: int, fn: Callable[[StepInfo], Any], at_end: bool = True):
        if every_n < 1:
            raise ValueError(f"every={every_n} must be >= 1")
        self.every, self.fn, self.at_end = every_n, fn, at_end

    def on_step(self, info: StepInfo) -> None:
        self.fn(info)


def every(n: int, fn: Callable[[StepInfo], Any], at_end: bool = True) -> Hook:
    """A hook that calls `fn(info)` every `n` steps (and at the last step if `at_end`)."""
    return FunctionHook(n, fn, at_end)


# ---------------------------------------------------------------- built-in hooks
class StopHook(Hook):
    """The stop signal (SIGTERM / Ctrl-C), agreed by every process after every step."""

    def __init__(self, signal: Any):
        self.signal = signal

    def on_step(self, info: StepInfo) -> None:
        if (reason := self.signal.agreed()) and not info.stopping:
            info.stopping = reason


class ProfileHook(Hook):
    """A profiler trace of the run's steps 3-4 (after compilation), when asked."""
    at_end = False

    def __init__(self, directory: str | None, start: int):
        self.directory, self.first, self.last_step = directory, start + 2, start + 4

    def before_step(self, step: int) -> None:
        if self.directory and step == self.first:
            jax.profiler.start_trace(self.directory)

    def on_step(self, info: StepInfo) -> None:
        if self.directory and info.step - 1 == self.last_step:
            jax.block_until_ready(info.state)
            jax.profiler.stop_trace()


class EvalHook(Hook):
    """The validation loss every --eval_every steps: the same eval_batches batches every
    time, on the training mesh, through the step's own layout."""

    def __init__(self, run: Any):
        self.every = run.cfg.eval.eval_every
        example = run.eval_batches.example()
        self.fn = run.trainer.compiled_eval(example)
        self.shardings = run.trainer.batch_sharding(example)
        self.source, self.count = run.eval_batches, run.cfg.eval.eval_batches

    def due(self, info: StepInfo) -> bool:
        return super().due(info) and not info.stopping

    def on_step(self, info: StepInfo) -> None:
        """The batches are streamed: each is placed, evaluated and dropped in turn (host and
        device memory stay one batch, whatever --eval_batches is)."""
        t0 = time.perf_counter()
        total = None
        for i in range(self.count):
            loss = self.fn(info.state.params, self.source.device(i, self.shardings))
            total = loss if total is None else total + loss
        info.eval_loss = float(jax.device_get(total)) / self.count
        info.pending.eval_seconds += time.perf_counter() - t0
        info.pending.eval_losses.append((info.step, info.eval_loss))


class CheckpointHook(Hook):
    """A checkpoint every --ckpt_every steps, at the last step, and when stopping
    (committed before the run exits)."""

    def __init__(self, run: Any, start: int):
        self.run, self.every, self.saved = run, run.cfg.checkpoint.ckpt_every, start

    def due(self, info: StepInfo) -> bool:
        return super().due(info) or info.stopping is not None

    def on_step(self, info: StepInfo) -> None:
        info.pending.check()  # never checkpoint a state whose steps were not checked
        stopping = bool(info.stopping)
        self.run.ckpts.save(info.state, self.run.record, wait=stopping)
        self.saved = info.step
        log(f"checkpoint step {info.step}: "
            + ("committed" if stopping else "saving in the background"))
        if stopping:
            log(f"stopped by {info.stopping} after step {info.step}; checkpoint committed in "
                f"{self.run.ckpts.directory}")


class ProgressHook(Hook):
    """Progress lines every --log_every steps (and at the first, the last and every
    evaluated step), the metrics file (JSON lines, from process 0), and the loggers given
    (each `log_scalars(step, row)`)."""

    def __init__(self, run: Any, start: int, loggers: list[Any] = ()):
        self.run, self.steps, self.every = run, run.cfg.steps, run.cfg.log.log_every
        self.t_last, self.step_last, self.start = time.perf_counter(), start, start
        fpt = run.family.flops_per_token
        self.flops_per_token = fpt(run.model_cfg) if fpt else None
        self.path = run.cfg.log.metrics_file
        self.loggers = list(loggers)
        self.file = None
        if self.path and jax.process_index() == 0:
            try:
                self.file = open(self.path, "a")
            except OSError as e:
                raise OSError(f"metrics_file={self.path}: cannot open ({e.strerror})") from None

    def due(self, info: StepInfo) -> bool:
        """Every --log_every steps, the first, the last (a stop's too) and every evaluated
        step."""
        return super().due(info) or info.step == self.start + 1 or info.eval_loss is not None

    def on_step(self, info: StepInfo) -> None:
        m, done = info.metrics(), info.step
        now = time.perf_counter()
        # the step time leaves out the evaluations since the last report
        busy = now - self.t_last - info.pending.eval_seconds
        info.pending.eval_seconds = 0.0
        dt = max(busy, 0.0) / max(1, done - self.step_last)
        self.t_last, self.step_last = now, done
        tps = self.run.batches.tokens_per_step / dt
        util = (throughput.mfu(tps, self.flops_per_token, self.run.mesh.size)
                if self.flops_per_token else None)
        eval_loss = info.eval_loss
        log(f"step {done:6d}/{self.steps}  loss {m['loss']:.4f}  "
            f"grad_norm {m['grad_norm']:.3f}  lr {m['learning_rate']:.2e}  "
            f"{tps:,.0f} {self.run.batches.unit}/s  {dt * 1e3:.1f} ms/step  "
            f"ETA {dt * (self.steps - done):.0f}s"
            + (f"  MFU {util:.1%}" if util is not None else "")
            + (f"  eval_loss {eval_loss:.4f}" if eval_loss is not None else "")
            + ("  (includes compile)" if done == self.start + 1 else ""))
        row = {"step": done, "loss": m["loss"], "grad_norm": m["grad_norm"],
               "learning_rate": m["learning_rate"], "step_time_s": dt, "tokens_per_s": tps,
               "mfu": util}
        if eval_loss is not None:
            row["eval_loss"] = eval_loss
        row.update({k: m[k] for k in EXTRA_METRICS if k in m})
        if self.file:
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:  # name the metrics file, not the checkpoints, at fault
                raise OSError(f"metrics_file={self.path}: cannot write step {done} "
                              f"({e.strerror}); the last checkpoint is intact") from None
        for logger in self.loggers:
            logger.log_scalars(done, row)

    def close(self) -> None:
        if self.file:
            self.file.close()
        for logger in self.loggers:
            logger.close()
