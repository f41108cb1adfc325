"""Convert between a jaxmp checkpoint and a Hugging Face model directory.

    python -m experiments.convert --input=runs/x --output=gpt2-finetuned     # jaxmp -> HF
    python -m experiments.convert --input=gpt2 --output=ckpt/gpt2             # HF -> jaxmp

The direction follows the input: a directory with config.json is a Hugging Face one. The
output directory must be new (or empty): nothing is overwritten.
"""

from __future__ import annotations

import resource
import time

from absl import app, flags

from jaxmp.cli.startup import parse_flags, run_guarded

F = flags.FLAGS
flags.DEFINE_string("input", None, "A jaxmp checkpoint directory or a Hugging Face directory.")
flags.DEFINE_string("output", None, "The directory to write (new or empty).")
flags.DEFINE_integer("step", None, "jaxmp -> HF: the checkpoint step (default: the newest).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "jaxmp -> HF: the weights' dtype (default float32: exact).")
flags.DEFINE_string("max_shard_size", "2GB", "jaxmp -> HF: largest safetensors shard "
                    "(e.g. 2GB, 500MB); more shards get an index file.")


def convert() -> None:
    from jaxmp import convert, hf

    if not F.input or not F.output:
        raise ValueError("--input and --output are required")
    shard = hf.parse_size(F.max_shard_size)
    t0 = time.perf_counter()
    if hf.is_hf_directory(F.input):
        n = convert.to_checkpoint(F.input, F.output)
        what = f"jaxmp checkpoint (step 0, {n:,} parameters)"
    else:
        names = convert.to_hf(F.input, F.output, step=F.step, dtype=F.dtype,
                              max_shard_bytes=shard)
        what = f"Hugging Face directory ({', '.join(names)})"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {F.output}: {what} in {time.perf_counter() - t0:.2f}s; peak host memory "
          f"{peak:.2f} GiB")


def main(argv: list[str]) -> int:
    return run_guarded(argv, convert)


def console() -> None:
    """The `jaxmp-convert` console script (pyproject's [project.scripts])."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
