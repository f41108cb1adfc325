"""Try multi-host on one machine: start N local processes on JAX's distributed runtime.

    python -m experiments.launch --num_processes=2 --devices_per_process=4 -- --steps=20
    python -m experiments.launch --module=serve -- --ckpt_dir=runs/X --prompt=hi

Each process runs `python -m experiments.<module>` with --coordinator_address (a free
port on 127.0.0.1), --num_processes, --process_id and --simulate_devices added; output
lines are prefixed with [pN]. If a process dies, the others are stopped and the launcher
exits non-zero with the failing process's last lines.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time

from absl import app, flags

F = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "Local processes to start.")
flags.DEFINE_integer("devices_per_process", 4, "Simulated CPU devices per process.")
flags.DEFINE_enum("module", "train", ["train", "serve"], "Entry point each process runs.")
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0 = pick a free one).")
flags.DEFINE_float("grace_s", 10.0, "Seconds the others get to exit after one fails.")


def _pump(i: int, proc: subprocess.Popen, tail: collections.deque) -> None:
    for line in proc.stdout:
        tail.append(line.rstrip("\n"))
        if not line.startswith("[Gloo]"):  # gloo's per-connection chatter
            print(f"[p{i}] {line}", end="", flush=True)


def main(argv: list[str]) -> int:
    from jaxmp.distributed import free_port

    n = F.num_processes
    if n < 1 or F.devices_per_process < 1:
        print("error: --num_processes and --devices_per_process must be >= 1", file=sys.stderr)
        return 2
    port = F.port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    procs, tails, pumps = [], [], []
    for i in range(n):
        cmd = [sys.executable, "-m", f"experiments.{F.module}", *argv[1:],
               f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
               f"--process_id={i}", f"--simulate_devices={F.devices_per_process}"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        print(f"[launch] process {i} pid {proc.pid}", flush=True)
        tail: collections.deque = collections.deque(maxlen=20)
        pump = threading.Thread(target=_pump, args=(i, proc, tail), daemon=True)
        pump.start()
        procs.append(proc)
        tails.append(tail)
        pumps.append(pump)
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.poll() not in (None, 0):
                failed = i
                break
        time.sleep(0.2)
    if failed is None:
        failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    if failed is not None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + F.grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=2)
        code = procs[failed].returncode
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        print(f"[launch] process {failed} failed ({how}); stopped the others. Its last lines:",
              file=sys.stderr)
        for line in tails[failed]:
            print(f"[p{failed}] {line}", file=sys.stderr)
        return 1
    for t in pumps:
        t.join(timeout=2)
    return 0


if __name__ == "__main__":
    app.run(main)
