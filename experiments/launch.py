"""Try multi-host on one machine: start N local processes on JAX's distributed runtime.

    python -m experiments.launch --num_processes=2 --devices_per_process=4 -- --steps=20 \
        --ckpt_dir=runs/x
    python -m experiments.launch --max_restarts=3 -- --steps=2000 --ckpt_dir=runs/x

Each process runs `python -m experiments.<module>` with --coordinator_address (a free
port on 127.0.0.1), --num_processes, --process_id and --simulate_devices added; output
lines are prefixed with [pN]. If a process dies, the others are stopped and the launcher
exits non-zero with the failing process's last lines (a bad flag: its `error:` line, exit 2).
SIGTERM or Ctrl-C to the launcher is forwarded to every process (each checkpoints and
exits); the launcher waits for them and exits 0 if they all stopped cleanly. If the
launcher itself is killed, the processes get SIGTERM from the kernel (Linux
PR_SET_PDEATHSIG), so none is left behind.

With --max_restarts=N a failure (a process killed, a lost peer; not a bad input) stops
every process and starts them all again, up to N times: they resume from the last complete
checkpoint (the run's own --resume default), so a failure costs only the steps since it.
Serving runs in one process: `python -m experiments.serve` (its mesh spans that process's
devices), so --module=serve is refused.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

from jaxmp.cli.errors import fail, parse_flags

F = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "Local processes to start.")
flags.DEFINE_integer("devices_per_process", 4, "Simulated CPU devices per process.")
flags.DEFINE_enum("module", "train", ["train", "serve"], "Entry point each process runs.")
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0 = pick a free one).")
flags.DEFINE_float("grace_s", 20.0, "Seconds the others get to exit after one fails (a "
                   "survivor notices a lost peer within 10 s and says so).")
flags.DEFINE_integer("max_restarts", 0, "After a process fails (not a bad input), stop the "
                     "others and restart every process from the last complete checkpoint, "
                     "at most this many times.")
flags.DEFINE_float("stop_timeout_s", 300.0, "After a forwarded SIGTERM / Ctrl-C: seconds the "
                   "processes get to checkpoint and exit before they are killed.")


class Workers:
    """The started processes, their output pumps and the last lines of each."""

    def __init__(self, argv: list[str]):
        from jaxmp.distributed import free_port

        n, port = F.num_processes, F.port or free_port()
        # the process asks the kernel for SIGTERM when the launcher dies (common.py)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAXMP_LAUNCHER_PID": str(os.getpid())}
        env.pop("XLA_FLAGS", None)
        self.procs: list[subprocess.Popen] = []
        self.tails = [collections.deque(maxlen=20) for _ in range(n)]
        self.pumps: list[threading.Thread] = []
        for i in range(n):
            cmd = [sys.executable, "-m", f"experiments.{F.module}", *argv,
                   f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
                   f"--process_id={i}", f"--simulate_devices={F.devices_per_process}"]
            # own session: a terminal's Ctrl-C reaches the launcher only, which forwards it
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            print(f"[launch] process {i} pid {proc.pid}", flush=True)
            pump = threading.Thread(target=self._pump, args=(i, proc), daemon=True)
            pump.start()
            self.procs.append(proc)
            self.pumps.append(pump)

    def _pump(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.tails[i].append(line.rstrip("\n"))
            if not line.startswith("[Gloo]"):  # gloo's per-connection chatter
                print(f"[p{i}] {line}", end="", flush=True)

    def signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for every process; kill what is left."""
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in self.pumps:
            t.join(timeout=2)

    def first_failure(self) -> int | None:
        return next((i for i, p in enumerate(self.procs) if p.poll() not in (None, 0)), None)


def main(argv: list[str]) -> int:
    checks = [("num_processes", F.num_processes >= 1, ">= 1"),
              ("devices_per_process", F.devices_per_process >= 1, ">= 1"),
              ("port", 0 <= F.port <= 65535, "in 0..65535"),
              ("grace_s", F.grace_s > 0, "> 0"), ("stop_timeout_s", F.stop_timeout_s > 0, "> 0"),
              ("max_restarts", F.max_restarts >= 0, ">= 0")]
    for name, ok, want in checks:
        if not ok:
            fail(f"--{name}={F[name].value} must be {want}")
    if F.module == "serve":
        fail("--module=serve: serving runs in one process (its mesh spans that process's "
             "devices); run python -m experiments.serve instead")
    stopped: list[str] = []
    current: list[Workers] = []

    def forward(signum: int, frame: object) -> None:  # no print here: it may re-enter one
        stopped.append(signal.Signals(signum).name)
        for w in current:
            w.signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    args = argv[1:]
    for attempt in range(F.max_restarts + 1):
        workers = Workers(args)
        current[:] = [workers]
        while not stopped and workers.first_failure() is None and any(
                p.poll() is None for p in workers.procs):
            time.sleep(0.2)
        if stopped:
            print(f"[launch] {stopped[0]}: forwarded to every process; waiting up to "
                  f"{F.stop_timeout_s:.0f}s for them to checkpoint and exit", flush=True)
            return _after_stop(workers, stopped[0])
        failed = workers.first_failure()
        if failed is None:
            workers.wait(F.grace_s)
            return 0
        code = _after_failure(workers, failed, last=attempt == F.max_restarts)
        if code == 2 or attempt == F.max_restarts or stopped:
            return code
        print(f"[launch] restart {attempt + 1} of {F.max_restarts}: starting every process "
              "again; they resume from the last complete checkpoint", flush=True)
        args = restart_args(args)
    return 1


# Flags that would make a restarted process start over (deleting checkpoints) or resume
# another step than the newest: a restart resumes the newest complete checkpoint.
START_OVER = ("--resume", "--noresume", "--overwrite", "--nooverwrite", "--resume_step")


def restart_args(args: list[str]) -> list[str]:
    """The processes' flags for a restart: those that choose how to start dropped, so the
    run's default applies (resume from the newest checkpoint when there is one)."""
    return [a for a in args if a.split("=")[0] not in START_OVER]


def _after_stop(workers: Workers, name: str) -> int:
    workers.wait(F.stop_timeout_s)
    codes = [p.returncode for p in workers.procs]
    if all(c == 0 for c in codes):
        print(f"[launch] stopped by {name}: every process checkpointed and exited", flush=True)
        return 0
    print(f"[launch] stopped by {name}: exit codes {codes}", file=sys.stderr)
    return 1


def _after_failure(workers: Workers, failed: int, last: bool = True) -> int:
    workers.signal(signal.SIGTERM)
    workers.wait(F.grace_s)
    # a bad input fails every process alike: name the lowest one that said so, whichever
    # exited first
    said = [i for i, p in enumerate(workers.procs) if p.returncode == 2
            and any(line.startswith("error:") for line in workers.tails[i])]
    failed = min(said) if said else failed
    code = workers.procs[failed].returncode
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    errors = [line for line in workers.tails[failed] if line.startswith("error:")]
    if code == 2 and errors:  # a bad input: the process said what, in one line
        print(f"error: process {failed}: {errors[-1][len('error:'):].strip()}", file=sys.stderr)
        return 2
    print(f"[launch] process {failed} failed ({how}); stopped the others. Its last lines:",
          file=sys.stderr)
    if not last:
        for line in list(workers.tails[failed])[-3:]:
            print(f"[p{failed}] {line}", file=sys.stderr)
        return 1
    for line in workers.tails[failed]:
        print(f"[p{failed}] {line}", file=sys.stderr)
    return 1


def console() -> None:
    """The `jaxmp-launch` console script (pyproject's [project.scripts])."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
