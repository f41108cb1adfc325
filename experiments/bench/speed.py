"""The speed suite: jaxmp's one-device train step against a plain JAX + optax GPT
(experiments/bench/reference.py), alternating, on the same weights and batch; then
KV-cache greedy decoding tokens/s; then, where torch and transformers are installed (the
`compare` extra), GPT-2 small side by side with transformers + torch
(experiments/bench/compare.py); and GPT-2 small's LM head + loss fused against plain
(experiments/bench/loss_head.py)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import jax

from experiments.bench import compare as bench_compare
from experiments.bench import loss_head
from experiments.bench import reference as ref
from experiments.bench.harness import generation_speed, gpt_trainer, log, single_mesh, timed, tokens_batch
from experiments.bench.results import Json, Target, table
from jaxmp.models.gpt import GPTConfig, num_params
from jaxmp.train import OptConfig, Trainer

NAMES = ("jaxmp", "reference")


@dataclasses.dataclass(frozen=True)
class SpeedSizes:
    num_layers: int = 8
    d_model: int = 256
    num_heads: int = 8
    seq_len: int = 128
    batch: int = 8
    repeats: int = 7
    prompt: int = 32
    new_tokens: int = 64
    gen_batches: tuple[int, ...] = (1, 8)

    def gpt(self) -> GPTConfig:
        return GPTConfig(num_layers=self.num_layers, d_model=self.d_model,
                         num_heads=self.num_heads, seq_len=self.seq_len)


SPEED_FULL = SpeedSizes()
SPEED_QUICK = SpeedSizes(num_layers=2, d_model=64, num_heads=4, seq_len=64, repeats=5,
                         prompt=16, new_tokens=16)


@dataclasses.dataclass(frozen=True)
class SpeedResult:
    model: Json                          # the GPT config, batch, parameter count
    device: str
    repeats: int
    step_times_s: dict[str, list[float]]  # {"jaxmp", "reference"}: each timed step
    first_call_s: dict[str, float]        # {"jaxmp", "reference"}: compile + first step
    first_step_loss: dict[str, float]     # {"jaxmp", "reference"}: same weights, same batch
    tokens_per_step: int
    generate: Json                        # KV-cache decoding (bench_harness.kv_generation)
    compare: bench_compare.CompareResult | None = None  # against transformers + torch
    loss_head: loss_head.HeadResult | None = None         # fused vs plain LM head + loss

    def step_s(self, name: str) -> float:
        """Median train step time of `name` ('jaxmp' or 'reference')."""
        return statistics.median(self.step_times_s[name])

    @property
    def ratio(self) -> float:
        return self.step_s("jaxmp") / self.step_s("reference")

    def to_json(self) -> Json:
        j, r = self.step_s("jaxmp"), self.step_s("reference")
        loss = self.first_step_loss
        return {"speed": {
            "model": self.model, "device": self.device, "repeats": self.repeats,
            "jaxmp_step_s": j, "reference_step_s": r, "ratio": j / r,
            "jaxmp_step_times_s": self.step_times_s["jaxmp"],
            "reference_step_times_s": self.step_times_s["reference"],
            "first_call_s": self.first_call_s,
            "first_step_loss": {**loss, "abs_diff": abs(loss["jaxmp"] - loss["reference"])},
            "tokens_per_s": {n: self.tokens_per_step / self.step_s(n) for n in NAMES},
            "generate_tokens_per_s": self.generate["tokens_per_s"],
            "generate": self.generate,
            "compare": self.compare.to_json()["compare"] if self.compare else None,
            "loss_head": self.loss_head.to_json() if self.loss_head else None,
        }}

    def table(self) -> str:
        rows = [[n, f"{self.step_s(n) * 1e3:.1f}", f"{self.tokens_per_step / self.step_s(n):,.0f}"]
                for n in NAMES]
        gen = ", ".join(f"batch {b}: {v:,.1f}" for b, v in self.generate["tokens_per_s"].items())
        diff = abs(self.first_step_loss["jaxmp"] - self.first_step_loss["reference"])
        out = (table(["train step", "ms (median)", "tokens/s"], rows)
               + f"\nratio jaxmp/reference: {self.ratio:.3f}; first-step loss difference "
                 f"{diff:.2e}\nKV-cache generation tokens/s: {gen}")
        if self.compare:
            m = self.compare.model
            out += (f"\nside by side with transformers + torch (GPT-2, {m['num_layers']} layers, "
                    f"d={m['d_model']}):\n" + self.compare.table())
        if self.loss_head:
            out += "\n" + self.loss_head.table()
        return out

    def targets(self) -> list[Target]:
        return [Target("jaxmp / reference step time <= 1.05", "one device", self.ratio, 1.05,
                       self.ratio <= 1.05)] + (self.compare.targets() if self.compare else [])


def to_reference_params(params: Any, cfg: GPTConfig) -> ref.Params:
    """jaxmp's GPT parameters in the reference's layout (to check both compute the same)."""
    b, L, d = params["blocks"], cfg.num_layers, cfg.d_model
    return {
        "wte": params["wte"]["embedding"][: cfg.vocab_size], "wpe": params["wpe"],
        "ln1_g": b["ln1"]["scale"], "ln1_b": b["ln1"]["bias"],
        "w_qkv": b["attn"]["qkv"]["kernel"].reshape(L, d, 3 * d),
        "b_qkv": b["attn"]["qkv"]["bias"].reshape(L, 3 * d),
        "w_o": b["attn"]["out"]["kernel"].reshape(L, d, d), "b_o": b["attn"]["out"]["bias"],
        "ln2_g": b["ln2"]["scale"], "ln2_b": b["ln2"]["bias"],
        "w_fc": b["mlp"]["fc"]["kernel"], "b_fc": b["mlp"]["fc"]["bias"],
        "w_proj": b["mlp"]["proj"]["kernel"], "b_proj": b["mlp"]["proj"]["bias"],
        "lnf_g": params["ln_f"]["scale"], "lnf_b": params["ln_f"]["bias"],
    }


def speed_suite(quick: bool) -> SpeedResult:
    """One-device train step: jaxmp vs the plain reference, alternating, median of
    `repeats` after warm-up; then KV-cache greedy decoding tokens/s."""
    s = SPEED_QUICK if quick else SPEED_FULL
    cfg = s.gpt()
    opt = OptConfig()
    trainer = gpt_trainer(cfg, single_mesh(), opt=opt)
    host = tokens_batch(s.batch, cfg.seq_len, cfg.vocab_size, seed=1)
    steps, holder, losses = _paired_steps(cfg, opt, trainer, host)
    first_call = {n: timed(steps[n]) for n in NAMES}  # the first call compiles
    for _ in range(2):
        steps["jaxmp"](), steps["reference"]()
    jax.block_until_ready((holder["state"], holder["rp"]))
    times: dict[str, list[float]] = {n: [] for n in NAMES}
    for i in range(s.repeats):
        for n in (NAMES if i % 2 == 0 else NAMES[::-1]):
            times[n].append(timed(steps[n]))
    log(f"  speed: jaxmp {statistics.median(times['jaxmp']) * 1e3:.1f} ms/step, reference "
        f"{statistics.median(times['reference']) * 1e3:.1f} ms/step")
    gen = generation_speed(cfg, holder["state"], trainer, s.prompt, s.new_tokens, s.gen_batches)
    del holder, steps
    return SpeedResult(
        model={**cfg.to_json(), "batch": s.batch, "params": num_params(cfg)},
        device=str(jax.devices()[0].device_kind), repeats=s.repeats, step_times_s=times,
        first_call_s=first_call, first_step_loss={n: float(losses[n][0]) for n in NAMES},
        tokens_per_step=s.batch * cfg.seq_len, generate=gen,
        compare=bench_compare.compare_suite(quick),
        loss_head=loss_head.head_bench(loss_head.HEAD_QUICK if quick else loss_head.HeadSizes()))


def _paired_steps(cfg: GPTConfig, opt: OptConfig, trainer: Trainer, host: dict[str, Any],
                  ) -> tuple[dict[str, Callable[[], Any]], dict[str, Any], dict[str, list[Any]]]:
    """One train step each of jaxmp and the reference from the same weights on the same
    batch: ({name: step}, the states they advance, {name: losses they return})."""
    batch = trainer.put_batch(host)
    step = trainer.compiled_step(host)
    state = trainer.init_state()
    rcfg = ref.RefConfig(cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.seq_len, cfg.vocab_size)
    tx = ref.optimizer(opt.learning_rate, opt.warmup_steps, opt.total_steps, opt.weight_decay,
                       opt.clip_norm, opt.b1, opt.b2, opt.eps, opt.min_lr_ratio)
    ref_step = ref.make_train_step(rcfg, tx)
    device = jax.devices()[0]
    r_params = jax.device_put(to_reference_params(jax.device_get(state.params), cfg), device)
    r_tokens = jax.device_put(host["tokens"], device)
    holder: dict[str, Any] = {"state": state, "rp": r_params, "ro": tx.init(r_params)}
    losses: dict[str, list[Any]] = {n: [] for n in NAMES}

    def run_jaxmp() -> Any:
        holder["state"], metrics = step(holder["state"], batch)
        losses["jaxmp"].append(metrics["loss"])
        return holder["state"], metrics

    def run_ref() -> Any:
        holder["rp"], holder["ro"], loss = ref_step(holder["rp"], holder["ro"], r_tokens)
        losses["reference"].append(loss)
        return holder["rp"], loss

    return {"jaxmp": run_jaxmp, "reference": run_ref}, holder, losses
