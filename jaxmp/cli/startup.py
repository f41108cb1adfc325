"""Flags shared by the entry points, and the guarded start-up every entry point uses."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import flags, logging

from jaxmp.cli.errors import fail, parse_flags  # noqa: F401 (entry points import them here)

SIMULATE = flags.DEFINE_integer(
    "simulate_devices", 8,
    "CPU only: number of simulated CPU devices (ignored where a GPU/TPU backend is used).")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def setup_devices() -> None:
    """Start the distributed runtime (multi-host runs) and simulate CPU devices, before any
    JAX operation. Accelerator backends ignore the simulated count."""
    from jaxmp.distributed import initialize

    initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
               simulate_devices=SIMULATE.value)


def die_with_launcher() -> None:
    """A process started by experiments.launch gets SIGTERM (checkpoint and exit) when the
    launcher dies, even by SIGKILL (Linux PR_SET_PDEATHSIG); if it is already gone, exit."""
    launcher = os.environ.get("JAXMP_LAUNCHER_PID")
    if not launcher:
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the launcher's own forwarding still applies
    if os.getppid() != int(launcher):
        fail("the launcher that started this process has exited")


def run_guarded(argv: list[str], body: Callable[[], int | None]) -> int:
    """Set up devices, run `body`; bad input of any kind ends in one `error:` line, exit 2.
    Anything unexpected too (one line naming the exception; JAXMP_TRACEBACK=1 shows the
    traceback)."""
    from jaxmp.distributed import DistributedError

    die_with_launcher()
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    if not flags.FLAGS["verbosity"].present:  # quiet by default: orbax logs at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        setup_devices()
        return body() or 0
    except KeyboardInterrupt:
        # Ctrl-C before the training loop took over the signals (while compiling, reading
        # data or a checkpoint): one line, and out at once. os._exit: a normal interpreter
        # exit with XLA's compiler threads still running can crash in their teardown.
        print("interrupted (Ctrl-C) before training started; nothing new was saved",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    except DistributedError as e:
        if getattr(e, "peer_lost", False):
            # a peer is gone: JAX's shutdown at exit would wait for it and abort with a
            # stack dump, so say it in one line and leave at once
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        fail(str(e))
    except (ValueError, OSError, FloatingPointError) as e:
        fail(str(e))
    except Exception as e:
        if os.environ.get("JAXMP_TRACEBACK"):
            raise
        fail(f"{type(e).__name__}: {str(e)[:500]} (JAXMP_TRACEBACK=1 shows where)")
