"""Train a model-parallel GPT-2, the book's layer-wise MLP, or a registered family.

    python -m experiments.train                       # tiny GPT, data:2,pipe:2,tensor:2, CPU
    python -m experiments.train --model=mlp --simulate_devices=3 --mesh=pipe:3

Every flag is a field of jaxmp.config.RunConfig (defaults and help live there).
"""

from __future__ import annotations

from absl import app, flags

from jaxmp.cli import flagtree
from jaxmp.cli.startup import parse_flags, run_guarded
from jaxmp.config import RunConfig

flagtree.define(RunConfig)
flags.adopt_module_key_flags(flagtree)  # --help lists them as this program's


def main(argv: list[str]) -> int:
    def body() -> None:
        from jaxmp.demo import train_and_serve

        train_and_serve(flagtree.build(RunConfig))
    return run_guarded(argv, body)


def console() -> None:
    """The `jaxmp-train` console script (pyproject's [project.scripts])."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
