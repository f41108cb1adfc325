"""absl flags generated from jaxmp's config tree (jaxmp/config.py): one flag per leaf field,
named by the field (the flat names of the command-line contract), with its type,
default, help and choices. `--flagfile` and `--helpfull` work as for any absl flag.

Why not ml_collections' config_flags: it names flags by their path (`--config.layout.mesh`),
and the contract's flags are flat (`--mesh`); a field's flat name is unique in a tree, which
`define` checks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

from jaxmp.config import leaves, replace_flat


def define(tree: type, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define a flag for every leaf field of the config class `tree`."""
    seen: set[str] = set()
    for _, f in leaves(tree):
        if f.name in seen:
            raise ValueError(f"config field {f.name!r} appears twice in {tree.__name__}; flat "
                             "flag names must be unique")
        seen.add(f.name)
        _define(f, flag_values)


def _define(f: dataclasses.Field, fv: flags.FlagValues) -> None:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    text, kind = f.metadata.get("help", f.name), str(f.type)
    choices = f.metadata.get("choices")
    if kind.startswith("list"):
        flags.DEFINE_multi_string(f.name, default, text, flag_values=fv)
    elif choices:
        flags.DEFINE_enum(f.name, default, list(choices), text, flag_values=fv)
    elif kind.startswith("bool"):
        flags.DEFINE_bool(f.name, default, text, flag_values=fv)
    elif kind.startswith("int"):
        flags.DEFINE_integer(f.name, default, text, flag_values=fv)
    elif kind.startswith("float"):
        flags.DEFINE_float(f.name, default, text, flag_values=fv)
    else:
        flags.DEFINE_string(f.name, default, text, flag_values=fv)


def build(tree: type, flag_values: flags.FlagValues = flags.FLAGS) -> Any:
    """An instance of the config class `tree` holding the parsed flag values."""
    return replace_flat(tree(), **{f.name: flag_values[f.name].value for _, f in leaves(tree)})
