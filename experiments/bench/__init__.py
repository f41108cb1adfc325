"""The benchmark suites of `python -m experiments.bench` (the entry point is __main__.py):
structure (collectives and memory per layout), compiling (compile times), speed (jaxmp
against plain JAX, and with `compare` against transformers + torch), serving
(checkpoints, KV-cache generation, the HTTP server, the prefix cache), gpu (an
accelerator's step, MFU and profile), plan_check (the planner against runs); harness and
results are what they share, reference the plain-JAX model."""
