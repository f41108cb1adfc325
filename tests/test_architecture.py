"""The edges: config tree and generated flags, the family registry (a family of one's own
trained from the command line), LayerStack orders, the checkpoint record, dropout."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, run_module

from jaxmp.checkpoint import CheckpointRecord
from jaxmp.config import RunConfig, leaves
from jaxmp.mesh import make_mesh
from jaxmp.models import registry
from jaxmp.models.gpt import GPT, GPTConfig
from jaxmp.pipeline import PipelineSpec
from jaxmp.sharding import DEFAULT_RULES, activation_sharding
from jaxmp.stack import LayerStack
from jaxmp.train import OptConfig, Trainer

# The command-line contract: scripts and launch files use these flag names, so they must
# exist (others may be added).
CONTRACT = {"model", "preset", "num_layers", "d_model", "num_heads", "seq_len", "mesh",
            "microbatches", "pipeline_repeats", "batch_size", "steps", "learning_rate",
            "warmup_steps", "grad_accum_steps", "seed", "dtype", "remat", "data", "ckpt_dir",
            "ckpt_every", "keep_checkpoints", "resume", "metrics_file", "log_every", "profile_dir"}


def test_flags_are_the_config_tree():
    """One flag per config field, flat names (the contract), defaults from the dataclasses:
    a field added to the tree but not reachable from the command line, or a default typed
    twice and drifting, fails here."""
    from absl import flags

    from jaxmp.cli import flagtree

    fv = flags.FlagValues()
    flagtree.define(RunConfig, fv)
    fv(["prog", "--mesh=tensor:8", "--steps=7", "--noscan_layers", "--learning_rate=0.01",
        "--family_module=a", "--family_module=b"])
    names = {f.name for _, f in leaves(RunConfig)}
    assert CONTRACT <= names and names <= set(fv)
    assert "total_steps" not in names  # derived from --steps
    cfg = flagtree.build(RunConfig, fv)
    assert cfg.layout.mesh == "tensor:8" and cfg.steps == 7 and cfg.model.scan_layers is False
    assert cfg.optimizer.learning_rate == 0.01 and cfg.model.family_module == ["a", "b"]
    assert cfg.optimizer_config().total_steps == 7
    untouched = flagtree.build(RunConfig, _parsed(flagtree))
    assert untouched == RunConfig()  # every default comes from the tree
    assert RunConfig.flat(mesh="pipe:8", warmup_steps=3) == dataclasses.replace(
        RunConfig(), layout=dataclasses.replace(RunConfig().layout, mesh="pipe:8"),
        optimizer=dataclasses.replace(OptConfig(), warmup_steps=3))
    with pytest.raises(ValueError, match="unknown setting.*meshes"):
        RunConfig.flat(meshes="pipe:8")


def _parsed(flagtree):
    from absl import flags

    fv = flags.FlagValues()
    flagtree.define(RunConfig, fv)
    fv(["prog"])
    return fv


def test_registry_names_and_errors():
    """The built-in families are entries of the registry; an unknown name lists them."""
    assert {"gpt", "mlp"} <= set(registry.names())
    assert registry.get("gpt").generates and not registry.get("mlp").generates
    with pytest.raises(ValueError, match="model='nope': no such model family; registered: gpt"):
        registry.get("nope")
    with pytest.raises(ValueError, match="family_module='no.such.module' cannot be imported"):
        registry.import_modules(["no.such.module"])


def test_checkpoint_record_reads_and_writes_the_first_format():
    """The record keeps the JSON of checkpoints written before it existed ("model",
    "stacked"): an old checkpoint restores, a new one reads with older tools."""
    old = {"model": "gpt", "config": GPTConfig().to_json(), "mesh": "tensor:4",
           "rules": DEFAULT_RULES.to_json(), "pipeline": {"stages": 1, "microbatches": 1,
                                                          "repeats": 1},
           "layer_order": [0, 1, 2, 3], "stacked": "blocks",
           "data": {"source": "builtin", "seed": 0, "batch_size": 16},
           "versions": {"jaxmp": "0.1.0"}, "step": 3, "param_shapes": {"wpe": [128, 128]}}
    rec = CheckpointRecord.from_json(old)
    assert (rec.family, rec.stack, rec.step, rec.param_dtype) == ("gpt", "blocks", 3, "float32")
    assert rec.to_json() == {**old, "params_only": False, "param_dtype": "float32"}
    made = CheckpointRecord.create("gpt", "blocks", GPTConfig(num_layers=8), make_mesh("pipe:2,tensor:4"),
                                   DEFAULT_RULES, PipelineSpec(2, 2, 2))
    assert made.layer_order == [0, 1, 4, 5, 2, 3, 6, 7] and made.mesh == "pipe:2,tensor:4"
    assert json.loads(json.dumps(made.to_json()))["model"] == "gpt"


def test_layer_stack_orders_round_trip():
    stack = LayerStack(8, PipelineSpec(2, 2, 4))
    assert stack.order == [0, 2, 4, 6, 1, 3, 5, 7]
    canonical = {"w": jnp.arange(8.0)[:, None] * jnp.ones((8, 3))}
    stored = stack.from_canonical(canonical)
    np.testing.assert_array_equal(stored["w"][:, 0], stack.order)
    np.testing.assert_array_equal(stack.to_canonical(stored)["w"], canonical["w"])


@pytest.mark.slow
def test_circular_stack_decodes_like_a_plain_one():
    """A GPT built for the circular schedule (r=2: layers stored out of order) decodes with
    the same logits and cache as the r=1 model of the same weights, on a pipe mesh.
    Before LayerStack, decode ran r>1 stacks in r=1 order: layers applied out of order."""
    cfg = GPTConfig(num_layers=4, d_model=32, num_heads=4, seq_len=16)
    mesh = make_mesh("pipe:2", devices=jax.devices()[:2])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 5)), jnp.int32)
    index = jnp.zeros((2,), jnp.int32)
    out = {}
    for r in (1, 2):
        model = GPT(cfg, rngs=nnx.Rngs(0), pipeline=PipelineSpec(2, 2, r))
        graphdef, params = nnx.split(model)

        def run(params, graphdef=graphdef):
            with activation_sharding(mesh, DEFAULT_RULES):
                m = nnx.merge(graphdef, params)
                logits, cache = m.decode(tokens, m.init_cache(2, 8), index)
                return logits, m.stack.to_canonical(cache)
        out[r] = jax.jit(run)(params)
    np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[2][1], out[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    plain = GPT(cfg, rngs=nnx.Rngs(0))(tokens)
    np.testing.assert_allclose(out[2][0], plain, rtol=1e-5, atol=1e-5)


class _Dropout(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (16, 16)) * 0.3
        self.w = nnx.Param(init, logical_axes=("embed", "mlp"))
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(x @ self.w[...])


def _dropout_losses(mesh: str, seed: int) -> list[float]:
    devices = jax.devices()[:1] if mesh == "" else jax.devices()[:4]
    loss = lambda m, b: jnp.mean((m(b["x"]) - b["x"]) ** 2)
    tr = Trainer(lambda: _Dropout(nnx.Rngs(0)), loss, make_mesh(mesh, devices=devices),
                 optimizer=OptConfig(warmup_steps=0, total_steps=10), seed=seed)
    state = tr.init_state()
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    losses = []
    for _ in range(3):
        state, m = tr.step(state, tr.put_batch({"x": x}))
        losses.append(float(m["loss"]))
    return losses


def test_dropout_draws_from_the_train_state_rng():
    """A user model with nnx.Dropout trains: the step's key reaches its stream, the same
    masks on data:2,tensor:2 as on one device, other masks with another seed and each step."""
    one, sharded, other = (_dropout_losses("", 0), _dropout_losses("data:2,tensor:2", 0),
                           _dropout_losses("", 1))
    np.testing.assert_allclose(sharded, one, rtol=1e-5)
    assert not np.allclose(other, one)
    no_drop = float(jnp.mean((jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)),
                                          jnp.float32) @ _Dropout(nnx.Rngs(0)).w[...]
                              - np.random.default_rng(0).standard_normal((8, 16))) ** 2))
    assert abs(one[0] - no_drop) > 1e-3  # the mask was applied


def test_library_errors_name_parameters_not_flags():
    """Library errors read right from Python: `max_new_tokens=0`, not `--max_new_tokens`."""
    from jaxmp.models.gpt import preset
    from jaxmp.stack import remat

    with pytest.raises(ValueError, match=r"^preset='huge' is not a gpt preset: choose one of tiny"):
        preset("huge")
    with pytest.raises(ValueError, match=r"^d_model=100 is not divisible by num_heads=8"):
        preset("tiny", d_model=100)
    with pytest.raises(ValueError, match=r"^remat='all': choose one of none"):
        remat(lambda x: x, "all")
    with pytest.raises(ValueError, match=r"\(pipeline_repeats=2\) needs microbatches >= pipe"):
        PipelineSpec(2, 1, 2).validate(8)


@pytest.mark.slow
def test_a_family_of_ones_own_trains_from_the_command_line(tmp_path):
    """README's family example, verbatim, registered through --family_module and trained
    by experiments.train on a pipelined mesh; its checkpoint records the family."""
    readme = open(f"{ROOT}/README.md").read()
    code = re.search(r"<!-- family-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_family.py").write_text(code)
    proc = run_module("experiments.train", "--family_module=my_family", "--model=toy",
                      "--num_layers=4", "--mesh=data:2,pipe:2,tensor:2", "--steps=30",
                      "--log_every=10", "--learning_rate=0.01", f"--ckpt_dir={tmp_path}/ck",
                      env={"PYTHONPATH": str(tmp_path)})
    assert "jaxmp: toy" in proc.stdout and "stage 1 (pipe index 1): layers [2, 3]" in proc.stdout
    losses = [float(x) for x in re.findall(r"step +\d+/\d+ +loss (\S+)", proc.stdout)]
    assert losses[-1] < 0.7 * losses[0], losses
    from jaxmp.checkpoint import Checkpoints

    rec = Checkpoints(f"{tmp_path}/ck", create=False).record()
    assert rec.family == "toy" and rec.config == {"num_layers": 4, "width": 32}
    assert "served step" not in proc.stdout  # not a generating family: no serve demo


def test_import_is_light_and_every_export_resolves():
    """`import jaxmp` loads none of Orbax, the serving stack or the model families (they
    load on first use); every name in jaxmp.__all__ resolves, Llama and the layer-wise MLP's
    config under an unambiguous name included. Bugs: an eager import of a heavy module
    back in jaxmp/__init__.py (2.8 s of Orbax per import), an export that names a moved
    function."""
    import subprocess
    import sys

    code = ("import sys, jaxmp; heavy = [m for m in ('orbax', 'orbax.checkpoint', "
            "'jaxmp.serve', 'jaxmp.models.gpt', 'fastapi') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    import jaxmp

    for name in jaxmp.__all__:
        assert getattr(jaxmp, name) is not None, name
    assert {"Llama", "LlamaConfig", "LayerwiseMLPConfig", "train", "Hook"} <= set(jaxmp.__all__)
    assert jaxmp.MLPConfig is jaxmp.LayerwiseMLPConfig


def test_a_pipe_mesh_needs_a_model_built_for_its_stages():
    """A model built without a PipelineSpec on a mesh with pipe=2 used to train without a
    pipeline (layers split over pipe, run one after another): now the Trainer refuses it,
    naming the fix."""
    import jaxmp

    mesh = jaxmp.make_mesh("pipe:2,data:4")
    cfg = GPTConfig(num_layers=2, d_model=32, num_heads=4, seq_len=16)
    with pytest.raises(jaxmp.PipelineError, match=r"pipe=2 but the model's layer stack was "
                       r"built for 1 pipeline stage\(s\); build the model with "
                       r"PipelineSpec\(stages=2"):
        Trainer(lambda: jaxmp.GPT(cfg, rngs=nnx.Rngs(0)), jaxmp.lm_loss, mesh)


@pytest.mark.parametrize("family,flags,bad", [
    ("mlp", dict(num_heads=4), "num_heads"), ("mlp", dict(seq_len=64), "seq_len"),
    ("mlp", dict(attention="xla"), "attention"), ("gpt", dict(num_kv_heads=2), "num_kv_heads"),
])
def test_a_flag_a_family_does_not_take_is_an_error_naming_the_family(family, flags, bad):
    """The flags a family accepts come from its config dataclass: the MLP family used to
    ignore --num_heads (and --seq_len, --attention) silently. The flags it does take still
    reach its config (--d_model is the MLP's hidden width)."""
    from jaxmp.run import model_config

    with pytest.raises(ValueError, match=f"--{bad} is not a setting of the {family} family|"
                       f"{bad} is a llama setting"):
        model_config(RunConfig.flat(model=family, **flags))
    _, cfg = model_config(RunConfig.flat(model="mlp", d_model=48, num_layers=2, dtype="bfloat16"))
    assert (cfg.hidden_dim, cfg.num_layers, cfg.dtype) == (48, 2, "bfloat16")


def test_model_shape_reads_each_family_config():
    """The planner and the memory check read a typed ModelShape, not getattr probes: a
    decoder's width, context and padded vocabulary, the MLP's hidden width and no vocab."""
    from jaxmp.models.llama import LlamaConfig
    from jaxmp.models.mlp import MLPConfig
    from jaxmp.models.registry import model_shape

    g = model_shape(GPTConfig(num_layers=2, d_model=64, num_heads=4, seq_len=32,
                              vocab_size=300, dtype="bfloat16", remat="block"))
    assert (g.num_layers, g.width, g.seq_len, g.vocab, g.dtype, g.remat, g.attention) == (
        2, 64, 32, 384, "bfloat16", "block", "auto")
    assert model_shape(LlamaConfig(scan_layers=False)).scan_layers is False
    m = model_shape(MLPConfig(hidden_dim=48, num_layers=3))
    assert (m.width, m.seq_len, m.vocab, m.attention, m.remat) == (48, 1, 0, None, "none")


# Lower layers never import higher ones (function-level imports included): the building
# blocks know nothing of model families, runs or serving; a run knows nothing of serving;
# nothing in the library imports the entry points.
LAYERS = {
    "jaxmp/mesh.py": ("jaxmp.models", "jaxmp.run", "jaxmp.serve", "jaxmp.engine", "jaxmp.http"),
    "jaxmp/sharding.py": ("jaxmp.models", "jaxmp.run", "jaxmp.serve", "jaxmp.engine"),
    "jaxmp/layers.py": ("jaxmp.models", "jaxmp.run", "jaxmp.serve", "jaxmp.engine"),
    "jaxmp/stack.py": ("jaxmp.models", "jaxmp.run", "jaxmp.serve", "jaxmp.engine"),
    "jaxmp/pipeline.py": ("jaxmp.models", "jaxmp.run", "jaxmp.serve", "jaxmp.engine"),
    "jaxmp/train.py": ("jaxmp.models", "jaxmp.run", "jaxmp.serve", "jaxmp.engine"),
    "jaxmp/sampling.py": ("jaxmp.serve", "jaxmp.engine", "jaxmp.http", "jaxmp.run"),
    "jaxmp/run/*.py": ("jaxmp.serve", "jaxmp.engine", "jaxmp.http", "jaxmp.demo"),
    "jaxmp/**/*.py": ("experiments",),
}


def test_no_module_imports_a_higher_layer():
    import ast
    import glob
    import os

    broken = []
    for pattern, forbidden in LAYERS.items():
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                broken += [f"{os.path.relpath(path, ROOT)} imports {n}" for n in names
                           if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert not broken, broken


def test_console_scripts_name_the_entry_points():
    """pyproject's jaxmp-* scripts point at each entry point's console(), which runs the
    same main as `python -m experiments.X` (a renamed module or function breaks the
    installed command, not the module). Read without importing: each entry point defines
    its own absl flags, so two cannot share a process."""
    import ast
    import os

    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    block = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^(jaxmp-\w+) = "([\w.:]+)"', block, re.M))
    assert set(scripts) == {f"jaxmp-{n}" for n in ("train", "serve", "inspect", "prepare",
                                                     "convert", "launch", "bench")}
    for name, target in scripts.items():
        module, func = target.split(":")
        path = os.path.join(ROOT, *module.split(".")) + ".py"
        tree = ast.parse(open(path, encoding="utf-8").read())
        assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name
