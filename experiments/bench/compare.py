"""jaxmp against Hugging Face transformers + torch on the CPU, side by side in one run:
GPT-2 small (float32, one device, random weights), an AdamW training step on 8 x 256
tokens, and greedy KV-cache decoding of 128 new tokens after a 32-token prompt at batch 1
and 8. Part of `bench --suite=speed` when torch and transformers are installed (the
optional `compare` extra; never a test dependency).

The two run in turns (a block of jaxmp steps, then a block of torch steps, and so on), so
neither's thread pool competes with the other's and both see the same machine state; the
figures are medians and the ratios come from this one run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
from collections.abc import Callable

import jax
import numpy as np

from experiments.bench.harness import gpt_trainer, log, saved_checkpoint, single_mesh, timed, tokens_batch
from experiments.bench.results import Json, Target, table
from jaxmp.models.gpt import GPTConfig, preset
from jaxmp.serve import Server
from jaxmp.train import OptConfig

SIDES = ("jaxmp", "torch")


@dataclasses.dataclass(frozen=True)
class CompareSizes:
    overrides: tuple[tuple[str, int], ...] = ()
    batch: int = 8
    seq_len: int = 256
    prompt: int = 32
    new_tokens: int = 128
    gen_batches: tuple[int, ...] = (1, 8)
    rounds: int = 4        # turns of each side
    steps: int = 2         # train steps per turn (after one warm-up per turn)

    def gpt(self) -> GPTConfig:
        return preset("small", vocab_size=50257, **dict(self.overrides))


COMPARE_FULL = CompareSizes()
COMPARE_QUICK = CompareSizes(overrides=(("num_layers", 2), ("d_model", 64), ("num_heads", 4),
                                        ("seq_len", 128)),
                             batch=2, seq_len=32, prompt=8, new_tokens=8, rounds=2, steps=1)


def available() -> bool:
    """Whether torch and transformers are installed (the `compare` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@dataclasses.dataclass(frozen=True)
class CompareResult:
    model: Json
    train_step_s: dict[str, list[float]]            # side -> each timed step
    decode_tokens_per_s: dict[str, dict[str, list[float]]]  # side -> batch -> each timing
    versions: dict[str, str]

    def step_s(self, side: str) -> float:
        return statistics.median(self.train_step_s[side])

    def tokens_per_s(self, side: str, batch: str) -> float:
        return statistics.median(self.decode_tokens_per_s[side][batch])

    def ratios(self) -> dict[str, float]:
        """jaxmp's speed over torch's (> 1: jaxmp faster) per row."""
        out = {"train step": self.step_s("torch") / self.step_s("jaxmp")}
        for b in self.decode_tokens_per_s["jaxmp"]:
            out[f"decode batch {b}"] = self.tokens_per_s("jaxmp", b) / self.tokens_per_s("torch", b)
        return out

    def to_json(self) -> Json:
        return {"compare": {
            "model": self.model, "versions": self.versions,
            "train_step_s": {s: self.step_s(s) for s in SIDES},
            "train_step_times_s": self.train_step_s,
            "decode_tokens_per_s": {s: {b: self.tokens_per_s(s, b)
                                        for b in self.decode_tokens_per_s[s]} for s in SIDES},
            "decode_tokens_per_s_per_turn": self.decode_tokens_per_s, "ratios": self.ratios()}}

    def table(self) -> str:
        r = self.ratios()
        rows = [["training step (s)", f"{self.step_s('jaxmp'):.3f}", f"{self.step_s('torch'):.3f}",
                 f"{r['train step']:.2f}x"]]
        for b in self.decode_tokens_per_s["jaxmp"]:
            rows.append([f"decode batch {b} (tokens/s)", f"{self.tokens_per_s('jaxmp', b):.1f}",
                         f"{self.tokens_per_s('torch', b):.1f}", f"{r[f'decode batch {b}']:.2f}x"])
        v = ", ".join(f"{k} {x}" for k, x in self.versions.items())
        return table(["work", "jaxmp", "transformers + torch", "jaxmp speed / torch's"],
                     rows) + f"\n{v}"

    def targets(self) -> list[Target]:
        r = self.ratios()
        out = [Target("train step speed >= 1.0x torch", "cpu", r["train step"], 1.0,
                      r["train step"] >= 1.0)]
        for b, limit in (("1", 1.2), ("8", 1.0)):
            if f"decode batch {b}" in r:
                v = r[f"decode batch {b}"]
                out.append(Target(f"decode batch {b} >= {limit}x transformers", "cpu", v, limit,
                                  v >= limit))
        return out


def compare_suite(quick: bool) -> CompareResult | None:
    """Both sides on the same model shape (None without torch and transformers)."""
    if not available():
        log("  compare: torch / transformers not installed (pip install -e '.[compare]')")
        return None
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # (its notes on the config are not ours)
    s = COMPARE_QUICK if quick else COMPARE_FULL
    cfg = s.gpt()
    host = tokens_batch(s.batch, s.seq_len, cfg.vocab_size, seed=1)
    sides = {"jaxmp": _jaxmp_side(cfg, host, s), "torch": _torch_side(cfg, host, s)}
    times: dict[str, list[float]] = {n: [] for n in SIDES}
    for _ in range(s.rounds):
        for n in SIDES:
            sides[n]["step"]()  # the turn's warm-up (the first compiles / allocates)
            for _ in range(s.steps):
                times[n].append(timed(sides[n]["step"]))
    log(f"  compare: train step jaxmp {statistics.median(times['jaxmp']):.3f} s, torch "
        f"{statistics.median(times['torch']):.3f} s")
    rng = np.random.default_rng(0)
    decode: dict[str, dict[str, list[float]]] = {n: {} for n in SIDES}
    for b in s.gen_batches:
        prompts = rng.integers(0, cfg.vocab_size, (b, s.prompt))
        for n in SIDES:
            sides[n]["generate"](prompts, s.new_tokens)  # warm-up / compile
            decode[n][str(b)] = []
        for _ in range(s.rounds):
            for n in SIDES:
                t = timed(lambda n=n, p=prompts: sides[n]["generate"](p, s.new_tokens))
                decode[n][str(b)].append(b * s.new_tokens / t)
        log(f"  compare: decode batch {b}: jaxmp {statistics.median(decode['jaxmp'][str(b)]):.1f}"
            f" tokens/s, torch {statistics.median(decode['torch'][str(b)]):.1f}")
    return CompareResult(
        model={**cfg.to_json(), "batch": s.batch, "train_seq_len": s.seq_len,
               "prompt": s.prompt, "new_tokens": s.new_tokens},
        train_step_s=times, decode_tokens_per_s=decode,
        versions={"jax": jax.__version__, "torch": torch.__version__,
                  "transformers": transformers.__version__,
                  "torch_threads": str(torch.get_num_threads())})


def _jaxmp_side(cfg: GPTConfig, host: dict, s: CompareSizes) -> dict[str, Callable]:
    trainer = gpt_trainer(cfg, single_mesh(), opt=OptConfig())
    step, batch = trainer.compiled_step(host), trainer.put_batch(host)
    holder = {"state": trainer.init_state()}

    def train() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    with saved_checkpoint(holder["state"], cfg, trainer.mesh) as (path, _):
        server = Server.from_checkpoint(path, "")

    def generate(prompts: np.ndarray, new: int) -> None:
        server.generate(prompts.tolist(), new)

    return {"step": train, "generate": generate}


def _torch_side(cfg: GPTConfig, host: dict, s: CompareSizes) -> dict[str, Callable]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).float()  # jaxmp's GPT has no dropout
    opt_cfg = OptConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg.learning_rate,
                            betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps,
                            weight_decay=opt_cfg.weight_decay)
    tokens = torch.from_numpy(np.asarray(host["tokens"], np.int64))

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        # transformers shifts the labels itself (predicts labels[1:] from inputs[:-1])
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_norm)
        opt.step()

    def generate(prompts: np.ndarray, new: int) -> None:
        model.eval()
        ids = torch.from_numpy(np.asarray(prompts, np.int64))
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, use_cache=True,
                           pad_token_id=0)

    return {"step": train, "generate": generate}
