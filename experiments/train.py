"""Train a model-parallel GPT-2 or the book's layer-wise MLP.

    python -m experiments.train                       # tiny GPT, data:2,pipe:2,tensor:2, CPU
    python -m experiments.train --model=mlp --simulate_devices=3 --mesh=pipe:3
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags

from experiments.common import setup_devices

D = dataclasses.fields
F = flags.FLAGS
flags.DEFINE_enum("model", "gpt", ["gpt", "mlp"], "Model family.")
flags.DEFINE_enum("preset", "tiny", ["tiny", "small", "medium", "large", "xl"], "GPT-2 shape.")
flags.DEFINE_integer("num_layers", None, "Override: decoder layers (GPT) or hidden layers (MLP).")
flags.DEFINE_integer("d_model", None, "Override: model width (GPT) or hidden width (MLP).")
flags.DEFINE_integer("num_heads", None, "Override: attention heads.")
flags.DEFINE_integer("seq_len", None, "Override: context length.")
flags.DEFINE_integer("vocab_size", None, "Vocabulary (default 256 for bytes, 50257 for tokens).")
flags.DEFINE_string("mesh", "data:2,pipe:2,tensor:2", "Mesh, e.g. data:2,pipe:2,tensor:2.")
flags.DEFINE_integer("microbatches", 4, "Pipeline micro-batches per data shard.")
flags.DEFINE_integer("pipeline_repeats", 1, "Circular pipeline rounds (layer groups per stage).")
flags.DEFINE_integer("batch_size", 16, "Global batch in sequences (the same on every mesh).")
flags.DEFINE_integer("steps", 200, "Training steps.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", 20, "Linear warm-up steps before cosine decay.")
flags.DEFINE_integer("grad_accum_steps", 1, "Gradient accumulation steps per update.")
flags.DEFINE_integer("seed", 0, "Seed of the initialisation and of the data order.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum("remat", "none", ["none", "block", "dots"], "Rematerialization policy.")
flags.DEFINE_string("data", "builtin", "builtin | path to .txt (bytes) | .bin/.npy uint16 tokens.")
flags.DEFINE_string("rules", "", "Parameter rule overrides, e.g. 'embed=;mlp=tensor'.")
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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        setup_devices()
    except (ValueError, RuntimeError) as e:  # bad mesh/multi-host flags: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jaxmp.experiment import RunConfig, train

    cfg = RunConfig(**{f.name: F[f.name].value for f in D(RunConfig)})
    try:
        train(cfg)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
