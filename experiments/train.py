"""Train a model-parallel GPT-2 or the book's layer-wise MLP.

    python -m experiments.train                       # tiny GPT, data:2,pipe:2,tensor:2, CPU
    python -m experiments.train --model=mlp --simulate_devices=3 --mesh=pipe:3
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

from experiments.common import define_model_flags, run_guarded

D = dataclasses.fields
F = flags.FLAGS
define_model_flags()
flags.DEFINE_integer("batch_size", 16, "Global batch in sequences (the same on every mesh).")
flags.DEFINE_integer("steps", 200, "Training steps.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", 20, "Linear warm-up steps before cosine decay.")
flags.DEFINE_integer("grad_accum_steps", 1, "Gradient accumulation steps per update.")
flags.DEFINE_integer("seed", 0, "Seed of the initialisation and of the data order.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum("remat", "none", ["none", "block", "dots"], "Rematerialization policy.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn"],
                  "Training attention kernel (cudnn: flash attention on NVIDIA GPUs, bf16).")
flags.DEFINE_bool("scan_layers", True, "Apply the layers with a scan (compile time independent "
                  "of depth); --noscan_layers unrolls them (faster steps on GPUs).")
flags.DEFINE_string("data", "builtin", "builtin | path to .txt (bytes) | .bin/.npy uint16 tokens.")
flags.DEFINE_string("activation_rules", "", "Activation rule overrides, e.g. 'batch=data'.")
flags.DEFINE_string("metrics_file", None, "JSON-lines metrics file (process 0 writes it).")
flags.DEFINE_integer("log_every", 10, "Steps between progress lines.")
flags.DEFINE_string("profile_dir", None, "Write a JAX profiler trace of steps 3-4 here.")
flags.DEFINE_string("ckpt_dir", None, "Checkpoint directory (default: a new runs/<time>).")
flags.DEFINE_integer("ckpt_every", 100, "Steps between checkpoints (and one at the end).")
flags.DEFINE_integer("keep_checkpoints", 3, "Newest checkpoints kept.")
flags.DEFINE_bool("resume", None, "Resume from --ckpt_dir (default: when it holds checkpoints; "
                  "--noresume starts over).")
flags.DEFINE_bool("async_checkpoint", True, "Write checkpoints while training continues.")
flags.DEFINE_string("serve_mesh", "tensor:4", "Mesh of the closing serve demo ('' skips it).")
flags.DEFINE_integer("run_until", None, "Stop (with a checkpoint) after this step, keeping the "
                     "learning-rate schedule of --steps; resume later to continue.")
flags.DEFINE_string("serve_prompt", "def main(", "Prompt of the closing serve demo.")


def main(argv: list[str]) -> int:
    def body() -> None:
        from jaxmp.experiment import RunConfig, train

        train(RunConfig(**{f.name: F[f.name].value for f in D(RunConfig)}))
    return run_guarded(argv, body)


if __name__ == "__main__":
    app.run(main)
