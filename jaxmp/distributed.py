"""Multi-host start-up on JAX's own distributed runtime (jax.distributed).

One program per host (or per local process when trying it on one machine). With
--coordinator_address/--num_processes/--process_id the runtime is started explicitly;
without them, on a cluster JAX's own detection (SLURM, Open MPI, cloud TPU) applies, and
on a plain machine the program runs as a single process. On CPU the cross-process
collectives are gloo's, selected before the backend starts.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from jaxmp.mesh import simulate_cpu_devices

# Environment variables by which JAX's cluster detection recognises a managed job.
CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedError(RuntimeError):
    """The multi-process runtime could not start."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(coordinator_address: str | None, num_processes: int | None,
           process_id: int | None) -> None:
    given = [x is not None for x in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise DistributedError("coordinator_address, num_processes and process_id go "
                               "together: give all three (or none, to auto-detect)")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"num_processes={num_processes} must be >= 1")
    if process_id is not None and not 0 <= process_id < (num_processes or 0):
        raise DistributedError(f"process_id={process_id} is out of range for "
                               f"num_processes={num_processes} (0..{num_processes - 1})")
    if coordinator_address is not None:
        host, sep, port = coordinator_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedError(f"coordinator_address={coordinator_address!r} must be "
                                   "HOST:PORT, e.g. 10.0.0.1:1234")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Poll HOST:PORT until it accepts TCP connections; a clear error after timeout_s.

    JAX's client aborts the whole process (a fatal C++ log) when it cannot reach the
    coordinator, so processes other than 0 look for it first."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"coordinator {address} unreachable after {timeout_s:g}s ({e.strerror or e}); "
                    "start process 0 first and check coordinator_address") from None
            time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, simulate_devices: int | None = None,
               timeout_s: int = 120) -> None:
    """Start the distributed runtime if this is a multi-process job, else do nothing.

    simulate_devices: CPU devices this process simulates (ignored on accelerators).
    Must run before any JAX operation.
    """
    _check(coordinator_address, num_processes, process_id)
    if simulate_devices is not None and simulate_devices < 1:
        raise DistributedError(f"simulate_devices={simulate_devices} must be >= 1 (CPU devices "
                               "to simulate)")
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise DistributedError("jax.distributed must start before any JAX operation; call "
                               "jaxmp.distributed.initialize() first")
    if simulate_devices:
        simulate_cpu_devices(simulate_devices)
    explicit = coordinator_address is not None
    cluster = any(v in os.environ for v in CLUSTER_ENV)
    if not explicit and not cluster:
        return
    if explicit and num_processes == 1:
        return
    if explicit and process_id != 0:
        wait_for_coordinator(coordinator_address, timeout_s)
    # CPU collectives across processes need gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=max(10, timeout_s // 4))
    except Exception as e:  # the runtime's own errors are long; keep the cause
        where = coordinator_address or "the auto-detected coordinator"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DistributedError(f"could not join the distributed runtime at {where} within "
                               f"{timeout_s}s (process {process_id} of {num_processes}): {first}; "
                               "check that process 0 runs and the address is reachable") from e


class PeerWatch:
    """A thread that notices, within `stale_s`, a process of this job that has stopped (a
    killed worker, a lost host) and ends this one with one line naming it and `where`
    (what survives: the last complete checkpoint), instead of JAX's coordination-service
    abort (a stack dump, signal 6) after its heartbeat timeout.

    Each process writes a heartbeat counter into the coordination service's key-value
    store every `every_s` and reads the others'; one that has not moved for `stale_s` (or
    a store that cannot be reached: process 0, which holds it, is gone) is lost. The
    thread only reads and writes small keys, so a long compile or checkpoint elsewhere in
    the process does not stop it.
    """

    def __init__(self, where: Callable[[], str], *, every_s: float = 1.0, stale_s: float = 10.0):
        self.where, self.every_s, self.stale_s = where, every_s, stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeerWatch:
        from jax._src import distributed

        client = distributed.global_state.client
        if jax.process_count() > 1 and client is not None:
            self._thread = threading.Thread(target=self._run, args=(client,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def _run(self, client: Any) -> None:
        me, n = jax.process_index(), jax.process_count()
        seen: dict[int, tuple[str, float]] = {}
        beat = 0
        while not self._stop.wait(self.every_s):
            beat += 1
            now = time.monotonic()
            try:
                client.key_value_set(f"jaxmp/heartbeat/{me}", str(beat), allow_overwrite=True)
                for p in range(n):
                    if p == me:
                        continue
                    value = client.key_value_try_get(f"jaxmp/heartbeat/{p}")
                    if p not in seen or seen[p][0] != value:
                        seen[p] = (value, now)
                    elif now - seen[p][1] > self.stale_s:
                        self._lost(f"process {p} stopped responding ({self.stale_s:.0f}s "
                                   "without a heartbeat)")
            except Exception as e:  # noqa: BLE001 (the store is gone with process 0)
                if self._stop.is_set():
                    return
                if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                    continue  # a peer that has not written its first heartbeat yet
                self._lost(f"lost the coordinator (process 0): {str(e).splitlines()[0][:120]}")

    def lost_message(self, what: str) -> str:
        try:
            where = self.where()
        except Exception:  # noqa: BLE001
            where = "the checkpoint directory"
        return (f"process {jax.process_index()}: {what}; the job cannot continue. Last "
                f"complete checkpoint: {where}; restart every process to resume from it "
                "(experiments.launch --max_restarts=N does)")

    def _lost(self, what: str) -> None:
        if self._stop.is_set():
            return
        os.write(2, f"error: {self.lost_message(what)}\n".encode())
        os._exit(1)

    def dead_peers(self, wait_s: float = 3.0) -> str:
        """Which peers have stopped, by whether their heartbeats move within `wait_s` (for
        the error after a collective failed: gloo notices a dead peer at once)."""
        from jax._src import distributed

        client = distributed.global_state.client
        me, n = jax.process_index(), jax.process_count()
        read = lambda: {p: client.key_value_try_get(f"jaxmp/heartbeat/{p}")
                        for p in range(n) if p != me}
        try:
            before = read()
            time.sleep(wait_s)
            after = read()
        except Exception:  # noqa: BLE001 (the store lives in process 0)
            return "process 0 (the coordinator) stopped"
        dead = [p for p in before if before[p] == after[p]]
        if not dead:
            return "a collective failed, though every peer still answers"
        return f"process {', '.join(map(str, dead))} stopped responding"
