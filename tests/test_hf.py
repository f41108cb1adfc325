"""Hugging Face interop against golden files transformers wrote (tests/fixtures, made by
tests/fixtures/make_hf_fixtures.py; no torch needed here).

Bugs these catch: a transposed or mis-split c_attn (q/k/v or heads in the wrong order),
the tied head or padded vocabulary handled wrongly, layer order ignored under a
pipeline's storage order, a shard read from the wrong rows, export keys/shapes/dtypes that
transformers would not load, tokenizer ids or decoding that differ from transformers'.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxmp import hf
from jaxmp.config import ModelSpec
from jaxmp.mesh import make_mesh
from jaxmp.models import registry
from jaxmp.pretrained import open_source
from jaxmp.serve import Server
from jaxmp.tokenizer import TextCodec, read_tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = os.path.join(FIXTURES, "hf_gpt2_tiny")
GOLDEN = dict(np.load(os.path.join(FIXTURES, "hf_gpt2_tiny_golden.npz")))
with open(os.path.join(FIXTURES, "hf_gpt2_tiny_texts.json"), encoding="utf-8") as _f:
    TEXTS = json.load(_f)
VOCAB = 500


def _tensors(path: str) -> dict[str, np.ndarray]:
    d = hf.HFDirectory(path)
    return {k: np.asarray(d.slice(k)[...]) for k in d.files}


@pytest.fixture(scope="module")
def server():
    return Server.from_checkpoint(TINY, "")


def test_logits_equal_transformers(server):
    logits = np.asarray(server.predict(GOLDEN["ids"]))[..., :VOCAB]
    diff = np.abs(logits - GOLDEN["logits"]).max()
    assert diff <= 1e-4, diff
    # the padded vocabulary rows never win
    assert np.asarray(server.predict(GOLDEN["ids"]))[..., VOCAB:].max() < -1e29


def test_greedy_continuation_equals_transformers(server):
    out = server.generate([GOLDEN["prompt"][0].tolist()], max_new_tokens=len(GOLDEN["greedy"]))
    assert out[0].tokens == GOLDEN["greedy"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["tensor:4", "pipe:2,tensor:2"])
def test_sharded_import_gives_the_same_logits(mesh):
    """Each device's shard read from its own rows (heads over tensor, layers over pipe)."""
    s = Server.from_checkpoint(TINY, mesh)
    logits = np.asarray(s.predict(GOLDEN["ids"]))[..., :VOCAB]
    assert np.abs(logits - GOLDEN["logits"]).max() <= 1e-4


def test_import_follows_the_storage_order_and_reads_only_its_rows():
    """Circular pipeline order (stage-major: [0, 2, 1, 3]) and fsdp/tensor shards: every
    shard equals the same block of the one-device import, and a device holding a quarter
    of the vocabulary reads only that quarter of wte's rows."""
    from flax import nnx

    from jaxmp.pipeline import PipelineSpec
    from jaxmp.sharding import DEFAULT_RULES, logical_axes, named, param_specs

    source = open_source(TINY)
    cfg = source.model_config(ModelSpec())
    family = source.family

    def abstract(mesh, pipe):
        model = nnx.eval_shape(lambda: family.build(cfg, pipe, nnx.Rngs(0)))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        sh = named(mesh, param_specs(params, logical_axes(model), mesh, DEFAULT_RULES))
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, sh)
        return target, model.stack.order

    one, order1 = abstract(make_mesh("", devices=jax.devices()[:1]), PipelineSpec())
    ref = jax.device_get(source.load(one, order1, cfg))
    mesh = make_mesh("fsdp:2,pipe:2,tensor:2")
    target, order = abstract(mesh, PipelineSpec(2, 2, 2))
    assert order == [0, 2, 1, 3]
    rows: list[tuple[int, int]] = []
    real_slice = source.directory.slice

    def spy(key):
        sl = real_slice(key)
        if key.endswith("wte.weight"):
            class Spy:
                def __getitem__(self, item):
                    rows.append((item.start, item.stop))
                    return sl[item]

                def __getattr__(self, name):
                    return getattr(sl, name)
            return Spy()
        return sl
    source.directory.slice = spy
    try:
        got = jax.device_get(source.load(target, order, cfg))
    finally:
        source.directory.slice = real_slice
    for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
        want = _get(ref, path)
        if path[0].key == "blocks":
            want = want[np.asarray(order)]
        np.testing.assert_array_equal(x, want, err_msg=jax.tree_util.keystr(path))
    # wte (512 x 64 padded) is split over tensor (vocab) and fsdp (embed): 4 row blocks of 128
    assert rows and all(b - a <= 128 for a, b in rows), rows


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_export_reproduces_the_fixture_bit_for_bit(server, tmp_path):
    """import(fixture) then export: the same keys, shapes, dtypes and bytes, config
    fields transformers reads, the tokenizer; import(export) is bit-identical again."""
    source = open_source(TINY)
    params = _canonical(server)
    out = str(tmp_path / "export")
    names = hf.export(params, server.cfg.to_json(), source.family.hf, out,
                      base_config=source.hf_config, tokenizer=source.tokenizer)
    assert sorted(names) == ["config.json", "model.safetensors", "tokenizer.json"]
    want, got = _tensors(TINY), _tensors(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
    config = json.load(open(os.path.join(out, "config.json")))
    orig = json.load(open(os.path.join(TINY, "config.json")))
    for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "model_type",
              "activation_function", "layer_norm_epsilon", "eos_token_id", "architectures"):
        assert config[k] == orig[k], k
    again = Server.from_checkpoint(out, "")
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(_canonical(again))):
        np.testing.assert_array_equal(a, b)


def _canonical(server):
    params = jax.device_get(server.params)
    return server._abstract.stack.canonical_params(params, "blocks")


def test_sharded_export_with_index_reimports(server, tmp_path):
    source = open_source(TINY)
    out = str(tmp_path / "sharded")
    names = hf.export(_canonical(server), server.cfg.to_json(), source.family.hf, out,
                      max_shard_bytes=300_000)
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 3 and hf.INDEX in names
    index = json.load(open(os.path.join(out, hf.INDEX)))
    sizes = [os.path.getsize(os.path.join(out, n)) for n in shards]
    assert max(sizes) <= 300_000 + 140_000  # a shard closes before the tensor that overflows it
    assert set(index["weight_map"].values()) == set(shards)
    want, got = _tensors(TINY), _tensors(out)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_hub_style_keys_buffers_and_a_tied_head_are_accepted(tmp_path):
    """The hub's gpt2 file has no 'transformer.' prefix and carries attn.bias /
    masked_bias buffers; some files carry the tied lm_head.weight too."""
    tensors = {k.removeprefix("transformer."): v for k, v in _tensors(TINY).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors["h.0.attn.masked_bias"] = np.float32([-1e4])
    tensors["lm_head.weight"] = tensors["wte.weight"]
    d = tmp_path / "hub"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(TINY, "config.json"), d / "config.json")
    s = Server.from_checkpoint(str(d), "")
    logits = np.asarray(s.predict(GOLDEN["ids"]))[..., :VOCAB]
    assert np.abs(logits - GOLDEN["logits"]).max() <= 1e-4


def _broken(tmp_path, edit_tensors=None, edit_config=None, name="broken"):
    d = tmp_path / name
    d.mkdir()
    tensors = _tensors(TINY)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(TINY, "config.json")))
    if edit_config:
        edit_config(config)
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def test_bad_directories_name_the_key_or_file(tmp_path):
    cases = [
        (dict(edit_tensors=lambda t: t.update(extra=np.zeros(3, np.float32))), "'extra'"),
        (dict(edit_tensors=lambda t: t.pop("transformer.h.3.mlp.c_fc.bias")),
         "'transformer.h.3.mlp.c_fc.bias' is missing"),
        (dict(edit_tensors=lambda t: t.update({"transformer.ln_f.bias": np.zeros(3, np.float32)})),
         "'transformer.ln_f.bias' has shape (3,)"),
        (dict(edit_config=lambda c: c.update(model_type="bert")), "model_type='bert'"),
        (dict(edit_config=lambda c: c.update(activation_function="relu")), "activation_function"),
        (dict(edit_config=lambda c: c.update(n_layer=5)), "'transformer.h.4.ln_1.weight' is missing"),
        (dict(edit_config=lambda c: c.update(tie_word_embeddings=False)), "tie_word_embeddings"),
    ]
    for i, (kw, msg) in enumerate(cases):
        path = _broken(tmp_path, name=f"case{i}", **kw)
        with pytest.raises(ValueError, match=None) as e:
            Server.from_checkpoint(path, "")
        assert msg in str(e.value), (msg, str(e.value))
        assert "\n" not in str(e.value)
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(os.path.join(TINY, "config.json"), empty / "config.json")
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither model.safetensors.*pytorch_model.bin is there"):
        open_source(str(empty)).load(None, [], None)
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        open_source(str(bad_json))
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    shutil.copy(os.path.join(TINY, "config.json"), index_dir / "config.json")
    (index_dir / hf.INDEX).write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(ValueError, match="model-1.safetensors is missing"):
        open_source(str(index_dir))


def test_tokenizer_ids_and_round_trip_equal_transformers():
    codec = TextCodec(VOCAB, read_tokenizer(TINY))
    for text, ids, decoded in zip(TEXTS["texts"], TEXTS["ids"], TEXTS["decoded"]):
        assert codec.encode(text) == ids, text
        assert codec.decode(ids) == decoded == text
    assert codec.end_of_text() == 0
    with pytest.raises(ValueError, match="more than the model's vocabulary of 256"):
        TextCodec(256, read_tokenizer(TINY))


def test_serving_text_through_the_tokenizer(server):
    prompt = TEXTS["texts"][0]
    out = server.generate([prompt], max_new_tokens=8)[0]
    assert out.prompt == TEXTS["ids"][0]
    assert server.decode_text(out.tokens) == TextCodec(VOCAB, read_tokenizer(TINY)).decode(out.tokens)


def test_registry_finds_the_family_of_a_model_type():
    assert registry.for_hf("gpt2").name == "gpt"
    with pytest.raises(ValueError, match="model_type='t5'.*supported: gpt2"):
        registry.for_hf("t5")
