"""Simulate 8 CPU devices before any JAX backend starts; share compiled programs between
tests through a persistent compilation cache private to this test session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O0 for XLA's CPU code: compiling dominates these small programs, and it halves
# (a pipelined layout test: 21 s -> 11 s); the operations, and so the numbers, are the
# same. The entry points the tests start inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if "device_count" not in f and "backend_optimization_level" not in f]
    + ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"])

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

# Many tests compile the same program (the single-device reference, a train() resumed
# after run_until, a layout checked twice): XLA's cache keyed on the program text makes
# the second compile a read. New for each session, so nothing carries over between runs.
_CACHE = tempfile.mkdtemp(prefix="jaxmp-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# The entry points the tests start as subprocesses read the same cache (JAX reads its
# settings from these variables), so a train or serve command compiled once is a read after.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """Kill what a test started through helpers.launched and left running (it failed
    before its process ended)."""
    import helpers

    yield
    while helpers.LAUNCHED:
        proc = helpers.LAUNCHED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def one():
    """The HTTP server the quick serving tests share (one warm-up for all of them): the
    Hugging Face GPT-2 fixture on one device, 4 slots of 64 positions (a chat prompt of the
    fixture's template is 45 tokens), a 128-token prefix cache (8 blocks of 16: small
    enough that the tests evict). Yields (url, server, engine)."""
    from test_http import serving

    with serving("", slots=4, max_len=64, prefix_cache_tokens=128) as s:
        yield s
