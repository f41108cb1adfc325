"""Tokenize text into the token files experiments.train reads (train.bin, val.bin, and the
tokenizer.json beside them, which training then keeps in its checkpoints).

    python -m experiments.prepare --input=corpus/ --tokenizer=gpt2/ --output=data/mine
    python -m experiments.train --init_from=gpt2 --data=data/mine/train.bin --eval_every=50

--input is a file or directory (repeatable): .txt/.md/... files are one document each,
.jsonl files one document per line ("text"). Without --tokenizer, text is bytes.
"""

from __future__ import annotations

from absl import app, flags

from jaxmp.cli.startup import parse_flags, run_guarded

F = flags.FLAGS
flags.DEFINE_multi_string("input", [], "A text file or a directory of them (repeatable).")
flags.DEFINE_string("tokenizer", None, "tokenizer.json, or a directory holding one (e.g. a "
                    "Hugging Face model directory); default: bytes.")
flags.DEFINE_string("output", None, "Directory for train.bin, val.bin and tokenizer.json.")
flags.DEFINE_float("val_fraction", 0.01, "Share of documents held out for validation.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("overwrite", False, "Replace the train.bin, val.bin and tokenizer.json "
                  "already in --output (all three are rewritten together).")


def prepare() -> None:
    from jaxmp.prepare import prepare as run
    from jaxmp.run.console import check_writable

    if not F.input or not F.output:
        raise ValueError("--input and --output are required")
    check_writable(F.output, "output", directory=True)
    out = run(F.input, F.tokenizer, F.output, val_fraction=F.val_fraction,
              progress=F.progress, overwrite=F.overwrite)
    print(f"{out.documents} documents -> {out.train} ({out.train_tokens:,} tokens), "
          f"{out.val} ({out.val_tokens:,} tokens)")


def main(argv: list[str]) -> int:
    return run_guarded(argv, prepare)


def console() -> None:
    """The `jaxmp-prepare` console script (pyproject's [project.scripts])."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
