"""FP8 weight GEMMs (jaxmp.fp8, --matmul_precision=fp8): the quantisation and the op's
values and gradients against an explicit quantise-dequantise reference in numpy, the
scales, the path through the models and the entry point's functions, and the GPU guard
against a silent fallback."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxmp import fp8
from jaxmp.models.gpt import GPTConfig
from tests import helpers

DIMS = (((1,), (0,)), ((), ()))  # x (n, k) @ w (k, m)


def _qdq_ref(a: np.ndarray, fmt: type, big: float) -> tuple[np.ndarray, float]:
    """Current scaling done by hand: scale = amax / big; q = clip(a / scale) in the format;
    back to float32 times the scale."""
    amax = float(np.max(np.abs(a)))
    scale = np.float32(amax / big) if amax > 0 else np.float32(1.0)
    q = np.clip(a.astype(np.float32) / scale, -big, big).astype(fmt)
    return q.astype(np.float32) * scale, float(scale)


def _arrays(seed=0, n=24, k=40, m=16):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    w = (rng.standard_normal((k, m)) * 0.05).astype(np.float32)
    g = (rng.standard_normal((n, m)) * 1e-3).astype(np.float32)
    return x, w, g


def test_quantize_matches_the_reference_and_the_scale_is_current():
    """E4M3's scale is amax / 448 of the tensor itself (so a tensor twice as large has twice
    the scale and the same codes), E5M2's amax / 57344. Catches a wrong format maximum,
    a scale applied the wrong way round, or a stale scale."""
    x, _, g = _arrays()
    for a, fmt, big in ((x, ml_dtypes.float8_e4m3fn, 448.0), (g, ml_dtypes.float8_e5m2, 57344.0)):
        q, scale = fp8.quantize(jnp.asarray(a), jnp.dtype(fmt))
        ref, ref_scale = _qdq_ref(a, fmt, big)
        assert float(scale) == pytest.approx(ref_scale, rel=1e-7)
        np.testing.assert_array_equal(np.asarray(fp8.dequantize(q, scale, jnp.float32)), ref)
        q2, scale2 = fp8.quantize(jnp.asarray(2 * a), jnp.dtype(fmt))
        assert float(scale2) == pytest.approx(2 * ref_scale, rel=1e-7)
        np.testing.assert_array_equal(np.asarray(q2, np.float32), np.asarray(q, np.float32))
    q0, s0 = fp8.quantize(jnp.zeros((3, 3)), fp8.E4M3)
    assert float(s0) == 1.0 and not np.any(np.asarray(q0, np.float32))


def test_dot_values_and_gradients_match_the_reference():
    """Forward: E4M3 x and w; backward: E5M2 g, then g W^T and x^T g on the dequantised
    operands. Catches the gradient quantised to E4M3 (or not at all), the backward pass
    reading unquantised x or w, or the transposes swapped."""
    x, w, g = _arrays(1)
    y, vjp = jax.vjp(lambda a, b: fp8.dot(a, b, DIMS, jnp.float32), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    xq, _ = _qdq_ref(x, ml_dtypes.float8_e4m3fn, 448.0)
    wq, _ = _qdq_ref(w, ml_dtypes.float8_e4m3fn, 448.0)
    gq, _ = _qdq_ref(g, ml_dtypes.float8_e5m2, 57344.0)
    np.testing.assert_allclose(y, xq @ wq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, gq @ wq.T, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(dw, xq.T @ gq, rtol=1e-5, atol=1e-9)
    # and FP8 is really applied: the exact product differs
    assert not np.allclose(np.asarray(y), x @ w, rtol=1e-4, atol=0)


def test_dot_keeps_the_primal_dtypes_and_bf16_compute():
    """bf16 compute on a float32 weight: the output in bf16, the gradients in the primals'
    own dtypes (x bf16, w float32: the master weight's)."""
    x, w, g = _arrays(2)
    y, vjp = jax.vjp(lambda a, b: fp8.dot(a, b, DIMS, jnp.bfloat16),
                     jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g, jnp.bfloat16))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


def test_precision_context_and_its_check():
    assert not fp8.active()
    with fp8.matmuls("fp8"):
        assert fp8.active()
    assert not fp8.active()
    with pytest.raises(ValueError, match="matmul_precision='fp16'"), fp8.matmuls("fp16"):
        pass
    with pytest.raises(ValueError, match="--matmul_precision='fp16': choose default or fp8"):
        GPTConfig(matmul_precision="fp16")


GEMM = 'custom-call(%a, %b), custom_call_target="{}"'


def test_gpu_guard_refuses_a_step_without_fp8_gemms():
    """The silent fallback is refused with one line on a GPU; on the CPU nothing is checked
    (the arithmetic is emulated there)."""
    with_fp8 = GEMM.format(fp8.GPU_FP8_GEMM) + "\n" + GEMM.format("__cublas$lt$matmul")
    fp8.check_compiled(with_fp8, "gpu")
    assert fp8.fp8_gemms(with_fp8) == 1
    with pytest.raises(fp8.Fp8Error, match="the compiled step has 0 FP8 GEMMs") as e:
        fp8.check_compiled(GEMM.format("__cublas$lt$matmul"), "gpu")
    assert "\n" not in str(e.value)
    fp8.check_compiled("", "cpu")


CFG = GPTConfig(num_layers=2, d_model=32, num_heads=4, seq_len=16, vocab_size=256)


def _run(cfg, steps=3, mesh="single", **layout):
    tr, _ = helpers.layout_trainer(mesh, cfg=cfg, **layout)
    data = helpers.batches(steps, 8, seed=3)
    return helpers.train(tr, data), tr


def test_gpt_trains_in_fp8_close_to_full_precision():
    """Through the Trainer the entry point builds: the losses of --matmul_precision=fp8
    follow float32's within 2% and are not identical (FP8 really applied); the step's
    program holds E4M3 and E5M2 conversions, the default one none. Catches the flag not
    reaching the GEMMs."""
    (ref, _, _), tr_ref = _run(CFG)
    (got, params, norms), tr = _run(dataclasses.replace(CFG, matmul_precision="fp8"))
    np.testing.assert_allclose(got, ref, rtol=2e-2)
    assert got != ref
    assert all(np.isfinite(norms))
    batch = {"tokens": np.zeros((8, 17), np.int32)}
    text = tr.lower(batch).as_text()
    assert "f8E4M3FN" in text and "f8E5M2" in text
    assert "f8E4M3FN" not in tr_ref.lower(batch).as_text()


@pytest.mark.slow
def test_fp8_on_a_mesh_equals_fp8_on_one_device():
    """Per-tensor scales are global (the amax reduced over the mesh): data:2,tensor:2,pipe:2
    with 1f1b gives one device's FP8 losses."""
    cfg = dataclasses.replace(CFG, matmul_precision="fp8")
    (one, _, _), _ = _run(cfg, steps=2)
    (many, _, _), _ = _run(cfg, steps=2, mesh="data:2,tensor:2,pipe:2", p=2, m=2,
                           pipeline_schedule="1f1b")
    np.testing.assert_allclose(many, one, rtol=1e-4)


def test_zero_bubble_with_fp8_refused():
    cfg = dataclasses.replace(CFG, matmul_precision="fp8")
    with pytest.raises(ValueError, match="matmul_precision=fp8 does not run with "
                                         "--pipeline_schedule=zb"):
        helpers.layout_trainer("data:2,pipe:2,tensor:2", p=2, m=2, cfg=cfg,
                               pipeline_schedule="zb")


def test_resume_notes_a_precision_change_and_not_an_old_record():
    """Resuming with another --matmul_precision is allowed and said; a record written
    before the setting existed (no key) counts as the default, so resuming it in the
    default precision says nothing."""
    from types import SimpleNamespace

    from jaxmp.config import RunConfig
    from jaxmp.run.resume import _model_changes

    cfg = RunConfig.flat()
    rec = lambda **c: SimpleNamespace(family="gpt", config={"d_model": 8, **c})
    assert _model_changes(rec(matmul_precision="default"), rec(matmul_precision="fp8"),
                          cfg) == ([], [], ["matmul_precision 'default' -> 'fp8'"])
    assert _model_changes(rec(), rec(matmul_precision="default"), cfg) == ([], [], [])
    assert _model_changes(rec(), rec(matmul_precision="fp8"), cfg)[2] == [
        "matmul_precision 'default' -> 'fp8'"]
