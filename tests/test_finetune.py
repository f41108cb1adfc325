"""Fine-tuning from a Hugging Face model: prepared token files, --init_from, validation loss,
and the commands around them (prepare, convert, serve and inspect on an HF directory).

Bugs these catch: init_from ignored or read into the wrong layer order under a pipeline,
a validation loss that differs between layouts or is computed on training data, eval
batches that change between evaluations, token files that drop or reorder documents, a
converter that is not exact, an output directory overwritten.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import run_module
from test_hf import TINY, _tensors

from jaxmp import data
from jaxmp.config import ModelSpec, RunConfig
from jaxmp.demo import train_and_serve as train
from jaxmp.mesh import make_mesh
from jaxmp.models.gpt import GPT, lm_loss
from jaxmp.prepare import prepare as prepare_text
from jaxmp.pretrained import open_source
from jaxmp.run import model_config, prepare
from jaxmp.tokenizer import TextCodec, read_tokenizer
from jaxmp.train import Trainer

# Eight similar documents (so training on six lowers the loss on the two held out), one
# with non-ASCII text, the last in a .jsonl file.
DOCS = [f"def f{k}(x):\n    return x * {k} + {k * k}\n" * 12 for k in range(7)]
DOCS[1] += "naïve café 東京 🙂\n"
DOCS.append("def f7(x):\n    return x * 7 + 49\n" * 12)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four documents (one of them in a .jsonl file) prepared with the fixture's tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    text = root / "text"
    text.mkdir()
    for i, doc in enumerate(DOCS[:7]):
        (text / f"{i}.txt").write_text(doc, encoding="utf-8")
    (text / "7.jsonl").write_text(json.dumps({"text": DOCS[7]}) + "\n", encoding="utf-8")
    out = prepare_text([str(text)], TINY, str(root / "data"), val_fraction=0.25, progress=False)
    return out


def test_prepare_keeps_every_document_in_order(corpus):
    codec = TextCodec(500, read_tokenizer(TINY))
    eot = codec.end_of_text()
    train_ids = np.asarray(data.load_tokens(corpus.train, 500)).tolist()
    val_ids = np.asarray(data.load_tokens(corpus.val, 500)).tolist()
    want = [codec.encode(d) + [eot] for d in DOCS]
    assert val_ids == want[3] + want[7]  # every 4th document (val_fraction 0.25)
    assert train_ids == sum((want[i] for i in (0, 1, 2, 4, 5, 6)), [])
    assert codec.decode(train_ids).split("<|endoftext|>")[:6] == [DOCS[i] for i in (0, 1, 2, 4, 5, 6)]
    assert corpus.documents == 8 and corpus.val_tokens == len(want[3]) + len(want[7])
    # the tokenizer travels with the data: training picks it up from beside train.bin
    assert read_tokenizer(os.path.dirname(corpus.train)) == read_tokenizer(TINY)


def test_prepare_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"bad.txt line 2 is not UTF-8 \(byte 14"):
        prepare_text([str(bad)], None, str(tmp_path / "o1"), progress=False)
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl line 2: expected a JSON object"):
        prepare_text([str(jl)], None, str(tmp_path / "o2"), progress=False)
    with pytest.raises(ValueError, match="no such file or directory"):
        prepare_text([str(tmp_path / "nope")], None, str(tmp_path / "o3"), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        prepare_text([str(empty)], None, str(tmp_path / "o4"), progress=False)
    assert not any((tmp_path / o).exists() and os.listdir(tmp_path / o) for o in ("o1", "o2"))


def test_one_text_file_of_bytes_splits_at_its_end(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"abcdefghij" * 10)
    out = prepare_text([str(f)], None, str(tmp_path / "o"), val_fraction=0.1, progress=False)
    tokens = np.concatenate([data.load_tokens(out.train, 256), data.load_tokens(out.val, 256)])
    assert bytes(tokens.astype(np.uint8)) == b"abcdefghij" * 10
    assert (out.train_tokens, out.val_tokens) == (90, 10)


def test_prepare_into_a_used_directory_refuses_then_rewrites_all_three(tmp_path):
    """An output directory already holding token files is refused (nothing touched); with
    overwrite a byte-level run rewrites train.bin and val.bin AND removes the old
    tokenizer.json, which training would otherwise take as the new data's tokenizer (and
    serving would encode prompts with). Too little text for both splits is an error that
    leaves nothing behind (it used to write an empty val.bin and exit 0)."""
    f = tmp_path / "a.txt"
    f.write_text("some text " * 20)
    out = tmp_path / "o"
    prepare_text([str(f)], TINY, str(out), progress=False)
    before = {n: (out / n).read_bytes() for n in ("train.bin", "val.bin", "tokenizer.json")}
    with pytest.raises(ValueError, match=r"already holds train.bin, val.bin, tokenizer.json; "
                                         r"use another output directory, or overwrite=True"):
        prepare_text([str(f)], None, str(out), progress=False)
    assert {n: (out / n).read_bytes() for n in before} == before
    prepare_text([str(f)], None, str(out), progress=False, overwrite=True)
    assert sorted(os.listdir(out)) == ["train.bin", "val.bin"]
    one = tmp_path / "one.txt"
    one.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"1 token\(s\) are too few to split"):
        prepare_text([str(one)], None, str(tmp_path / "o5"), progress=False)
    assert not (tmp_path / "o5").exists()


def test_validation_source():
    assert data.validation_source("builtin", None) == data.BUILTIN_VALIDATION
    assert data.validation_source("builtin", "v.txt") == "v.txt"
    with pytest.raises(ValueError, match="has no validation split; pass eval_data"):
        data.validation_source("/tmp/some.txt", None)
    # the built-in validation part continues the corpus: never trained on
    head = data.builtin_corpus(data.BUILTIN_MAX_BYTES + 4096)
    assert bytes(head[:data.BUILTIN_MAX_BYTES]) == bytes(data.builtin_corpus())


def _cfg(corpus, tmp, mesh, **kw):
    base = dict(init_from=TINY, data=corpus.train, seq_len=32, batch_size=8, steps=6,
                eval_every=3, eval_batches=2, learning_rate=3e-3, warmup_steps=1,
                log_every=1, ckpt_every=100, serve_mesh="", ckpt_dir=str(tmp), mesh=mesh,
                microbatches=2)
    return RunConfig.flat(**{**base, **kw})


def _reference(cfg):
    """The same fine-tuning on one device, built by hand: Trainer, pretrained weights,
    the run's batches and validation batches."""
    source = open_source(TINY)
    model_cfg = source.model_config(ModelSpec(seq_len=32))
    mesh = make_mesh("", devices=jax.devices()[:1])
    tr = Trainer(lambda: GPT(model_cfg, rngs=nnx.Rngs(0)), lm_loss, mesh,
                 optimizer=cfg.optimizer_config(), seed=0)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        tr.abstract_params, tr.param_shardings)
    state = tr.state_from_params(source.load(target, list(range(4)), model_cfg))
    train_b = data.TokenBatches.from_source(cfg.data.data, 500, 8, 32, 0)
    val_b = data.TokenBatches.from_source(data.validation_source(cfg.data.data, None), 500, 8,
                                          32, 0)
    evals = [tr.put_batch(val_b.host_batch(i)) for i in range(2)]
    ev = tr.compiled_eval(val_b.host_batch(0))
    evaluate = lambda p: float(np.mean([float(ev(p, b)) for b in evals]))
    before, losses, eval_losses = evaluate(state.params), [], []
    for step in range(cfg.steps):
        state, m = tr.step(state, tr.put_batch(train_b.host_batch(step)))
        losses.append(float(m["loss"]))
        if (step + 1) % 3 == 0:
            eval_losses.append((step + 1, evaluate(state.params)))
    return before, losses, eval_losses


@pytest.mark.slow
def test_finetune_on_a_pipeline_equals_one_device_and_lowers_validation_loss(corpus, tmp_path):
    metrics = tmp_path / "m.jsonl"
    cfg = _cfg(corpus, tmp_path / "ck", "data:2,pipe:2,tensor:2", metrics_file=str(metrics),
               pipeline_repeats=2, serve_mesh="tensor:2", serve_prompt="def main(")
    result = train(cfg)
    before, losses, eval_losses = _reference(cfg)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    assert [s for s, _ in result.eval_losses] == [3, 6]
    np.testing.assert_allclose([v for _, v in result.eval_losses], [v for _, v in eval_losses],
                               rtol=1e-5)
    assert result.eval_losses[-1][1] < before - 0.05, (before, result.eval_losses)
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    # the checkpoint carries the tokenizer and the original config.json: text serving
    # and an export back to the same format
    from jaxmp.checkpoint import Checkpoints

    record = Checkpoints(str(tmp_path / "ck"), create=False).record()
    assert record.tokenizer == read_tokenizer(TINY)
    assert record.hf_config["model_type"] == "gpt2"
    assert isinstance(result.completion, str) and result.completion


def test_init_from_errors(corpus, tmp_path):
    cases = [(dict(num_layers=3), "num_layers=3 differs from init_from="),
             (dict(seq_len=128), "seq_len=128: init_from=.* allows at most 64 positions"),
             (dict(model="mlp"), "model=mlp but init_from=.* holds a gpt model"),
             (dict(init_from=str(tmp_path / "nope")), "no such directory"),
             (dict(data="builtin", eval_data=None, eval_every=2, vocab_size=256),
              "vocab_size=256 differs"),
             (dict(data=__file__, eval_every=2), "has no validation split"),
             (dict(ckpt_dir=TINY), "init_from and ckpt_dir are the same directory")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            prepare(_cfg(corpus, tmp_path / "ck", "data:8", **kw))
    assert not (tmp_path / "ck").exists()  # nothing created by a refused run
    family, cfg = model_config(RunConfig.flat(init_from=TINY, dtype="bfloat16"))
    assert (family.name, cfg.num_layers, cfg.d_model, cfg.vocab_size, cfg.dtype) == (
        "gpt", 4, 64, 500, "bfloat16")


@pytest.mark.slow
def test_commands_on_a_hugging_face_directory(tmp_path):
    """convert HF -> jaxmp -> HF is exact; serve and inspect take the HF directory; an
    existing output is never overwritten."""
    ck, back = tmp_path / "ck", tmp_path / "back"
    run_module("experiments.convert", f"--input={TINY}", f"--output={ck}")
    out = run_module("experiments.convert", f"--input={ck}", f"--output={back}",
                     "--max_shard_size=400KB")
    assert "peak host memory" in out.stdout
    want, got = _tensors(TINY), _tensors(str(back))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert len([n for n in os.listdir(back) if n.startswith("model-")]) >= 2
    again = run_module("experiments.convert", f"--input={ck}", f"--output={back}", check=False)
    assert again.returncode == 2 and "exists and is not an empty directory" in again.stderr
    served = run_module("experiments.serve", f"--ckpt_dir={TINY}", "--mesh=tensor:4",
                        "--prompt=def main(", "--prompt=naïve café", "--max_new_tokens=6")
    assert "--- 'naïve café'" in served.stdout and "12 tokens in" in served.stdout
    plan = run_module("experiments.inspect", f"--init_from={TINY}", "--mesh=pipe:2,tensor:4",
                      "--microbatches=2")
    assert "gpt on pipe:2,tensor:4" in plan.stdout and "512x64" in plan.stdout
