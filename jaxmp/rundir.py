"""One run directory, one writer, one recorded configuration.

    lock = RunLock(ckpt_dir); lock.acquire()   # a second training there fails at once
    write_config(ckpt_dir, cfg)                # run_config.json + train.flags (replays the run)
    changes = config_changes(saved, cfg)       # what a resume would silently change

The lock is an OS file lock (fcntl.flock) on `<ckpt_dir>/.jaxmp-run.lock`, held while the
run lives: the kernel releases it when the process dies, so a crashed run never leaves a
stale lock behind. The file names the holder (pid, host, start time) for the error a
second training prints.

A resume compares every setting that changes the optimisation or the data with the
config saved beside the checkpoint it resumes (the record of that step holds it); the mesh,
the pipeline layout and everything about logging and checkpoint cadence stay free.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys
from typing import Any

from jaxmp.config import RunConfig, leaves

LOCK = ".jaxmp-run.lock"
CONFIG_JSON = "run_config.json"
FLAGFILE = "train.flags"


class RunDirError(ValueError):
    """The run directory is in use, or a resume would change the run."""


class RunLock:
    """An exclusive, non-blocking OS lock on a run directory for the life of a run."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK)
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        os.makedirs(self.directory, exist_ok=True)
        for _ in range(10):  # the holder may unlink the file between our open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunDirError(f"ckpt_dir={self.directory} is in use by another training "
                                  f"({self.holder()}); wait for it to finish, or use another "
                                  "--ckpt_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise RunDirError(f"ckpt_dir={self.directory}: could not take its run lock {LOCK}")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().isoformat(timespec="seconds"),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, as the holder wrote it."""
        try:
            with open(self.path) as f:
                info = json.load(f)
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "a process that has not written its name yet"

    def release(self) -> None:
        """Remove the lock file (while still holding it) and release it."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


# ---------------------------------------------------------------- the saved configuration
def config_json(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def flag_lines(cfg: RunConfig) -> list[str]:
    """The flags that rebuild `cfg` from experiments.train's defaults: every field, so a
    later change of a default does not change the replay. None (unset) is left out."""
    out = []
    for path, f in leaves(RunConfig):
        value = _get(cfg, path + (f.name,))
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(f"--{f.name}" if value else f"--no{f.name}")
        elif isinstance(value, list):
            out += [f"--{f.name}={v}" for v in value]
        else:
            out.append(f"--{f.name}={value}")
    return out


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = getattr(tree, name)
    return tree


def write_config(directory: str, cfg: RunConfig) -> None:
    """run_config.json and train.flags in the run directory (atomically: a reader never
    sees half a file). `python -m experiments.train --flagfile=<dir>/train.flags` replays
    the run (add --ckpt_dir=<new dir> to replay it elsewhere)."""
    header = ("# jaxmp training flags, written by the run that wrote this directory's newest "
              "checkpoints.\n# Replay: python -m experiments.train --flagfile=THIS_FILE "
              "[--ckpt_dir=NEW_DIR]\n")
    _atomic_write(os.path.join(directory, CONFIG_JSON),
                  json.dumps(config_json(cfg), indent=1, sort_keys=True) + "\n")
    _atomic_write(os.path.join(directory, FLAGFILE), header + "\n".join(flag_lines(cfg)) + "\n")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------- resume comparison
# Settings whose change alters the optimisation or the data a resumed run sees (flat flag
# names). The model's shape is compared separately (the checkpoint must fit the model);
# the mesh, pipeline, logging, evaluation and checkpoint cadence are free to change.
COMPARED = ("learning_rate", "warmup_steps", "weight_decay", "clip_norm", "b1", "b2", "eps",
            "min_lr_ratio", "grad_accum_steps", "batch_size", "seed", "data", "tokenizer",
            "dtype", "steps")


def flat(cfg_json: dict) -> dict[str, Any]:
    """{flat flag name: value} of a RunConfig's JSON."""
    out: dict[str, Any] = {}
    for key, value in cfg_json.items():
        if isinstance(value, dict):
            out.update(flat(value))
        else:
            out[key] = value
    return out


def parse_allowed(text: str | None) -> set[str]:
    names = {n.strip() for n in (text or "").split(",") if n.strip()}
    unknown = names - set(COMPARED)
    if unknown:
        raise ValueError(f"allow_config_change: {', '.join(sorted(unknown))} is not a setting "
                         f"a resume compares; choose from {', '.join(COMPARED)}")
    return names


def config_changes(saved: dict, cfg: RunConfig, step: int) -> tuple[list[str], list[str]]:
    """(refused, noted): one line per compared setting that differs between the saved
    config and `cfg`, refused unless --allow_config_change names it; `noted` says what an
    allowed change (and a longer --steps) does."""
    from jaxmp.train import OptConfig

    old, new = flat(saved), flat(config_json(cfg))
    allowed = parse_allowed(cfg.checkpoint.allow_config_change)
    refused, noted = [], []
    for name in COMPARED:
        if name == "dtype":  # compared on the model's config (its resolved value)
            continue
        if name not in old or old[name] == new.get(name):
            continue
        was, now = old[name], new.get(name)
        if name == "steps" and now > was and "steps" not in allowed:
            pass  # a longer run is the usual reason to resume; say what it does below
        elif name not in allowed:
            refused.append(f"{name}: {was!r} in the checkpoint, {now!r} now")
            continue
        if name in ("steps", "learning_rate", "warmup_steps", "min_lr_ratio"):
            fields = {f.name for f in dataclasses.fields(OptConfig)}
            before = OptConfig(**{k: old[k] for k in fields if k in old and k != "total_steps"},
                               total_steps=old["steps"])
            after = cfg.optimizer_config()
            noted.append(f"{name} {was!r} -> {now!r}: the learning rate at step {step + 1} goes "
                         f"from {float(before.schedule()(step)):.3g} to "
                         f"{float(after.schedule()(step)):.3g}" + (
                             f" and the schedule now ends at step {now}"
                             if name == "steps" else ""))
        else:
            noted.append(f"{name} {was!r} -> {now!r} (allowed by --allow_config_change)")
    return refused, noted
