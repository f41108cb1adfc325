"""The absl entry points, end to end in subprocesses."""

import json
import re

import pytest
from helpers import ROOT, run_module

pytestmark = pytest.mark.slow  # subprocesses and whole runs: the full suite only

METRIC_KEYS = {"step", "loss", "grad_norm", "learning_rate", "step_time_s", "tokens_per_s", "mfu"}


def test_train_writes_well_formed_metrics_then_serves(tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = run_module("experiments.train", "--steps=4", "--log_every=2", "--num_layers=2",
                      "--d_model=32", "--seq_len=32", f"--metrics_file={metrics}",
                      f"--ckpt_dir={tmp_path}/ck")
    assert "mesh data:2,pipe:2,tensor:2" in proc.stdout
    assert "bubble fraction 0.200" in proc.stdout
    assert "blocks/mlp/fc/kernel" in proc.stdout  # the plan table
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert set(r) == METRIC_KEYS
        assert r["loss"] > 0 and r["step_time_s"] > 0 and r["tokens_per_s"] > 0
        assert r["mfu"] is None  # CPU: no known peak
    assert rows[-1]["loss"] < rows[0]["loss"]
    # the closing demo: restored on another mesh, a greedy completion printed
    assert "served step 4 on tensor:4" in proc.stdout
    out = tmp_path / "out.jsonl"
    served = run_module("experiments.serve", f"--ckpt_dir={tmp_path}/ck", "--mesh=data:2,tensor:2",
                        "--prompt=def f(", "--prompt=x = ", "--max_new_tokens=5",
                        f"--output_file={out}")
    assert "restored step 4 onto data:2,tensor:2" in served.stdout
    assert re.search(r"10 tokens in [\d.]+s: [\d,.]+ tokens/s \(batch 2\)", served.stdout)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["def f(", "x = "]
    assert all(len(r["tokens"]) == 5 and isinstance(r["completion"], str) for r in lines)
    bad = run_module("experiments.serve", f"--ckpt_dir={tmp_path}/ck", "--prompt=x",
                     "--max_new_tokens=40", check=False)
    assert bad.returncode == 2 and "exceeds the context of 32 tokens" in bad.stderr


def test_book_figure_7_1_one_hidden_layer_per_stage(tmp_path):
    proc = run_module("experiments.train", "--model=mlp", "--simulate_devices=3", "--mesh=pipe:3",
                      "--steps=30", "--log_every=10", f"--ckpt_dir={tmp_path}")
    for s in range(3):
        assert f"stage {s} (pipe index {s}): layers [{s}]" in proc.stdout
    losses = [float(x) for x in re.findall(r"step +\d+/\d+ +loss (\S+)", proc.stdout)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("flags,msg", [
    (["--mesh=model:8"], "unknown mesh axis 'model'"),
    (["--mesh=data:3"], "needs 3 devices but 8 are present"),
    (["--num_heads=12", "--d_model=48", "--mesh=tensor:8"], "not divisible by mesh axis tensor=8"),
    (["--data=/nonexistent.txt"], "no such file"),
    (["--pipeline_repeats=2", "--microbatches=1"], "needs microbatches >= pipe size"),
    (["--batch_size=12", "--microbatches=4"], "is not divisible by microbatches=4"),
])
def test_bad_flags_give_one_line_errors(flags, msg):
    proc = run_module("experiments.train", "--steps=1", *flags, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and msg in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_readme_library_example_runs_verbatim():
    readme = open(f"{ROOT}/README.md").read()
    block = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    path = f"{ROOT}/tests/.readme_example.py"
    with open(path, "w") as f:
        f.write(block)
    try:
        proc = run_module("tests.readme_example_runner", path)
    finally:
        import os
        os.remove(path)
    first, last = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert last < 0.5 * first


def test_inspect_prints_plan_and_schedule(tmp_path):
    import importlib.util

    png = tmp_path / "grid.png"
    proc = run_module("experiments.inspect", "--mesh=pipe:4,tensor:2", "--num_layers=8",
                      "--microbatches=4", "--pipeline_repeats=2", f"--plot={png}", check=False)
    assert "blocks/attn/qkv/kernel" in proc.stdout and "bytes/device" in proc.stdout
    assert "stage 0: layers [0, 4]" in proc.stdout
    assert "stage 3     .    .    . F0.0" in proc.stdout
    assert "bubble fraction (p-1)/(r*m+p-1) = 3/11 = 0.273" in proc.stdout
    # the 1F1B grid, through the flag
    one = run_module("experiments.inspect", "--mesh=data:2,pipe:4", "--num_layers=8",
                     "--microbatches=4", "--pipeline_schedule=1f1b")
    assert "schedule 1f1b" in one.stdout and "stage inputs kept: 4" in one.stdout
    assert "stage 3     .    .    . F0B0 F1B1" in one.stdout
    if importlib.util.find_spec("matplotlib"):
        assert proc.returncode == 0 and png.stat().st_size > 0
    else:
        assert proc.returncode == 2 and "--plot needs matplotlib: pip install" in proc.stderr
