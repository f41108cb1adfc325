"""Data / FSDP / tensor layouts against the same model on one device (float32)."""

import jax
import numpy as np
import pytest
from helpers import CFG, OPT, assert_same_grads, assert_same_run, batches, run, train, trainer

from jaxmp.models.gpt import GPTConfig
from jaxmp.train import OptConfig


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data:8", "fsdp:8", "tensor:8"])
def test_layout_matches_single_device(mesh):
    assert_same_run(run(mesh), run("single"))


@pytest.mark.parametrize("mesh,accum", [
    *(pytest.param(m, 1, marks=pytest.mark.slow) for m in ("data:8", "fsdp:8", "tensor:8")),
    pytest.param("data:2,fsdp:2,tensor:2", 1, marks=pytest.mark.slow),
    pytest.param("data:2,fsdp:2,tensor:2", 4, marks=pytest.mark.slow), ("single", 2)])
def test_gradients_match_single_device(mesh, accum):
    """Gradients themselves, not only losses and parameters: a summed (not averaged)
    accumulation, a gradient reduced twice or missing a shard fails here."""
    worst = assert_same_grads(mesh, accum=accum)
    print(f"{mesh} accum={accum}: largest gradient difference {worst:.1e} of the tensor's max")


@pytest.mark.slow
def test_loss_falls():
    """Three steps on one repeated batch lower its loss, by a margin (a step that does not
    move the parameters, or moves them the wrong way, fails)."""
    tr = trainer("single")
    batch = batches(1)[0]
    losses, _, _ = train(tr, [batch] * 3)
    assert losses[0] - losses[-1] > 0.05, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch():
    # k accumulated parts of a batch == one step on the whole batch (on a sharded mesh too)
    assert_same_run(run("data:2,tensor:2,fsdp:2", accum=4), run("single"))


@pytest.mark.slow
def test_grad_accumulation_single_device():
    assert_same_run(run("single", accum=2), run("single"))


def _state_bytes(mesh: str, cfg: GPTConfig) -> tuple[int, int]:
    tr = trainer(mesh, cfg=cfg)
    batch = batches(1)[0]
    compiled = tr.lower(batch).compile()
    args = compiled.memory_analysis().argument_size_in_bytes
    shards = tr.mesh.size
    batch_bytes = batch["tokens"].nbytes // (8 if mesh.startswith("fsdp") else 1)
    state = args - batch_bytes - 4 - 8  # step counter and rng key
    total = 3 * tr.plan().total_bytes + 2 * 4  # params + adam mu, nu (+ two counts)
    return state, total // shards


@pytest.mark.parametrize("mesh", [pytest.param("fsdp:8", marks=pytest.mark.slow), "tensor:8"])
def test_state_bytes_per_device_near_ideal(mesh):
    cfg = GPTConfig(num_layers=2, d_model=128, num_heads=8, seq_len=16)
    state, ideal = _state_bytes(mesh, cfg)
    print(f"{mesh}: {state} bytes of params+opt state per device, ideal {ideal}, "
          f"ratio {state / ideal:.4f}")
    assert ideal <= state <= 1.05 * ideal


@pytest.mark.slow  # (the quick subset stays under 3 minutes)
def test_nonfinite_step_is_not_applied():
    tr = trainer("data:8", opt=OptConfig(**{**OPT.__dict__, "learning_rate": 1e9}))
    state = tr.init_state()
    finite = []
    for b in batches(3):
        before = np.asarray(state.params["wte"]["embedding"])
        state, m = tr.step(state, tr.put_batch(b))
        finite.append(bool(m["finite"]))
        if not finite[-1]:
            np.testing.assert_array_equal(np.asarray(state.params["wte"]["embedding"]), before)
    assert not all(finite)
    assert all(np.isfinite(np.asarray(x)).all()
               for x in __import__("jax").tree_util.tree_leaves(state.params))


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params_and_tracks_float32():
    """bf16 compute: parameters stay float32 and the run follows the float32 run to bf16
    precision (a bf16 master copy, or a loss computed in bf16, drifts further)."""
    cfg = GPTConfig(**{**CFG.to_json(), "dtype": "bfloat16"})
    losses, params, norms = train(trainer("data:2,tensor:4", cfg=cfg), batches())
    ref_losses, ref_params, ref_norms = run("single")
    assert params["blocks"]["mlp"]["fc"]["kernel"].dtype == np.float32
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-3)
    np.testing.assert_allclose(norms, ref_norms, rtol=5e-2)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                         jax.tree_util.tree_leaves(ref_params)))
    assert diff < 3 * OPT.learning_rate * 3, diff  # within the steps' reach


@pytest.mark.slow
def test_user_model_with_non_parameter_variables_trains():
    """Variables other than nnx.Param (here a fixed statistic) ride along unchanged."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxmp.mesh import make_mesh
    from jaxmp.train import Trainer

    class Noisy(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.w = nnx.Param(jnp.ones((8, 8)) * 0.1, logical_axes=("embed", "mlp"))
            self.scale = nnx.BatchStat(jnp.full((8,), 2.0))

        def __call__(self, x):  # reads the statistic, so it must hold real values
            return (x @ self.w[...]) * self.scale[...]

    tr = Trainer(lambda: Noisy(nnx.Rngs(0)), lambda m, b: jnp.mean((m(b["x"]) - b["x"]) ** 2),
                 make_mesh("data:2,tensor:4"), optimizer=OPT)
    state = tr.init_state()
    x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    losses = []
    for _ in range(3):
        state, m = tr.step(state, tr.put_batch({"x": x}))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
