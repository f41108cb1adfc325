import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxmp.mesh import make_mesh
from jaxmp.models.gpt import GPT, GPTConfig
from jaxmp.sharding import (
    DEFAULT_RULES,
    Rules,
    ShardingError,
    logical_axes,
    param_specs,
    parse_rule_overrides,
    plan,
)

CFG = GPTConfig(num_layers=4, d_model=32, num_heads=8, seq_len=16)


def specs(mesh: str, rules: Rules = DEFAULT_RULES, cfg: GPTConfig = CFG) -> dict:
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(
        param_specs(params, logical_axes(model), make_mesh(mesh), rules),
        is_leaf=lambda s: isinstance(s, P))[0]
    return {"/".join(k.key for k in path): s for path, s in flat}


DEFAULT_TP = {  # data:2,pipe:2,tensor:2 under the default rules
    "wte/embedding": P(("pipe", "tensor")),
    "wpe": P(("pipe", "tensor")),
    "blocks/ln1/scale": P("pipe"), "blocks/ln1/bias": P("pipe"),
    "blocks/attn/qkv/kernel": P("pipe", None, None, "tensor"),
    "blocks/attn/qkv/bias": P("pipe", None, "tensor"),
    "blocks/attn/out/kernel": P("pipe", "tensor"),
    "blocks/attn/out/bias": P("pipe"),
    "blocks/ln2/scale": P("pipe"), "blocks/ln2/bias": P("pipe"),
    "blocks/mlp/fc/kernel": P("pipe", None, "tensor"),
    "blocks/mlp/fc/bias": P("pipe", "tensor"),
    "blocks/mlp/proj/kernel": P("pipe", "tensor"),
    "blocks/mlp/proj/bias": P("pipe"),
    "ln_f/scale": P(), "ln_f/bias": P(),
}

FSDP_TP = {  # fsdp:4,tensor:2: every `embed` dimension split over fsdp as well
    "wte/embedding": P("tensor", "fsdp"),
    "wpe": P("tensor", "fsdp"),
    "blocks/ln1/scale": P(None, "fsdp"), "blocks/ln1/bias": P(None, "fsdp"),
    "blocks/attn/qkv/kernel": P(None, "fsdp", None, "tensor"),
    "blocks/attn/qkv/bias": P(None, None, "tensor"),
    "blocks/attn/out/kernel": P(None, "tensor", None, "fsdp"),
    "blocks/attn/out/bias": P(None, "fsdp"),
    "blocks/ln2/scale": P(None, "fsdp"), "blocks/ln2/bias": P(None, "fsdp"),
    "blocks/mlp/fc/kernel": P(None, "fsdp", "tensor"),
    "blocks/mlp/fc/bias": P(None, "tensor"),
    "blocks/mlp/proj/kernel": P(None, "tensor", "fsdp"),
    "blocks/mlp/proj/bias": P(None, "fsdp"),
    "ln_f/scale": P("fsdp"), "ln_f/bias": P("fsdp"),
}


def test_exact_specs_default_rules():
    assert specs("data:2,pipe:2,tensor:2") == DEFAULT_TP


def test_exact_specs_fsdp_rules():
    assert specs("fsdp:4,tensor:2") == FSDP_TP


def test_fsdp_is_a_parameter_rule_change_only():
    no_fsdp = DEFAULT_RULES.override(params={"embed": None})
    got = specs("fsdp:4,tensor:2", no_fsdp)
    assert got["blocks/mlp/fc/kernel"] == P(None, None, "tensor")
    assert no_fsdp.activations == DEFAULT_RULES.activations


def test_pure_data_parallel_replicates_everything():
    assert set(specs("data:8").values()) == {P()}


def test_indivisible_axis_names_parameter_dimension_and_axis():
    cfg = GPTConfig(num_layers=4, d_model=48, num_heads=12, seq_len=16)
    with pytest.raises(ShardingError, match=r"blocks/attn/out/kernel: dimension 1 \(heads=12\) "
                                            r"is not divisible by mesh axis tensor=8"):
        specs("tensor:8", cfg=cfg)


def test_two_rules_for_one_name_is_an_error():
    with pytest.raises(ShardingError, match="two parameter rules for logical name 'embed'"):
        Rules.create([("embed", "fsdp"), ("embed", "tensor")], {})
    with pytest.raises(ShardingError, match="two rules for logical name 'mlp'"):
        parse_rule_overrides("mlp=tensor;mlp=fsdp")


def test_unknown_names_and_axes():
    with pytest.raises(ShardingError, match="unknown logical name 'hidden'"):
        DEFAULT_RULES.override(params={"hidden": "tensor"})
    with pytest.raises(ShardingError, match="unknown mesh axis 'model'"):
        DEFAULT_RULES.override(params={"mlp": "model"})


def test_rule_overrides_parse():
    assert parse_rule_overrides("embed=;mlp=tensor;vocab=pipe+tensor") == {
        "embed": (), "mlp": ("tensor",), "vocab": ("pipe", "tensor")}


def test_plan_table_bytes_and_totals():
    model = nnx.eval_shape(lambda: GPT(CFG, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    p = plan(params, logical_axes(model), make_mesh("tensor:8"), DEFAULT_RULES)
    rows = {r.path: r for r in p.rows}
    fc = rows["blocks/mlp/fc/kernel"]
    assert fc.shape == (4, 32, 128) and fc.names == ("layers", "embed", "mlp")
    assert fc.bytes_total == 4 * 32 * 128 * 4 and fc.bytes_per_device == fc.bytes_total // 8
    assert rows["ln_f/scale"].bytes_per_device == 32 * 4  # replicated
    assert p.total_bytes == sum(r.bytes_total for r in p.rows)
    assert p.bytes_per_device == sum(r.bytes_per_device for r in p.rows)
    text = p.format()
    assert "blocks/mlp/fc/kernel" in text and "P(None, None, 'tensor')" in text
    assert f"total: {p.total_params:,} parameters" in text


@pytest.mark.slow
def test_weight_gathers_traced_through_compiled_train_steps():
    """Which all-gathers gather a weight, traced from the state's parameters through the
    compiled train step: under FSDP every one (each sharded weight per layer, forward and
    backward); under the pipeline and tensor parallelism none."""
    from helpers import batches, trainer

    from jaxmp.pipeline import PipelineSpec
    from jaxmp.plan import analysis, weightflow

    def traced(mesh: str, pipe: PipelineSpec = PipelineSpec()):
        compiled = trainer(mesh, pipe, CFG).lower(batches(1)[0]).compile()
        module = analysis.parse_hlo(compiled.as_text())
        weights = {n: path for n, path in weightflow.jax_entry_parameters(compiled, module).items()
                   if path.startswith("args[0].params")}
        assert len(weights) == 16
        return module, weightflow.weight_derived_gathers(module, weights)

    module, found = traced("fsdp:8")
    gathers = analysis.collective_totals(analysis.collectives(module))["all-gather"]
    assert sum(g.executions for g in found) == gathers["count"] > 0
    qkv = [g for g in found if g.weights == ("args[0].params['blocks']['attn']['qkv']['kernel']",)]
    assert sum(g.executions for g in qkv) == 2 * CFG.num_layers
    assert traced("pipe:4,tensor:2", PipelineSpec(4, 4, 1))[1] == []
    assert traced("tensor:8")[1] == []
