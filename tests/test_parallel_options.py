"""The layout options against one device and against their promises, read from the
compiled program: state sharded over data at rest (ZeRO-1), FSDP x pipeline gathering
once per step, sequence parallelism, and a decode loop that reads weights in place."""

import functools
import re

import numpy as np
import pytest
from flax import nnx
from helpers import CFG, assert_same_run, layout_trainer, run

from jaxmp.models.gpt import GPT, GPTConfig
from jaxmp.plan import analysis, hlo
from jaxmp.serve import Server
from jaxmp.sharding import DEFAULT_RULES

SP = DEFAULT_RULES.override(activations={"sequence": "tensor"})
SMALL = GPTConfig(num_layers=4, d_model=64, num_heads=8, seq_len=32)


def small_batch(rows: int = 16) -> dict:
    rng = np.random.default_rng(0)
    return {"tokens": rng.integers(0, SMALL.vocab_size, (rows, SMALL.seq_len + 1)).astype(np.int32)}


# ---------------------------------------------------------------- equal to one device
@pytest.mark.parametrize("mesh,p,m,r,accum,options", [
    pytest.param("tensor:8", 1, 1, 1, 1, {"sequence_parallel": True}, marks=pytest.mark.slow),
    pytest.param("fsdp:2,pipe:2,tensor:2", 2, 4, 1, 1, {"gather_once": True},
                 marks=pytest.mark.slow),
    pytest.param("data:2,fsdp:2,pipe:2", 2, 2, 1, 1, {"gather_once": True},
                 marks=pytest.mark.slow),
    pytest.param("data:8", 1, 1, 1, 2, {}, marks=pytest.mark.slow),
])
def test_option_matches_single_device(mesh, p, m, r, accum, options):
    """Losses, gradient norms (rtol 1e-5) and parameters after 3 steps equal one device's:
    a sequence split that drops or double-counts rows, a gathered copy whose gradients are
    not reduced over fsdp, replicas' gradients summed instead of averaged under
    accumulation, or an update applied to the wrong shard of the state fails here.
    (Sequence parallelism with a pipeline and data replicas: tests/test_llama.py.)"""
    assert_same_run(run(mesh, p, m, r, accum=accum, **options), run("single"))


# ---------------------------------------------------------------- the compiled program
def _collectives(tr, batch) -> dict:
    compiled = tr.lower(batch).compile()
    return compiled, analysis.collectives(analysis.parse_hlo(compiled.as_text()),
                                          dict(tr.mesh.shape))


@pytest.mark.slow
def test_state_is_split_over_data_at_rest_on_a_pipeline():
    """Parameters and Adam moments per device within 5% of (total / devices) on
    data:2,pipe:2,tensor:2 (ZeRO-1 with a pipeline): a state replicated over data is 2x."""
    tr, _ = layout_trainer("data:2,pipe:2,tensor:2", 2, 4, cfg=SMALL)
    compiled = tr.lower(small_batch()).compile()
    state = analysis.sharded_bytes(tr.abstract_state(), compiled.input_shardings[0][0])
    ideal = 3 * analysis.tree_bytes(tr.abstract_params) / tr.mesh.size
    assert ideal <= state <= 1.05 * ideal, (state, ideal)


@pytest.fixture(scope="module")
def sharded_state_programs():
    """Train steps built the way experiments.train builds them (layout_trainer) with the
    default --shard_state: data:8 with 4 accumulation parts (batch 32), fsdp:8 (batch 16);
    per mesh (trainer, compiled, collectives)."""
    out = {}
    for mesh, accum, rows in (("data:8", 4, 32), ("fsdp:8", 1, 16)):
        tr, _ = layout_trainer(mesh, accum=accum, cfg=SMALL)
        compiled, found = _collectives(tr, small_batch(rows))
        out[mesh] = (tr, compiled, found)
    return out


@pytest.mark.parametrize("mesh", ["data:8", "fsdp:8"])
def test_sharded_state_reduce_scatters_gradients_and_gathers_parameters_once(
        sharded_state_programs, mesh):
    """The kind, axis and size of each collective --shard_state promises, read from the
    compiled step: gradients are REDUCE-SCATTERED over the state's axis (each gradient byte
    once per step, not once per accumulation part), no gradient-sized ALL-REDUCE over it
    (only scalars: loss, norm; an all-reduce of the same bytes moves twice the data and
    leaves a replicated gradient), parameters ALL-GATHERED over it (data: once per step;
    fsdp: per layer, forward and backward, never in the accumulation loop), and the state
    at rest is total / devices (the memory the option saves). A step that all-reduces its
    gradients and slices them afterwards, gathers per accumulation part, or keeps a
    replicated optimizer state fails here."""
    tr, compiled, found = sharded_state_programs[mesh]
    axis = mesh.split(":")[0]
    grads = analysis.tree_bytes(tr.abstract_params)
    kinds = {op: analysis.axis_bytes(found, axis, (op,))
             for op in ("reduce-scatter", "all-reduce", "all-gather")}
    assert grads <= kinds["reduce-scatter"] <= 1.1 * grads, kinds
    assert kinds["all-reduce"] <= 1024, kinds
    gathered = {k: v for k, v in found.items() if k.op == "all-gather" and k.axes == axis}
    if axis == "data":
        assert not any(k.in_loop for k in gathered), gathered
        assert grads <= kinds["all-gather"] <= 1.05 * grads, kinds
    else:  # the layer scan gathers each layer forward and again for the backward pass
        blocks = analysis.tree_bytes(tr.abstract_params["blocks"])
        looped = sum(b for k, (_, b) in gathered.items() if k.in_loop)
        assert 1.9 * blocks <= looped <= 2.05 * blocks, (looped, blocks)  # (norms: replicated)
    state = analysis.sharded_bytes(tr.abstract_state(), compiled.input_shardings[0][0])
    ideal = 3 * grads / tr.mesh.size
    assert ideal <= state <= 1.05 * ideal, (state, ideal)


def test_fsdp_pipeline_gather_once_keeps_every_fsdp_collective_out_of_the_tick_loop():
    """--pipeline_fsdp_gather_once (through the entry point's layout path) on
    fsdp:2,pipe:2,tensor:2 with m=4: no fsdp collective of any kind inside a loop (the
    ticks, the stage's layers); the stage weights are all-gathered once (about the
    parameters / (pipe x tensor)) and their gradients reduce-scattered once, with no
    gradient-sized all-reduce over fsdp. Without the option, gathers run at every tick."""
    tr, _ = layout_trainer("fsdp:2,pipe:2,tensor:2", 2, 4, gather_once=True, cfg=SMALL)
    _, found = _collectives(tr, small_batch())
    fsdp = {k: v for k, v in found.items() if "fsdp" in k.axes.split("+")}
    assert not [k for k in fsdp if k.in_loop and fsdp[k][1]], fsdp
    per_device = analysis.tree_bytes(tr.abstract_params) / 4
    gathered = analysis.axis_bytes(found, "fsdp", ("all-gather",))
    scattered = analysis.axis_bytes(found, "fsdp", ("reduce-scatter",))
    assert 0.95 * per_device <= gathered <= 1.1 * per_device, (gathered, per_device)
    assert 0.95 * per_device <= scattered <= 1.2 * per_device, (scattered, per_device)
    assert analysis.axis_bytes(found, "fsdp", ("all-reduce",)) <= 1024, fsdp


@pytest.mark.slow  # (the quick subset stays under 3 minutes)
def test_fsdp_pipeline_gathers_once_whatever_the_microbatches():
    """fsdp:2,pipe:2,tensor:2 with gather-once: all-gather and gradient-reduction bytes
    over fsdp are the same at m=1 and m=4 (per tick they grow with the tick count), and
    lower than without the option at m=4."""
    def fsdp_bytes(m, once):
        tr, _ = layout_trainer("fsdp:2,pipe:2,tensor:2", 2, m, gather_once=once, cfg=SMALL)
        _, found = _collectives(tr, small_batch())
        return (analysis.axis_bytes(found, "fsdp", ("all-gather",)),
                analysis.axis_bytes(found, "fsdp", ("all-reduce", "reduce-scatter")))
    one, four, per_tick = fsdp_bytes(1, True), fsdp_bytes(4, True), fsdp_bytes(4, False)
    for a, b, c in zip(one, four, per_tick):
        assert abs(a - b) <= 0.05 * a and b < 0.7 * c, (one, four, per_tick)


@functools.cache
def _tensor8_program(sequence_parallel: bool) -> tuple[int, dict]:
    """tensor:8 train step of a 4-layer d=64 T=32 GPT (batch 16), built as the entry point
    builds it with or without --sequence_parallel: (temp bytes, collectives)."""
    tr, _ = layout_trainer("tensor:8", sequence_parallel=sequence_parallel, cfg=SMALL)
    compiled, found = _collectives(tr, small_batch())
    return analysis.memory_figures(compiled).temp_bytes, found


@pytest.fixture(scope="module")
def sequence_parallel_programs():
    return {"tp": _tensor8_program(False), "sp": _tensor8_program(True)}


def test_sequence_parallel_flag_turns_layer_all_reduces_into_reduce_scatters():
    """--sequence_parallel, through the entry point's layout path (the rule sequence ->
    tensor it adds), changes the KIND of the layer loop's tensor collectives: 4
    reduce-scatters and 6 all-gathers of the (b, s, h) activations per layer, and no
    activation-sized all-reduce left (only the (h,) parameter gradients). A flag that no
    longer reaches the rules leaves 4 all-reduces per layer and fails here."""
    L, h = SMALL.num_layers, SMALL.d_model
    n = 16 * SMALL.seq_len * h * 4
    K = analysis.CollectiveKey
    sp = _tensor8_program(True)[1]
    assert sp.get(K("all-reduce", "tensor", True), (0, 0))[1] <= 6 * h * 4 * L, sp
    assert sp.get(K("reduce-scatter", "tensor", True), (0, 0))[1] == 4 * L * n, sp
    assert sp.get(K("all-gather", "tensor", True), (0, 0))[1] == 6 * L * n, sp


@pytest.mark.slow  # (the quick subset stays under 3 minutes)
def test_sequence_parallel_saves_the_predicted_activation_memory(sequence_parallel_programs):
    """Korthikanti et al.'s saving: the activations kept between the tensor-parallel
    regions (per layer the two norm inputs and the two projection inputs, s*b*h each,
    no dropout masks here) shrink by the tensor size t. Measured within 25% of that."""
    L, s, b, h, t = SMALL.num_layers, SMALL.seq_len, 16, SMALL.d_model, 8
    predicted = L * 4 * s * b * h * 4 * (1 - 1 / t)
    saved = sequence_parallel_programs["tp"][0] - sequence_parallel_programs["sp"][0]
    assert 0.75 * predicted <= saved <= 1.25 * predicted, (saved, predicted)


@pytest.mark.slow  # (the quick subset stays under 3 minutes)
def test_tensor_parallel_layer_loop_all_reduces_megatrons_minimum(sequence_parallel_programs):
    """Without sequence parallelism the layer loop all-reduces 4 (b, s, h) activations per
    layer over tensor (Megatron's two per block, forward and backward), no more; with it,
    see test_sequence_parallel_flag_turns_layer_all_reduces_into_reduce_scatters."""
    L, h = SMALL.num_layers, SMALL.d_model
    n = 16 * SMALL.seq_len * h * 4
    tp = sequence_parallel_programs["tp"][1]
    assert tp[analysis.CollectiveKey("all-reduce", "tensor", True)][1] == 4 * L * n


# ---------------------------------------------------------------- decoding
@pytest.mark.slow
def test_decode_loop_reads_weights_and_cache_in_place():
    """The token loop of Server.generate writes, per token, far less than the weights (no
    per-layer copy of the stacked weights: a slice inside the loop), and never a whole
    KV cache in another layout (a vmapped cache update transposed it at every layer).
    Counted: result bytes of every instruction in the loop body except views (bitcast,
    tuple, get-tuple-element) and in-place updates of the cache (its own shape)."""
    cfg = GPTConfig(num_layers=4, d_model=256, num_heads=8, seq_len=128)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    server = Server(cfg, "", params=nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    fn = server._compiled_generate(1, 8, 8, True)
    args = (server.params, np.zeros((1, 8), np.int32), np.ones((1,), np.int32),
            np.zeros((1, 2), np.uint32), np.zeros(1, np.float32), np.zeros(1, np.int32),
            np.ones(1, np.float32))
    module = analysis.parse_hlo(fn.lower(*args).compile().as_text())
    loops = [i for c in module.computations.values() for i in c.instructions
             if i.opcode == "while"]
    body = module.computations[re.search(r"body=%([\w.\-]+)", loops[0].attrs).group(1)]
    shape = (cfg.num_layers, 1, 16, cfg.num_heads, cfg.head_dim)  # cache of 8 + 8 positions
    cache = "f32[" + ",".join(map(str, shape)) + "]"
    ops = [i for i in body.instructions
           if i.opcode not in ("bitcast", "tuple", "get-tuple-element", "parameter")]
    written = sum(hlo.shape_bytes(i.shape) for i in ops if not i.shape.startswith(cache))
    blocks = analysis.tree_bytes(server.params["blocks"])
    assert written < 0.05 * blocks, (written, blocks)
    relaid = [i.name for i in ops if not i.shape.startswith(cache)
              and hlo.shape_elements(i.shape) == np.prod(shape)]
    assert not relaid, relaid


@pytest.mark.slow  # (the quick subset stays under 3 minutes)
def test_sequence_parallel_serves_the_same_tokens():
    """A server with the sequence-parallel rules (as a checkpoint trained with it records)
    generates what the plain one does, on tensor:2."""
    model = GPT(CFG, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    prompts = [[1, 2, 3, 4], [5, 6]]
    plain = Server(CFG, "tensor:2", params=params).generate(prompts, 6)
    split = Server(CFG, "tensor:2", params=params, rules=SP).generate(prompts, 6)
    assert [g.tokens for g in plain] == [g.tokens for g in split]
