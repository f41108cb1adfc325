"""The bad-input and fault catalogue: every entry point answers bad input with exactly one
`error:` line and exit 2 before it spends compute, leaves no file behind, never loses a
checkpoint, never orphans a process.

In-process cases check the validation itself (fast); subprocess cases check what a user
sees from each entry point (train, serve, inspect, launch, bench)."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import helpers
import numpy as np
import pytest
from helpers import ROOT, run_module

from jaxmp.checkpoint import CheckpointError, Checkpoints
from jaxmp.config import RunConfig
from jaxmp.demo import train_and_serve
from jaxmp.run import prepare, train

TINY = dict(num_layers=2, d_model=32, num_heads=4, seq_len=32, batch_size=8, log_every=1,
            serve_mesh="", microbatches=2, warmup_steps=1, mesh="data:2,pipe:2,tensor:2")

# ---------------------------------------------------------------- the config, in-process
CONFIG_CASES = [
    (dict(grad_accum_steps=0), "grad_accum_steps=0 must be >= 1"),
    (dict(log_every=0), "log_every=0 must be >= 1"),
    (dict(ckpt_every=0), "ckpt_every=0 must be >= 1"),
    (dict(keep_checkpoints=0), "keep_checkpoints=0 must be >= 1"),
    (dict(steps=0), "steps=0 must be >= 1"),
    (dict(batch_size=-4), "batch_size=-4 must be >= 1"),
    (dict(run_until=0), "run_until=0 must be >= 1"),
    (dict(resume_step=0), "resume_step=0 must be >= 1"),
    (dict(seed=-1), "seed=-1 must be >= 0"),
    (dict(microbatches=0), "microbatches=0 must be >= 1"),
    (dict(num_layers=0), "num_layers=0 must be >= 1"),
    (dict(learning_rate=math.nan), "learning_rate=nan must be a number > 0"),
    (dict(learning_rate=-1e-3), "learning_rate=-0.001 must be a number > 0"),
    (dict(warmup_steps=-1), "warmup_steps=-1 must be >= 0"),
    (dict(clip_norm=math.inf), "clip_norm=inf must be a number > 0"),
    (dict(b1=1.0), "b1=1.0 must be in [0, 1)"),
    (dict(eps=0.0), "eps=0.0 must be a number > 0"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio=2.0 must be in [0, 1]"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1 must be a number >= 0"),
    (dict(batch_size=12, grad_accum_steps=5), "batch_size=12 does not split into "
                                              "grad_accum_steps=5 equal parts"),
    (dict(resume=False, resume_step=2), "resume_step with --noresume"),
    (dict(sequence_parallel=True, activation_rules="sequence=data"),
     "sequence_parallel and activation_rules 'sequence=data' disagree"),
]


@pytest.mark.parametrize("settings,msg", CONFIG_CASES)
def test_every_setting_is_validated(settings, msg):
    """Each of these used to run (nan learning rate), crash later (ZeroDivisionError, an
    Orbax traceback) or be ignored (run_until=0); now a one-line error names it."""
    with pytest.raises(ValueError) as err:
        RunConfig.flat(**settings).validate()
    assert msg in str(err.value) and "\n" not in str(err.value)


def _cfg(tmp, **kw):
    return RunConfig.flat(**{**TINY, "ckpt_dir": str(tmp), **kw})


@pytest.mark.parametrize("kind,msg", [
    ("file", "exists and is not a directory"),
    ("under_file", "is not a writable directory"),
    ("metrics_dir", "metrics_file="),
    ("negative_tokens", "token id -3 is negative"),
    ("accum_vs_data", "must split into grad_accum_steps=2 parts each divisible by data*fsdp=2"),
    ("resume_empty", "holds no checkpoint to resume"),
])
def test_bad_paths_and_files_fail_before_anything_is_created(tmp_path, kind, msg):
    """Checked in `prepare`, before any compile: and an early error leaves no directory."""
    ckpt = tmp_path / "ck"
    kw = {}
    if kind == "file":
        ckpt.write_text("x")
    elif kind == "under_file":
        (tmp_path / "f").write_text("x")
        ckpt = tmp_path / "f" / "ck"
    elif kind == "metrics_dir":
        kw["metrics_file"] = str(tmp_path / "no" / "such" / "m.jsonl")
    elif kind == "negative_tokens":
        np.save(tmp_path / "t.npy", np.array([1, 2, -3, 4] * 40, np.int32))
        kw["data"] = str(tmp_path / "t.npy")
    elif kind == "accum_vs_data":
        kw.update(batch_size=6, grad_accum_steps=2, mesh="data:2,tensor:4")
    elif kind == "resume_empty":
        kw["resume"] = True
    with pytest.raises((ValueError, OSError)) as err:
        prepare(_cfg(ckpt, **kw))
    assert msg in str(err.value), str(err.value)
    if kind in ("metrics_dir", "negative_tokens", "accum_vs_data", "resume_empty"):
        assert not ckpt.exists()  # nothing left behind


@pytest.mark.parametrize("settings,msg", [
    (dict(serve_mesh="tensor:3"), "serve_mesh=tensor:3: "),
    (dict(serve_mesh="tensor:2", serve_prompt=""), "serve_prompt is empty"),
    (dict(serve_mesh="tensor:2", serve_prompt="x" * 40),
     "serve_prompt is 40 tokens but the model's context is seq_len=32"),
])
def test_closing_demo_settings_are_checked_before_training(tmp_path, settings, msg):
    """The closing serve demo's mesh (4 heads on tensor:3), an empty prompt and a prompt
    longer than the context used to fail only after training (a run that trained to its end
    exited 2); now the train entry point's run refuses them before any step, naming the
    flag and --serve_mesh= to skip it."""
    with pytest.raises(ValueError) as err:
        train_and_serve(_cfg(tmp_path / "ck", **settings))
    assert msg in str(err.value) and "--serve_mesh= to skip" in str(err.value), str(err.value)
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------- no checkpoint lost
@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A finished run with checkpoints at steps 3 and 6."""
    d = tmp_path_factory.mktemp("six")
    train(_cfg(d, steps=6, ckpt_every=3))
    assert Checkpoints(str(d), create=False).steps() == [3, 6]
    return d


@pytest.mark.slow
def test_starting_over_refuses_to_delete_another_runs_checkpoints(six_steps):
    """`--noresume` in a directory with checkpoints used to let Orbax's retention delete
    them (steps 3 and 6 gone, exit 0). Now: an error naming them, and they are intact."""
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(steps \[3, 6\]\)"
                                         r".*--overwrite"):
        prepare(_cfg(six_steps, steps=5, ckpt_every=2, resume=False))
    assert Checkpoints(str(six_steps), create=False).steps() == [3, 6]


@pytest.mark.slow
def test_overwrite_is_the_explicit_way_to_start_over(tmp_path):
    train(_cfg(tmp_path, steps=4, ckpt_every=2))
    train(_cfg(tmp_path, steps=3, ckpt_every=3, resume=False, overwrite=True))
    assert Checkpoints(str(tmp_path), create=False).steps() == [3]


@pytest.mark.slow
def test_resuming_past_the_end_says_so(six_steps):
    with pytest.raises(ValueError, match=r"is at step 6, past steps=4; raise --steps"):
        prepare(_cfg(six_steps, steps=4))
    with pytest.raises(ValueError, match=r"run_until=5 is not after the checkpoint's step 6"):
        prepare(_cfg(six_steps, steps=10, run_until=5))
    with pytest.raises(ValueError, match=r"resume_step=3: .* also holds later steps \[6\]"):
        prepare(_cfg(six_steps, steps=10, resume_step=3))
    with pytest.raises(ValueError, match=r"resume_step=4: .* has no checkpoint for it"):
        prepare(_cfg(six_steps, steps=10, resume_step=4))
    assert Checkpoints(str(six_steps), create=False).steps() == [3, 6]


@pytest.mark.slow
def test_a_corrupted_newest_checkpoint_resumes_from_an_earlier_step(tmp_path):
    """The error names the flag that resumes from the step before (train has it now), and
    that flag works: the unreadable step is replaced by the resumed run's."""
    train(_cfg(tmp_path, steps=4, ckpt_every=2))
    for root, _, files in os.walk(tmp_path / "4" / "params"):
        for f in files:
            if not f.startswith("_") and "manifest" not in f:
                (open(os.path.join(root, f), "wb")).write(b"garbage")
    with pytest.raises(CheckpointError) as err:
        train(_cfg(tmp_path, steps=4, ckpt_every=2))
    text = str(err.value)
    assert "step 4" in text and "--resume_step=2 --overwrite" in text and "bound method" not in text
    out = train(_cfg(tmp_path, steps=4, ckpt_every=2, resume_step=2, overwrite=True))
    assert len(out.losses) == 2
    assert Checkpoints(str(tmp_path), create=False).steps() == [2, 4]


# ---------------------------------------------------------------- entry points, as a user runs them
def _no_new_runs(before: set) -> None:
    after = set(os.listdir(f"{ROOT}/runs")) if os.path.isdir(f"{ROOT}/runs") else set()
    assert after == before, f"left behind: {after - before}"


def _runs() -> set:
    return set(os.listdir(f"{ROOT}/runs")) if os.path.isdir(f"{ROOT}/runs") else set()


def _one_error(proc, msg):
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(err) == 1 and msg in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout


ENTRY_CASES = [
    ("experiments.train", ["--steps=abc"], "steps"),
    ("experiments.train", ["--no_such_flag=1"], "no_such_flag"),
    ("experiments.train", ["stray_argument"], "unexpected arguments: stray_argument"),
    ("experiments.train", ["--grad_accum_steps=0"], "grad_accum_steps=0 must be >= 1"),
    ("experiments.train", ["--ckpt_every=0"], "ckpt_every=0 must be >= 1"),
    ("experiments.train", ["--learning_rate=nan"], "learning_rate=nan must be a number > 0"),
    ("experiments.train", ["--dtype=float16"], "dtype"),
    ("experiments.train", ["--model=nope"], "model='nope': no such model family"),
    ("experiments.train", ["--serve_mesh=model:4"], "unknown mesh axis 'model'"),
    ("experiments.serve", [], "--ckpt_dir is required"),
    ("experiments.serve", ["--ckpt_dir=/no/such/dir", "--prompt=x"],
     "ckpt_dir=/no/such/dir: no such directory"),
    ("experiments.serve", ["--ckpt_dir=/tmp", "--prompt=x", "--max_new_tokens=0"],
     "no complete checkpoint"),
    ("experiments.serve", ["--ckpt_dir=/tmp"], "no prompt"),
    ("experiments.inspect", ["--mesh=model:8"], "unknown mesh axis 'model'"),
    ("experiments.inspect", ["--num_layers=0"], "num_layers=0 must be >= 1"),
    ("experiments.inspect", ["--plot=/no/such/dir/x.png"], "plot=/no/such/dir/x.png cannot be"),
    ("experiments.inspect", ["--model=nope"], "no such model family"),
    ("experiments.inspect", ["--search"], "search needs a target accelerator: add --target="),
    ("experiments.inspect", ["--target=h100", "--efficiency=1.5"],
     "efficiency=1.5 must be in (0, 1]"),
    ("experiments.inspect", ["--target=h100", "--search", "--search_top=0"],
     "search_top=0 must be >= 1"),
    ("experiments.launch", ["--num_processes=0"], "--num_processes=0 must be >= 1"),
    ("experiments.launch", ["--port=70000"], "--port=70000 must be in 0..65535"),
    ("experiments.launch", ["--module=bench"], "module"),
    ("experiments.launch", ["--module=serve"], "--module=serve: serving runs in one process"),
    ("experiments.launch", ["--max_restarts=-1"], "--max_restarts=-1 must be >= 0"),
    ("experiments.train", ["--simulate_devices=0"], "simulate_devices=0 must be >= 1"),
    ("experiments.train", ["--attention=cudnn"], "attention=cudnn needs an NVIDIA GPU"),
    ("experiments.train", ["--vocab_size=100000000"], "this run needs at least"),
    ("experiments.train", ["--batch_size=1000000000"], "one global batch of 1000000000"),
    ("experiments.train", ["--data=tests"], "data=tests is a directory"),
    ("experiments.train", ["--ckpt_dir=tests/fixtures/hf_gpt2_tiny"],
     "is a Hugging Face model directory"),
    ("experiments.bench", ["--output=tests"], "--output=tests is a directory"),
    ("experiments.bench", ["--suite=nope"], "suite"),
    ("experiments.bench", ["--output=/no/such/dir/b.json"], "does not exist"),
    ("experiments.bench", ["--layouts=data:3", "--output="], "needs 3 devices but 8"),
    ("experiments.train", ["--init_from=/no/such/dir"], "init_from=/no/such/dir: no such directory"),
    ("experiments.train", ["--eval_every=-1"], "eval_every=-1 must be >= 0"),
    ("experiments.train", ["--data=README.md", "--eval_every=5"], "has no validation split"),
    ("experiments.train", ["--init_from=tests/fixtures/hf_gpt2_tiny", "--d_model=32"],
     "d_model=32 differs from init_from=tests/fixtures/hf_gpt2_tiny's 64"),
    ("experiments.prepare", [], "--input and --output are required"),
    ("experiments.prepare", ["--input=/no/such", "--output=/tmp/jaxmp_prep_x"],
     "input=/no/such: no such file or directory"),
    ("experiments.prepare", ["--input=README.md", "--output=/tmp/jaxmp_prep_x",
                             "--tokenizer=/no/tok.json"], "tokenizer=/no/tok.json: no such file"),
    ("experiments.prepare", ["--input=README.md", "--output=/tmp/jaxmp_prep_x",
                             "--val_fraction=1.5"], "val_fraction=1.5 must be in (0, 1)"),
    ("experiments.serve", ["--ckpt_dir=tests/fixtures/hf_gpt2_tiny", "--http=0"],
     "--http=0 must be a port in 1..65535"),
    ("experiments.serve", ["--ckpt_dir=tests/fixtures/hf_gpt2_tiny", "--http=8123",
                           "--host=0.0.0.0"], "would serve the network without an API key"),
    ("experiments.serve", ["--ckpt_dir=tests/fixtures/hf_gpt2_tiny", "--http=8123",
                           "--slots=3", "--mesh=data:2"], "slots=3 must be a multiple of data*fsdp=2"),
    ("experiments.serve", ["--ckpt_dir=tests/fixtures/hf_gpt2_tiny", "--http=8123",
                           "--prefix_cache_tokens=-1"], "--prefix_cache_tokens=-1 must be >= 0"),
    ("experiments.serve", ["--ckpt_dir=tests/fixtures/hf_gpt2_tiny", "--http=8123",
                           "--chat_template=/no/such.jinja"],
     "chat_template=/no/such.jinja: no such file"),
    ("experiments.serve", ["--ckpt_dir=tests/fixtures/hf_gpt2_tiny", "--http=8123",
                           "--chat_template=tests/fixtures/hf_chat_golden.json"],
     "not a tokenizer_config.json"),
    ("experiments.convert", [], "--input and --output are required"),
    ("experiments.convert", ["--input=/no/such", "--output=/tmp/jaxmp_conv_x"],
     "input=/no/such: no such directory"),
    ("experiments.convert", ["--input=tests/fixtures/hf_gpt2_tiny", "--output=tests"],
     "output=tests exists and is not an empty directory"),
    ("experiments.convert", ["--input=tests/fixtures/hf_gpt2_tiny", "--output=/tmp/jaxmp_conv_x",
                             "--max_shard_size=lots"], "max_shard_size='lots'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("module,flags,msg", ENTRY_CASES,
                         ids=[f"{m.split('.')[1]}:{' '.join(f)}" for m, f, _ in ENTRY_CASES])
def test_entry_points_answer_bad_input_with_one_line(module, flags, msg):
    before = _runs()
    proc = run_module(module, *flags, check=False, timeout=120)
    _one_error(proc, msg)
    _no_new_runs(before)


# ---------------------------------------------------------------- round two, in-process
def _bad_npy(tmp):
    (tmp / "t.npy").write_bytes(b"\x93NUMPY garbage that is no header")
    return dict(data=str(tmp / "t.npy"))


ROUND_TWO = {
    "directory_as_data": (lambda tmp: dict(data=str(tmp)), "is a directory; pass a .txt"),
    "garbled_npy": (_bad_npy, "t.npy: not a readable .npy array"),
    "eval_data_named": (lambda tmp: dict(eval_every=1, eval_data=str(tmp / "v.bin")),
                        "eval_data="),
    "cudnn_on_cpu": (lambda tmp: dict(attention="cudnn"), "attention=cudnn needs an NVIDIA GPU"),
    "huge_vocab": (lambda tmp: dict(vocab_size=100_000_000),
                   "needs at least"),
    "huge_batch": (lambda tmp: dict(batch_size=1_000_000_000), "one global batch of"),
    "profile_too_short": (lambda tmp: dict(steps=3, profile_dir=str(tmp / "prof")),
                          "the trace covers this run's steps 3 to 5, but it takes 3"),
}


@pytest.mark.parametrize("case", list(ROUND_TWO))
def test_round_two_settings_fail_before_compute(tmp_path, case):
    """Each used to fail late or unclearly: a directory as --data (IsADirectoryError), a
    garbled .npy (numpy's pickle error), --eval_data's errors naming --data, cudnn attention
    on a CPU (an XLA error at compile), a vocabulary or batch that cannot fit (printed a
    12.8 GB plan, then the OOM killer; a MemoryError), --profile_dir on a run too short to
    trace (exit 0, no trace). Now one line from prepare, naming the setting, with nothing
    left behind."""
    settings, msg = ROUND_TWO[case]
    with pytest.raises(ValueError) as err:
        prepare(_cfg(tmp_path / "ck", **settings(tmp_path)))
    assert msg in str(err.value) and "\n" not in str(err.value), str(err.value)
    if case == "eval_data_named":
        assert "data=" not in str(err.value).replace("eval_data=", ""), str(err.value)
    assert not (tmp_path / "ck").exists()


MOE_CASES = {
    "no_experts": (dict(num_experts=0), "--num_experts=0 must be >= 1"),
    "top_k_above_experts": (dict(experts_per_token=9), "experts_per_token=9 must be <= "
                                                       "num_experts=8"),
    "negative_capacity": (dict(expert_capacity_factor=-1.0), "expert_capacity_factor=-1.0 "
                                                              "must be a number >= 0"),
    "expert_axis_too_big": (dict(mesh="expert:8", num_experts=4),
                            "(experts=4) is not divisible by mesh axis expert=8"),
    "batch_over_expert": (dict(mesh="data:2,expert:4", batch_size=4),
                          "each divisible by data*fsdp*expert=8"),
    "experts_for_gpt": (dict(model="gpt", num_experts=4),
                        "--num_experts is not a setting of the gpt family"),
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_settings_fail_before_compute(tmp_path, case):
    """A mixture of experts' bad settings, each one line before anything is compiled or
    created: a mesh whose expert axis does not divide the experts names the parameter and
    the fix; the expert axis counts in the batch's split."""
    settings, msg = MOE_CASES[case]
    with pytest.raises(ValueError) as err:
        prepare(_cfg(tmp_path / "ck", **{"model": "moe", "num_layers": 2, **settings}))
    assert msg in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "ck").exists()


CONTEXT_CASES = {
    "seq_len_does_not_split": (dict(mesh="data:2,context:4", seq_len=20),
                               "seq_len=20 does not split into 2 x context = 8 equal chunks"),
    "mlp_has_no_sequence": (dict(model="mlp", mesh="data:4,context:2", seq_len=None,
                                 num_heads=None),
                            "the mlp family has none; drop context from --mesh"),
    "unknown_attention_kind": (dict(mesh="context:8", context_attention="flash"),
                               "context_attention='flash': choose ring or allgather"),
    "sequence_parallel_rule_disagrees": (dict(mesh="context:2,tensor:4", sequence_parallel=True,
                                              activation_rules="sequence=context"),
                                         "sequence_parallel and activation_rules"),
}


@pytest.mark.parametrize("case", list(CONTEXT_CASES))
def test_context_settings_fail_before_compute(tmp_path, case):
    """Context parallelism's bad settings, one line each before anything is compiled or
    created: a sequence that does not split into the zig-zag's 2c chunks, a family without
    a sequence, an attention kind that does not exist."""
    settings, msg = CONTEXT_CASES[case]
    with pytest.raises(ValueError) as err:
        prepare(_cfg(tmp_path / "ck", **{"num_layers": 2, **settings}))
    assert msg in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "ck").exists()


def test_checkpoint_dirs_that_are_not_a_runs_own(tmp_path):
    """--ckpt_dir at a Hugging Face model directory, at one of a run's step directories or
    below a run directory is refused (it used to start a run inside another run's
    checkpoints, or fail in Orbax). The run directory is laid out as a run leaves it."""
    import shutil

    from jaxmp import rundir

    six_steps = tmp_path / "run"
    (six_steps / "3" / "meta").mkdir(parents=True)
    (six_steps / rundir.CONFIG_JSON).write_text("{}")
    hf = tmp_path / "hf"
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf_gpt2_tiny"), hf)
    for path, msg in ((hf, "is a Hugging Face model directory; start from it with "
                           "--init_from"),
                      (six_steps / "3", f"is inside the run directory {six_steps}"),
                      (six_steps / "sub" / "dir", f"is inside the run directory {six_steps}")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            prepare(_cfg(path))
    assert not (six_steps / "sub").exists()


def test_python_api_type_errors_are_one_line(tmp_path):
    """Wrong types through the Python API: a string as Server.generate's prompt list (it
    used to serve each character as a prompt), a float max_new_tokens, None or float token
    ids (silently truncated), a bogus dtype, a step given as a string, an integer export
    dtype (wrote a model of zeros)."""
    from jaxmp.checkpoint import export_params
    from jaxmp.models.gpt import GPTConfig
    from jaxmp.serve import ServeError, check_request

    cfg = GPTConfig(num_layers=1, d_model=32, num_heads=4, seq_len=16)
    for args, msg in ((("hi!", 2), "prompts must be a list of prompts"),
                      ((["hi"], 2.5), "max_new_tokens=2.5 must be an integer"),
                      (([[None]], 2), "prompt 0 holds None; token ids are integers"),
                      (([[1.5, 2]], 2), "prompt 0 holds 1.5"),
                      (([[1, 2]], 2, "x"), "temperature='x' must be a number")):
        with pytest.raises(ServeError, match=re.escape(msg)):
            check_request(cfg, *args)
    with pytest.raises(ValueError, match="dtype='bogus': choose float32 or bfloat16"):
        GPTConfig(dtype="bogus")
    with pytest.raises(ValueError, match="num_layers='4' must be an integer"):
        GPTConfig(num_layers="4")
    with pytest.raises(CheckpointError, match="step='3' must be an integer"):
        Checkpoints(str(tmp_path / "ck")).resolve("3")
    with pytest.raises(ValueError, match="dtype='int8' cannot hold the parameters"):
        export_params(str(tmp_path / "ck"), str(tmp_path / "int8"), dtype="int8")
    assert not (tmp_path / "int8").exists()


@pytest.mark.slow
def test_serve_checks_the_request_before_reading_weights(tmp_path, six_steps):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [(["--max_new_tokens=0"], "max_new_tokens=0 must be >= 1"),
             (["--temperature=-1"], "temperature=-1.0 must be a number >= 0"),
             (["--max_new_tokens=40"], "exceeds the context of 32 tokens"),
             ([f"--prompt_file={bad}"], f"prompt_file={bad} line 2 is not UTF-8"),
             ([f"--prompt_file={empty}"], f"prompt_file={empty} holds no prompt"),
             (["--output_file=/no/such/dir/o.jsonl"], "output_file=/no/such/dir/o.jsonl")]
    for flags, msg in cases:
        proc = run_module("experiments.serve", f"--ckpt_dir={six_steps}", "--prompt=x", *flags,
                          check=False, timeout=120)
        _one_error(proc, msg)


@pytest.mark.slow
def test_launcher_passes_on_a_process_error_line(tmp_path):
    proc = run_module("experiments.launch", "--num_processes=2", "--devices_per_process=2",
                      "--", "--steps=0", f"--ckpt_dir={tmp_path}", check=False, timeout=180)
    _one_error(proc, "process 0: steps=0 must be >= 1")


@pytest.mark.slow
def test_one_device_run_ends_well(tmp_path):
    """The closing demo fits the devices there are: one device, exit 0."""
    proc = run_module("experiments.train", "--simulate_devices=1", "--mesh=data:1", "--steps=2",
                      "--num_layers=2", "--d_model=32", "--seq_len=32", "--batch_size=4",
                      f"--ckpt_dir={tmp_path}", timeout=300)
    assert "serving on one device instead" in proc.stdout and "served step 2" in proc.stdout


@pytest.mark.slow
def test_quiet_by_default(tmp_path):
    proc = run_module("experiments.train", "--steps=2", "--num_layers=2", "--d_model=32",
                      "--seq_len=32", "--serve_mesh=", f"--ckpt_dir={tmp_path}", timeout=300)
    assert not re.search(r"^I\d{4} ", proc.stdout + proc.stderr, re.M)


# ---------------------------------------------------------------- signals
def _launch(tmp_path, steps=100000):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = helpers.CHILD_XLA_FLAGS
    return helpers.launched(subprocess.Popen(
        [sys.executable, "-m", "experiments.launch", "--num_processes=2", "--devices_per_process=4",
         "--", "--num_layers=2", "--d_model=32", "--seq_len=32", "--batch_size=8",
         "--microbatches=2", "--serve_mesh=", "--log_every=1", f"--steps={steps}",
         "--ckpt_every=1000", f"--ckpt_dir={tmp_path}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def _pids_after_step(proc, step=2, timeout=300):
    pids, deadline = {}, time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if m := re.match(r"\[launch\] process (\d) pid (\d+)", line):
            pids[int(m.group(1))] = int(m.group(2))
        if re.match(rf"\[p0\] step +{step}/", line):
            return pids
    proc.kill()
    raise AssertionError("the workers never reached step 2")


def _gone(pids, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_every_worker(tmp_path):
    """Used to: the launcher exited, both workers kept running. Now it forwards the signal,
    each worker checkpoints the same step and exits, and the launcher exits 0."""
    proc = _launch(tmp_path)
    pids = _pids_after_step(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    assert "every process checkpointed and exited" in out
    assert _gone(pids.values(), timeout=10)
    steps = Checkpoints(str(tmp_path), create=False).steps()
    assert len(steps) == 1 and steps[0] >= 2


@pytest.mark.slow
def test_workers_die_with_a_killed_launcher(tmp_path):
    """SIGKILL cannot be forwarded: the kernel sends each worker SIGTERM (PDEATHSIG), and
    they checkpoint and exit rather than run on unowned."""
    proc = _launch(tmp_path)
    pids = _pids_after_step(proc)
    proc.kill()
    proc.wait()
    assert _gone(pids.values(), timeout=120)
    assert Checkpoints(str(tmp_path), create=False).steps()  # they checkpointed on the way out
