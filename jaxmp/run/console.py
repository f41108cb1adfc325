"""Console and file-system helpers every entry point shares: progress lines from process 0
only, and the check that a path the run will write can be written."""

from __future__ import annotations

import os
import sys

import jax


def log(msg: str) -> None:
    """Progress lines come from process 0 only. A reader that has gone away (the launcher
    killed, a closed pipe) must not stop the run before it checkpoints: output then goes
    nowhere."""
    if jax.process_index() == 0:
        try:
            print(msg, flush=True)
        except (BrokenPipeError, OSError):
            sys.stdout = open(os.devnull, "w")


def check_writable(path: str, name: str, *, directory: bool) -> None:
    """`path` is (or can be created as) a writable directory / file."""
    if os.path.exists(path):
        if directory != os.path.isdir(path):
            kind = "a directory" if directory else "a file"
            raise ValueError(f"{name}={path} exists and is not {kind}")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{name}={path} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while directory and not os.path.exists(parent):  # directories are created with parents
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"{name}={path} cannot be created: {parent} is not a writable directory")


def say(msg: str) -> None:
    """A line to stderr from a signal handler (os.write: no buffered-writer lock)."""
    try:
        os.write(2, msg.encode())
    except OSError:
        pass
