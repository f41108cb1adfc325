"""The configuration tree of a run: typed dataclasses, each default in exactly one place.

Entry points generate their absl flags from these classes (`jaxmp/cli/flagtree.py`), one
flag per field with the field's flat name (`--mesh`, `--batch_size`, ...: the command-line
contract scripts rely on, tests/test_architecture.py's CONTRACT), its type, default and
help. Python users build the same tree:

    cfg = RunConfig(layout=LayoutConfig(mesh="tensor:8"), steps=50)
    cfg = RunConfig.flat(mesh="tensor:8", steps=50)     # the same, by flag names

The model's own settings (shapes, dtype, ...) live in its family's config class
(jaxmp.models.gpt.GPTConfig, ...); ModelSpec only carries what the command line chooses:
the family, a preset and overrides (None = the family's default).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxmp.accelerators import TARGETS
from jaxmp.train import OptConfig


def opt(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its flag's help text (and e.g. choices=...)."""
    factory = isinstance(default, (list, dict))
    kw = {"default_factory": lambda: type(default)(default)} if factory else {"default": default}
    return dataclasses.field(metadata={"help": help, **metadata}, **kw)


@dataclasses.dataclass
class ModelSpec:
    model: str | None = opt(None, "Model family: gpt (default), llama, moe, mlp, or one a "
                            "--family_module registers; with --init_from, the family it holds.")
    preset: str = opt("tiny", "The family's shape: gpt tiny, small, medium, large, xl; llama "
                      "tiny, llama-3.2-1b, tinyllama-1.1b, llama-2-7b; moe tiny, "
                      "mixtral-8x7b, qwen3-30b-a3b, olmoe-1b-7b (ignored with --init_from).")
    init_from: str | None = opt(None, "Start from these weights: a jaxmp checkpoint directory "
                                "or a Hugging Face model directory (config.json, safetensors). "
                                "The optimizer starts fresh; the model comes from it.")
    num_layers: int | None = opt(None, "Override: decoder layers (GPT) or hidden layers (MLP).")
    d_model: int | None = opt(None, "Override: model width (GPT) or hidden width (MLP).")
    num_heads: int | None = opt(None, "Override: attention heads.")
    num_kv_heads: int | None = opt(None, "Override (llama): key/value heads of grouped-query "
                                   "attention (dividing num_heads).")
    seq_len: int | None = opt(None, "Override: context length.")
    mlp_dim: int | None = opt(None, "Override (llama, moe): SwiGLU width (moe: of each expert).")
    num_experts: int | None = opt(None, "Override (moe): experts per layer.")
    experts_per_token: int | None = opt(None, "Override (moe): experts each token is routed "
                                        "to (top-k).")
    router_aux_loss_coef: float | None = opt(None, "(moe) Weight of the load-balancing loss "
                                             "(default 0.01; reported as aux_loss).")
    router_z_loss_coef: float | None = opt(None, "(moe) Weight of the router z-loss (default "
                                           "0; reported as router_z_loss).")
    expert_capacity_factor: float | None = opt(None, "(moe) 0 (default): dropless routing; "
                                               "> 0: each expert takes at most ceil(factor * "
                                               "seq_len * k / experts) tokens of a sequence, "
                                               "the rest are dropped (dropped_fraction).")
    vocab_size: int | None = opt(None, "Vocabulary (default 256 for bytes, 50257 for token files).")
    dtype: str | None = opt(None, "Compute dtype (default float32); parameters stay float32.",
                            choices=("float32", "bfloat16"))
    remat: str | None = opt(None, "Rematerialization per layer (default none).",
                            choices=("none", "block", "dots"))
    attention: str | None = opt(None, "Training attention kernel (default auto; cudnn: flash "
                                "attention on NVIDIA GPUs, bf16; chunked: query blocks "
                                "recomputed in the backward pass, no T x T scores kept, any "
                                "backend).", choices=("auto", "xla", "cudnn", "chunked"))
    scan_layers: bool | None = opt(None, "Apply the layers with a scan (default; compile time "
                                   "independent of depth); --noscan_layers unrolls them (faster "
                                   "steps on GPUs).")
    fused_loss: bool | None = opt(None, "Compute the LM head and its cross-entropy a chunk of "
                                  "tokens at a time, gradients in the same pass, never storing "
                                  "the (batch, length, vocab) logits (default); --nofused_loss "
                                  "materialises them.")
    loss_chunk: int | None = opt(None, "Tokens per device per chunk of the fused head and loss "
                                 "(default 0: as many as 32 MiB of float32 logits hold on CPUs, "
                                 "256 MiB on accelerators).")
    matmul_precision: str | None = opt(
        None, "The layers' weight GEMMs (default: the compute dtype); fp8: E4M3 inputs and "
        "weights, E5M2 gradients, per-tensor current scaling (master weights and optimizer "
        "state unchanged; on a GPU the compiled step must hold FP8 GEMMs or the run stops).",
        choices=("default", "fp8"))
    family_module: list[str] = opt([], "Python module(s) to import first: they may register "
                                   "model families (repeatable).")

    @property
    def family(self) -> str:
        from jaxmp.models.registry import DEFAULT

        return self.model or DEFAULT

    def overrides(self, *names: str) -> dict[str, Any]:
        """The given settings that were set (not None), by name."""
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def family_overrides(self, family: str, config_cls: type,
                         rename: dict[str, str] | None = None) -> dict[str, Any]:
        """The model flags that were set, as fields of the family's config dataclass
        (`rename`: a flag's field there, e.g. d_model -> hidden_dim). A flag the family's
        config has no field for is an error naming the family: it would be ignored."""
        rename = rename or {}
        fields = {f.name for f in dataclasses.fields(config_cls)}
        takes = [n for n in MODEL_FLAGS if rename.get(n, n) in fields]
        out = {}
        for name in MODEL_FLAGS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in takes:
                raise ValueError(f"--{name} is not a setting of the {family} family (it takes "
                                 f"{', '.join('--' + n for n in takes)}); drop it")
            out[rename.get(name, name)] = value
        return out


# The model-shape and compute flags a family may take (ModelSpec fields; each family's
# config dataclass says which it has).
MODEL_FLAGS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "seq_len", "vocab_size",
               "dtype", "remat", "attention", "scan_layers", "fused_loss", "loss_chunk", "matmul_precision",
               "mlp_dim",
               "num_experts", "experts_per_token", "router_aux_loss_coef", "router_z_loss_coef",
               "expert_capacity_factor")


@dataclasses.dataclass
class LayoutConfig:
    mesh: str = opt("data:2,pipe:2,tensor:2", "Mesh, e.g. data:2,pipe:2,tensor:2.")
    microbatches: int = opt(4, "Pipeline micro-batches per data shard.")
    pipeline_repeats: int = opt(1, "Circular pipeline rounds (layer groups per stage).")
    pipeline_schedule: str = opt(
        "gpipe", "Pipeline schedule: gpipe (all forwards, then JAX's backward pass; circular "
        "with --pipeline_repeats > 1), circular (the same, repeats >= 2 required), 1f1b "
        "(each micro-batch's backward as soon as its forward ends: activations kept for at "
        "most 2*pipe-1 micro-batches, layers recomputed in the backward pass), interleaved "
        "(1f1b over --pipeline_repeats layer groups per stage; microbatches divisible by "
        "pipe), zb (zero-bubble ZB-H1: each stage runs its own forward, input-gradient or "
        "deferred weight-gradient pass per slot; activations as 1f1b's, no recomputation "
        "beyond --remat).", choices=("gpipe", "circular", "1f1b", "interleaved", "zb"))
    rules: str = opt("", "Parameter rule overrides, e.g. 'embed=;mlp=tensor'.")
    activation_rules: str = opt("", "Activation rule overrides, e.g. 'batch=data'.")
    shard_state: bool = opt(True, "Keep parameters and optimizer state split over data, "
                            "fsdp and context between steps (ZeRO-1 with sharded master "
                            "weights): the "
                            "step gathers the parameters once and reduce-scatters the "
                            "gradients once. --noshard_state replicates them over data.")
    sequence_parallel: bool = opt(False, "Split activations between the tensor-parallel "
                                  "regions (residual stream, norms) along the sequence over "
                                  "tensor (Megatron sequence parallelism; the activation rule "
                                  "sequence=tensor).")
    pipeline_fsdp_gather_once: bool = opt(False, "With fsdp and pipe: gather each stage's "
                                          "weights over fsdp once per step, not every tick "
                                          "(costs the stage's unsharded weights in memory).")
    context_attention: str = opt(
        "ring", "With a context mesh axis (the sequence split over devices): ring passes "
        "key/value blocks around the context devices (no device holds the whole sequence's "
        "keys; c-1 exchanges per layer), allgather gathers the keys and values over context "
        "(one collective per layer; the whole GQA-sized KV in memory).",
        choices=("ring", "allgather"))


@dataclasses.dataclass
class DataConfig:
    data: str = opt("builtin", "builtin | path to .txt (bytes) | .bin/.npy uint16 tokens.")
    batch_size: int = opt(16, "Global batch in sequences (the same on every mesh).")
    seed: int = opt(0, "Seed of the initialisation and of the data order.")
    tokenizer: str | None = opt(None, "The tokenizer.json (or a directory with one) the token "
                                "data was made with; kept in the checkpoints so they serve "
                                "text. Default: the one beside --data, else --init_from's.")


@dataclasses.dataclass
class EvalConfig:
    eval_every: int = opt(0, "Steps between validation-loss evaluations (0: never; also at the "
                          "end of the run).")
    eval_batches: int = opt(4, "Batches (of --batch_size) per evaluation, the same each time.")
    eval_data: str | None = opt(None, "Validation data (default: the built-in corpus's held-out "
                                "part, or the val.bin beside a train.bin).")


@dataclasses.dataclass
class CheckpointConfig:
    ckpt_dir: str | None = opt(None, "Checkpoint directory (default: a new runs/<time>).")
    ckpt_every: int = opt(100, "Steps between checkpoints (and one at the end).")
    keep_checkpoints: int = opt(3, "Newest checkpoints kept.")
    resume: bool | None = opt(None, "Resume from --ckpt_dir (default: when it holds "
                              "checkpoints; --noresume starts over).")
    async_checkpoint: bool = opt(True, "Write checkpoints while training continues.")
    resume_step: int | None = opt(None, "Resume from this step instead of the newest (e.g. "
                                  "when the newest is unreadable).")
    overwrite: bool = opt(False, "Allow deleting checkpoints already in --ckpt_dir: those of "
                          "an old run with --noresume, those after --resume_step.")
    allow_config_change: str | None = opt(
        None, "Comma-separated settings a resume may change from the checkpoint's run (e.g. "
        "learning_rate,batch_size); any other difference in the optimisation or the data is "
        "refused. The mesh and pipeline layout may always change; --steps may grow.")


@dataclasses.dataclass
class LogConfig:
    metrics_file: str | None = opt(None, "JSON-lines metrics file (process 0 writes it).")
    log_every: int = opt(10, "Steps between progress lines.")
    profile_dir: str | None = opt(None, "Write a JAX profiler trace of steps 3-4 here.")
    tensorboard_dir: str | None = opt(None, "Write TensorBoard event files here (every logged "
                                      "step's metrics and the eval loss; needs tensorboardX).")
    wandb_project: str | None = opt(None, "Log every logged step's metrics to this Weights & "
                                    "Biases project (the wandb extra).")
    wandb_mode: str = opt("online", "Weights & Biases mode: online, offline (files only, sync "
                          "later) or disabled.")


@dataclasses.dataclass
class DemoConfig:
    serve_mesh: str = opt("tensor:4", "Mesh of the closing serve demo ('' skips it).")
    serve_prompt: str = opt("def main(", "Prompt of the closing serve demo.")


@dataclasses.dataclass
class RunConfig:
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    layout: LayoutConfig = dataclasses.field(default_factory=LayoutConfig)
    optimizer: OptConfig = dataclasses.field(default_factory=OptConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    steps: int = opt(200, "Training steps (also the learning-rate schedule's length).")
    run_until: int | None = opt(None, "Stop (with a checkpoint) after this step, keeping the "
                                "learning-rate schedule of --steps; resume later to continue.")

    @classmethod
    def flat(cls, **settings: Any) -> RunConfig:
        """A RunConfig from flat names (the flag names), e.g. flat(mesh="tensor:8")."""
        return replace_flat(cls(), **settings)

    def optimizer_config(self) -> OptConfig:
        """The optimizer with its schedule as long as the run."""
        return dataclasses.replace(self.optimizer, total_steps=self.steps)

    def validate(self) -> None:
        """Every number in range and every combination consistent, before anything starts
        (what depends on the mesh, the model or the files is checked where those are built)."""
        at_least = [("steps", self.steps, 1), ("batch_size", self.data.batch_size, 1),
                    ("seed", self.data.seed, 0), ("microbatches", self.layout.microbatches, 1),
                    ("pipeline_repeats", self.layout.pipeline_repeats, 1),
                    ("ckpt_every", self.checkpoint.ckpt_every, 1),
                    ("keep_checkpoints", self.checkpoint.keep_checkpoints, 1),
                    ("log_every", self.log.log_every, 1),
                    ("eval_every", self.eval.eval_every, 0),
                    ("eval_batches", self.eval.eval_batches, 1)]
        at_least += [(n, v, 1) for n, v in (("run_until", self.run_until),
                                            ("resume_step", self.checkpoint.resume_step))
                     if v is not None]
        at_least += [(n, getattr(self.model, n), 1) for n in ("num_layers", "d_model",
                                                              "num_heads", "num_kv_heads",
                                                              "seq_len", "vocab_size")
                     if getattr(self.model, n) is not None]
        for name, value, low in at_least:
            if value < low:
                raise ValueError(f"{name}={value} must be >= {low}")
        if self.model.fused_loss is False and self.model.loss_chunk:
            raise ValueError(f"--loss_chunk={self.model.loss_chunk} sizes the fused loss's "
                             "chunks, and --nofused_loss turns it off; drop one of the two")
        self.optimizer_config().validate()
        accum = self.optimizer.grad_accum_steps
        if self.data.batch_size % accum:
            raise ValueError(f"batch_size={self.data.batch_size} does not split into "
                             f"grad_accum_steps={accum} equal parts; use a batch size divisible "
                             f"by {accum}")
        if self.checkpoint.resume is False and self.checkpoint.resume_step is not None:
            raise ValueError("resume_step with --noresume: choose one")
        if self.layout.sequence_parallel:
            from jaxmp.sharding import parse_rule_overrides

            axes = parse_rule_overrides(self.layout.activation_rules).get("sequence")
            if axes not in (None, ("tensor",), ("context", "tensor")):
                raise ValueError(f"sequence_parallel and activation_rules 'sequence="
                                 f"{'+'.join(axes)}' disagree; give one of them")


def leaves(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field]]:
    """Every leaf field of a config class: (path of section names, field), in order.
    Fields with metadata flag=False (e.g. OptConfig.total_steps) are left out."""
    out = []
    for f in dataclasses.fields(cls):
        section = _section(f)
        if section is not None:
            out += [((f.name, *path), leaf) for path, leaf in leaves(section)]
        elif f.metadata.get("flag", True):
            out.append(((), f))
    return out


def _section(f: dataclasses.Field) -> type | None:
    """The dataclass type of a section field (annotations are strings under
    `from __future__ import annotations`), else None."""
    if f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return None
    value = f.default_factory()  # type: ignore[misc]
    return type(value) if dataclasses.is_dataclass(value) else None


def replace_flat(tree: Any, **settings: Any) -> Any:
    """A copy of a config tree with leaf fields set by their flat names."""
    known = {f.name: path for path, f in leaves(type(tree))}
    unknown = set(settings) - set(known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(sorted(known))}")
    for name, value in settings.items():
        tree = _set(tree, (*known[name], name), value)
    return tree


def _set(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(tree, **{path[0]: value})
    return dataclasses.replace(tree, **{path[0]: _set(getattr(tree, path[0]), path[1:], value)})


@dataclasses.dataclass
class PlanConfig:
    """`inspect --target`: memory and step time of the layout on an accelerator we may not
    have; `--search`: the layouts that fit, fastest first."""
    target: str | None = opt(None, "Plan memory per device and step time on this accelerator "
                             "(h100, h200, a100; cpu: this host, measured now), from the train "
                             "step compiled for --simulate_devices devices.", choices=TARGETS)
    gpus_per_host: int | None = opt(None, "Devices per host of the target (default 8): mesh "
                                    "axes within a host use NVLink, others the network.")
    target_memory_gib: float | None = opt(None, "Device memory of the target in GiB (default: "
                                          "the card's).")
    efficiency: float | None = opt(None, "Fraction of peak FLOP/s the program's FLOPs run at "
                                   "(default: the target's, calibrated on an H100).")
    plan_depth: str = opt("auto", "full: compile every layer; reduced: compile 2 and 4 layers "
                          "per stage and extrapolate; auto: reduced only with --noscan_layers.",
                          choices=("auto", "full", "reduced"))
    search: bool = opt(False, "List the layouts of --simulate_devices devices (mesh, "
                       "micro-batches, repeats, remat, accumulation) that fit --target at "
                       "--batch_size, fastest first; --mesh and the layout flags are ignored.")
    search_top: int = opt(5, "--search: layouts to print.")
    search_compiles: int = opt(40, "--search: most layouts to compile.")


@dataclasses.dataclass
class InspectConfig:
    """What `experiments.inspect` plans: a model in a layout, no training."""
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    layout: LayoutConfig = dataclasses.field(default_factory=LayoutConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # byte vs token vocab
    optimizer: OptConfig = dataclasses.field(default_factory=OptConfig)  # accumulation
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)

    def run_config(self) -> RunConfig:
        return RunConfig(model=self.model, layout=self.layout, data=self.data,
                         optimizer=self.optimizer)


@dataclasses.dataclass
class ServeConfig:
    """`experiments.serve`: a checkpoint restored onto a serving mesh, prompts completed."""
    ckpt_dir: str | None = opt(None, "Checkpoint directory written by experiments.train, or a "
                               "Hugging Face model directory.")
    step: int | None = opt(None, "Checkpoint step (default: the newest complete one).")
    mesh: str = opt("", "Serving mesh, e.g. tensor:4 or data:2,tensor:2 ('' = 1 device).")
    prompt: list[str] = opt([], "A prompt (repeatable). Text, or 'ids:1,2,3'.")
    prompt_file: str | None = opt(None, "A file with one prompt per line.")
    max_new_tokens: int = opt(64, "Tokens to generate per prompt.")
    temperature: float = opt(0.0, "Sampling temperature (0 = greedy).")
    top_k: int | None = opt(None, "Sample from the k most likely tokens.")
    seed: int = opt(0, "Sampling seed.")
    output_file: str | None = opt(None, "JSON lines: prompt, completion, tokens.")
    tokenizer: str | None = opt(None, "A tokenizer.json (or a directory with one) for text "
                                "prompts and completions (default: the checkpoint's own).")
    http: int | None = opt(None, "Serve the OpenAI completions API on this port instead of "
                           "completing --prompt (needs the serve extra: FastAPI, uvicorn).")
    host: str = opt("127.0.0.1", "HTTP: address to bind (a non-loopback one needs --api_key "
                    "or --allow_public).")
    api_key: str | None = opt(None, "HTTP: require 'Authorization: Bearer <key>'.")
    allow_public: bool = opt(False, "HTTP: allow binding a non-loopback address without "
                             "--api_key.")
    slots: int = opt(8, "HTTP: decode slots (requests generated at once; a multiple of the "
                     "mesh's data size).")
    max_queue: int = opt(64, "HTTP: requests waiting beyond the slots; more get 429.")
    max_len: int | None = opt(None, "HTTP: cache positions per slot, prompt + new tokens "
                              "(default: the model's context; shorter is faster per step).")
    decode_steps: int = opt(8, "HTTP: decode steps per compiled call (more: less overhead per "
                            "token; fewer: new requests join sooner).")
    max_body_bytes: int = opt(1 << 20, "HTTP: largest request body.")
    prefix_cache_tokens: int | None = opt(None, "HTTP: tokens of prompt prefixes whose keys and "
                                          "values are kept for reuse (LRU; default 4 x "
                                          "max_len; 0: off).")
    chat_template: str | None = opt(None, "HTTP: a chat template (a .jinja file, or a "
                                    "tokenizer_config.json with one) for /v1/chat/completions "
                                    "(default: the model's own).")
