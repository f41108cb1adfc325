"""What every entry point answers bad input with: one `error:` line and exit 2. No flags are
defined here, so any entry point (the launcher too) may import it."""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad or unknown flag reported like every other bad input:
    one `error:` line, exit 2 (pass as app.run(main, flags_parser=parse_flags))."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e}; --helpfull lists the flags")


def fail(message: str) -> NoReturn:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)
