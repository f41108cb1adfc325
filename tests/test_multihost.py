"""Two local processes x 4 simulated CPU devices on jax.distributed (gloo collectives)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest
from helpers import ROOT, run_module

from jaxmp.checkpoint import Checkpoints
from jaxmp.distributed import DistributedError, free_port, initialize
from jaxmp.serve import Server

pytestmark = pytest.mark.slow  # subprocesses and whole runs: the full suite only

FLAGS = ["--num_layers=2", "--d_model=32", "--num_heads=4", "--seq_len=32", "--batch_size=8",
         "--microbatches=2", "--mesh=data:2,pipe:2,tensor:2", "--log_every=1", "--serve_mesh=",
         "--steps=12"]


def _losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mh")
    one = run_module("experiments.train", *FLAGS, "--run_until=10", f"--ckpt_dir={tmp}/one",
                     f"--metrics_file={tmp}/one.jsonl")
    two = run_module("experiments.launch", "--num_processes=2", "--devices_per_process=4", "--",
                     *FLAGS, "--run_until=10", f"--ckpt_dir={tmp}/two",
                     f"--metrics_file={tmp}/two.jsonl")
    return tmp, one, two


def test_two_processes_match_one_process(runs):
    tmp, _, two = runs
    assert "2 process(es) x 4 local device(s)" in two.stdout
    a, b = _losses(f"{tmp}/one.jsonl"), _losses(f"{tmp}/two.jsonl")
    assert len(a) == len(b) == 10
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_only_process_zero_logs_progress(runs):
    _, _, two = runs
    assert re.search(r"^\[p0\] step +10/12", two.stdout, re.M)
    assert not re.search(r"^\[p1\] (step|trained|jaxmp|mesh)", two.stdout, re.M)


def test_two_process_checkpoint_restores_in_one_process(runs):
    tmp, _, _ = runs
    one = Server.from_checkpoint(f"{tmp}/one", "data:2,pipe:2,tensor:2")
    two = Server.from_checkpoint(f"{tmp}/two", "data:2,tensor:4")
    # atol 1e-6: the attention key bias has an exactly-zero gradient, so its entries are
    # float noise (~1e-7) that Adam normalizes; every other entry is held to rtol 1e-5.
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                           jax.device_get(two.params), jax.device_get(one.params))
    prompt = [list(b"def main(")]
    assert two.generate(prompt, 8)[0].tokens == one.generate(prompt, 8)[0].tokens


def test_one_process_checkpoint_resumes_in_two_processes(runs, tmp_path):
    tmp, _, _ = runs
    import shutil

    shutil.copytree(f"{tmp}/one", tmp_path / "ck")
    two = run_module("experiments.launch", "--num_processes=2", "--devices_per_process=4", "--",
                     *FLAGS, f"--ckpt_dir={tmp_path}/ck", f"--metrics_file={tmp_path}/m.jsonl")
    assert f"resumed from {tmp_path}/ck step 10" in two.stdout
    straight = run_module("experiments.train", *FLAGS, f"--ckpt_dir={tmp_path}/straight",
                          f"--metrics_file={tmp_path}/s.jsonl")
    assert straight.returncode == 0
    np.testing.assert_allclose(_losses(f"{tmp_path}/m.jsonl"), _losses(f"{tmp_path}/s.jsonl")[10:],
                               rtol=1e-5)
    assert Checkpoints(f"{tmp_path}/ck", create=False).latest_step() == 12


def test_launcher_stops_everything_when_a_process_dies(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = helpers.CHILD_XLA_FLAGS
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.launch", "--num_processes=2",
         "--devices_per_process=4", "--", *FLAGS, "--steps=100000", f"--ckpt_dir={tmp_path}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids, deadline = {}, time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if m := re.match(r"\[launch\] process (\d) pid (\d+)", line):
            pids[int(m.group(1))] = int(m.group(2))
        if re.match(r"\[p0\] step +2/", line):
            break
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - t0 < 60
    assert "[launch] process 1 failed (signal 9); stopped the others" in err
    for pid in pids.values():  # nothing left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_distributed_flag_errors():
    with pytest.raises(DistributedError, match="go together"):
        initialize("127.0.0.1:1234", None, None)
    with pytest.raises(DistributedError, match=r"process_id=2 is out of range for "
                                               r"num_processes=2 \(0\.\.1\)"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(DistributedError, match="must be HOST:PORT"):
        initialize("localhost", 2, 0)


def test_unreachable_coordinator_is_a_bounded_clear_error():
    port = free_port()
    code = ("from jaxmp.distributed import initialize\n"
            f"initialize('127.0.0.1:{port}', 2, 1, simulate_devices=2, timeout_s=5)\n")
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "XLA_FLAGS": helpers.CHILD_XLA_FLAGS}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 90
    assert f"coordinator 127.0.0.1:{port} unreachable after 5s" in proc.stderr


def test_processes_with_different_flags_are_refused(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = helpers.CHILD_XLA_FLAGS
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *FLAGS, f"--steps={12 + i}",
         f"--ckpt_dir={tmp_path}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", "--simulate_devices=4"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 2 for p in procs), outs
    assert "process 1 was started with other training flags than process 0" in outs[0][1]


def _launch_and_kill(args: list[str], kill_at: int, timeout: float = 600) -> tuple[int, str]:
    """Start experiments.launch with `args`; SIGKILL worker 1 once worker 0 has logged step
    `kill_at`. Returns (exit code, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = helpers.CHILD_XLA_FLAGS
    proc = subprocess.Popen([sys.executable, "-m", "experiments.launch", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, victim, killed = [], None, False
    deadline = time.time() + timeout
    for line in proc.stdout:
        out.append(line)
        if victim is None and (m := re.match(r"\[launch\] process 1 pid (\d+)", line)):
            victim = int(m.group(1))
        if not killed and re.match(rf"\[p0\] step +{kill_at}/", line):
            os.kill(victim, signal.SIGKILL)
            killed = True
        if time.time() > deadline:
            proc.kill()
            break
    proc.wait(timeout=60)
    assert killed, "".join(out)[-3000:]
    return proc.returncode, "".join(out)


def test_a_killed_worker_costs_only_the_steps_since_the_last_checkpoint(tmp_path):
    """--max_restarts=1: worker 1 is SIGKILLed at step 6 (checkpoints every 4 steps); the
    launcher stops the other, restarts both, they resume from step 4 and finish; the final
    parameters equal an uninterrupted two-process run's bit for bit."""
    common = ["--num_processes=2", "--devices_per_process=4"]
    flags = [*FLAGS, "--ckpt_every=4"]
    code, out = _launch_and_kill([*common, "--max_restarts=1", "--", *flags,
                                  f"--ckpt_dir={tmp_path}/killed"], kill_at=6)
    assert code == 0, out[-4000:]
    assert "restart 1 of 1" in out and f"resumed from {tmp_path}/killed step 4" in out, out[-4000:]
    run_module("experiments.launch", *common, "--", *flags, f"--ckpt_dir={tmp_path}/straight")
    assert Checkpoints(f"{tmp_path}/killed", create=False).steps()[-1] == 12
    got = Server.from_checkpoint(f"{tmp_path}/killed", "data:2,pipe:2,tensor:2")
    want = Server.from_checkpoint(f"{tmp_path}/straight", "data:2,pipe:2,tensor:2")
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(got.params),
                           jax.device_get(want.params))


def test_a_survivor_names_its_dead_peer_and_the_last_checkpoint(tmp_path):
    """Without --max_restarts: worker 1 SIGKILLed at step 6; worker 0's last line says
    process 1 stopped responding and names the last complete checkpoint (step 4), instead
    of the runtime's abort (a stack dump and signal 6 after its heartbeat timeout)."""
    code, out = _launch_and_kill(["--num_processes=2", "--devices_per_process=4", "--",
                                  *FLAGS, "--ckpt_every=4", f"--ckpt_dir={tmp_path}/ck"],
                                 kill_at=6)
    assert code != 0
    p0 = [line for line in out.splitlines() if line.startswith("[p0] ")]
    assert "process 1 stopped responding" in p0[-1], out[-3000:]
    assert f"Last complete checkpoint: step 4 in {tmp_path}/ck" in p0[-1], p0[-1]
