import jax
import numpy as np
import pytest

from jaxmp.data import LLMC_MAGIC, DataError, TokenBatches, builtin_corpus, load_tokens
from jaxmp.mesh import make_mesh
from jaxmp.sharding import DEFAULT_RULES, spec_for


def test_builtin_corpus_is_real_deterministic_text():
    a, b = builtin_corpus(1 << 20), builtin_corpus(1 << 20)
    assert len(a) == 1 << 20 and np.array_equal(a, b)
    assert b"def " in a.tobytes() and a.max() < 256


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16) % 256
    a = TokenBatches(tokens, 8, 32, seed=1)
    b = TokenBatches(tokens, 8, 32, seed=1)
    assert np.array_equal(a.host_batch(5)["tokens"], b.host_batch(5)["tokens"])
    assert not np.array_equal(a.host_batch(5)["tokens"], a.host_batch(6)["tokens"])
    assert not np.array_equal(a.host_batch(5)["tokens"],
                              TokenBatches(tokens, 8, 32, seed=2).host_batch(5)["tokens"])
    # rows are windows of the stream
    row = a.host_batch(3)["tokens"][0]
    assert np.array_equal(np.diff(row.astype(int)) % 256, np.ones(32, int))


@pytest.mark.parametrize("mesh", ["data:8", "data:2,tensor:4", "fsdp:4,pipe:2"])
def test_global_batch_is_the_same_on_every_mesh(mesh):
    tokens = (np.arange(5000) % 256).astype(np.uint16)
    tb = TokenBatches(tokens, 8, 16, seed=0)
    m = make_mesh(mesh)
    from jax.sharding import NamedSharding
    spec = spec_for(("batch", None), (8, 17), m, DEFAULT_RULES.activations, strict=True)
    arr = tb.global_batch(4, NamedSharding(m, spec))["tokens"]
    assert np.array_equal(np.asarray(jax.device_get(arr)), tb.host_batch(4)["tokens"])


def test_text_and_token_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"hello world" * 10)
    assert load_tokens(str(txt), 256)[:5].tobytes() == b"hello"
    npy = tmp_path / "t.npy"
    np.save(npy, np.arange(100, dtype=np.uint16))
    assert load_tokens(str(npy), 50257)[99] == 99
    raw = tmp_path / "t.bin"
    np.arange(300, dtype=np.uint16).tofile(raw)
    assert load_tokens(str(raw), 50257)[299] == 299
    llmc = tmp_path / "l.bin"
    header = np.zeros(256, np.int32)
    header[:3] = [LLMC_MAGIC, 1, 50]
    with open(llmc, "wb") as f:
        f.write(header.tobytes())
        f.write(np.arange(50, dtype=np.uint16).tobytes())
    got = load_tokens(str(llmc), 50257)
    assert len(got) == 50 and got[49] == 49


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_tokens(str(tmp_path / "missing.txt"), 256)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="the file is empty"):
        load_tokens(str(empty), 256)
    short = tmp_path / "short.txt"
    short.write_bytes(b"abc")
    with pytest.raises(DataError, match="holds 3 tokens, fewer than one sequence of 17"):
        TokenBatches(load_tokens(str(short), 256), 2, 16, 0, source=str(short))
    big = tmp_path / "big.npy"
    np.save(big, np.array([1, 2, 60000], np.uint16))
    with pytest.raises(DataError, match="token id 60000 >= vocab size 50257"):
        load_tokens(str(big), 50257)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(DataError, match="odd file size"):
        load_tokens(str(odd), 50257)
