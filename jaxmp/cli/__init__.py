"""What the entry points in experiments/ share: their absl flags generated from the
config tree (flagtree), the one-line error and exit 2 for bad flags (errors), and the
guarded start-up every entry point runs (startup: simulated devices, jax.distributed,
errors as one line). Only entry points import it: startup defines absl flags."""
