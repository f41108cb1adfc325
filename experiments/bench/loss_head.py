"""The LM head and its cross-entropy, forward and backward, fused and chunked
(jaxmp.fused_loss, the default) against the plain head that stores the (B, T, V)
logits: time per call (alternating, medians) and the compiled program's temporaries.
Part of the speed suite (GPT-2 small's head, float32, 8 x 256 tokens) and the gpu suite
(bf16, the gpu suite's batch at T=1024)."""

from __future__ import annotations

import dataclasses
import statistics

import jax
import jax.numpy as jnp

from experiments.bench.harness import log, timed
from experiments.bench.results import Json, mib, table
from jaxmp import fused_loss
from jaxmp.models.decoder import mask_padding, row_losses

KINDS = ("fused", "plain")


@dataclasses.dataclass(frozen=True)
class HeadSizes:
    batch: int = 8
    seq_len: int = 256
    d_model: int = 768
    vocab_size: int = 50257
    dtype: str = "float32"
    repeats: int = 6


HEAD_QUICK = HeadSizes(batch=2, seq_len=64, d_model=64, vocab_size=4000, repeats=2)


@dataclasses.dataclass(frozen=True)
class HeadResult:
    sizes: Json
    times_s: dict[str, list[float]]   # kind -> each timed call (forward + backward)
    temp_bytes: dict[str, int]        # kind -> the compiled program's temporaries
    loss: dict[str, float]            # kind -> the mean loss (the two must agree)

    def time_s(self, kind: str) -> float:
        return statistics.median(self.times_s[kind])

    def to_json(self) -> Json:
        return {"sizes": self.sizes, "times_s": self.times_s, "temp_bytes": self.temp_bytes,
                "loss": self.loss, "median_s": {k: self.time_s(k) for k in KINDS},
                "speedup": self.time_s("plain") / self.time_s("fused")}

    def table(self) -> str:
        rows = [[k, f"{self.time_s(k) * 1e3:.1f}", mib(self.temp_bytes[k]), f"{self.loss[k]:.6f}"]
                for k in KINDS]
        s = self.sizes
        speedup = self.time_s("plain") / self.time_s("fused")
        return (table(["LM head + loss, fwd+bwd", "ms (median)", "temporaries MiB", "loss"], rows)
                + f"\n{s['batch']} x {s['seq_len']} tokens, d={s['d_model']}, "
                  f"vocabulary {s['vocab_size']}, {s['dtype']}; fused {speedup:.2f}x "
                  "the plain head's speed")


def head_bench(s: HeadSizes) -> HeadResult:
    """Both heads on the same inputs, alternating."""
    vp = -(-s.vocab_size // 128) * 128
    dtype = jnp.dtype(s.dtype)
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (s.batch, s.seq_len, s.d_model), dtype)
    table_ = jax.random.normal(k[1], (vp, s.d_model)) * 0.02
    targets = jax.random.randint(k[2], (s.batch, s.seq_len), 0, s.vocab_size)

    def plain(x, w):
        logits = jnp.einsum("btd,vd->btv", x, w.astype(dtype)).astype(jnp.float32)
        return jnp.mean(row_losses(mask_padding(logits, s.vocab_size), targets))

    def fused(x, w):
        return jnp.mean(fused_loss.row_losses(x, w, targets, s.vocab_size, dtype))

    fns = {n: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
           for n, f in (("fused", fused), ("plain", plain))}
    temps = {n: int(f.lower(x, table_).compile().memory_analysis().temp_size_in_bytes)
             for n, f in fns.items()}
    loss = {n: float(f(x, table_)[0]) for n, f in fns.items()}  # (compiles, warms up)
    times: dict[str, list[float]] = {n: [] for n in KINDS}
    for i in range(s.repeats):
        for n in (KINDS if i % 2 == 0 else KINDS[::-1]):
            times[n].append(timed(lambda n=n: fns[n](x, table_)))
    log(f"  loss head: fused {statistics.median(times['fused']) * 1e3:.1f} ms, plain "
        f"{statistics.median(times['plain']) * 1e3:.1f} ms; temporaries "
        f"{mib(temps['fused'])} vs {mib(temps['plain'])} MiB")
    return HeadResult(sizes=dataclasses.asdict(s), times_s=times, temp_bytes=temps, loss=loss)
