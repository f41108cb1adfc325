"""Pretrained weights to start from or serve: a Hugging Face model directory or a jaxmp
checkpoint, whichever a path holds.

    source = open_source(path)              # family, config, tokenizer: no weights read
    cfg = source.model_config(spec)         # with the run's allowed overrides
    params = source.load(abstract_params, layer_order)   # straight into the shardings

Only the weights come over (fine-tuning starts a fresh optimizer). The tokenizer and,
for Hugging Face sources, the original config.json ride along in the new run's
checkpoint record, so the run serves text and exports back to the same format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxmp import hf
from jaxmp.models import registry
from jaxmp.models.registry import Family

# Settings a fine-tuning run may change; every other model setting comes from the source.
FREE = ("dtype", "remat", "attention", "scan_layers", "fused_loss", "loss_chunk",
        "matmul_precision")
SHAPE = ("num_layers", "d_model", "num_heads", "vocab_size")


@dataclasses.dataclass
class Source:
    path: str
    family: Family
    config: dict                    # the family's config JSON, as saved
    tokenizer: dict | None = None   # the JSON of its tokenizer.json, if any
    hf_config: dict | None = None   # the config.json of a Hugging Face source (or origin)
    step: int | None = None         # the checkpoint step of a jaxmp source
    directory: hf.HFDirectory | None = None
    chat: dict | None = None        # its chat template and special tokens (jaxmp.chat)

    @property
    def kind(self) -> str:
        return "Hugging Face directory" if self.directory else f"jaxmp checkpoint step {self.step}"

    def model_config(self, spec: Any, name: str = "init_from") -> Any:
        """The source's model with the overrides of `spec` (config.ModelSpec) that a
        pretrained model allows: compute settings, and a shorter context (Hugging Face)."""
        cfg = dict(self.config)
        for field in SHAPE:
            value = getattr(spec, field)
            if value is not None and value != cfg.get(field):
                raise ValueError(f"{field}={value} differs from {name}={self.path}'s "
                                 f"{cfg.get(field)}; drop it (the pretrained model fixes it)")
        if (seq := spec.seq_len) is not None and seq != cfg.get("seq_len"):
            if self.directory is None or seq > cfg["seq_len"]:
                what = ("at most" if self.directory else "exactly")
                raise ValueError(f"seq_len={seq}: {name}={self.path} allows {what} "
                                 f"{cfg['seq_len']} positions")
            cfg["seq_len"] = seq
        cfg.update(spec.overrides(*FREE))
        model_cfg = self.family.config_from_json(cfg)
        if hasattr(model_cfg, "validate"):
            model_cfg.validate()
        return model_cfg

    def load(self, abstract: Any, layer_order: Sequence[int], model_cfg: Any) -> Any:
        """The weights, read into `abstract`'s shardings (a pure dict of
        ShapeDtypeStructs), stacked layers in `layer_order`."""
        if self.directory is not None:
            fmt = registry.hf_format(self.family, self.directory.config["model_type"])
            src, tgt = fmt.tensors(self.config), fmt.tensors(model_cfg.to_json())
            mapping = dataclasses.replace(fmt, tensors=lambda _: [
                dataclasses.replace(s, shape=t.shape) for s, t in zip(src, tgt)])
            return hf.load_params(self.directory, mapping, self.config, abstract, layer_order)
        from jaxmp.checkpoint import Checkpoints

        ckpts = Checkpoints(self.path, create=False)
        try:
            return ckpts.restore_params(abstract, step=self.step, layer_order=layer_order)
        finally:
            ckpts.close()


def open_source(path: str, *, step: int | None = None, name: str = "init_from") -> Source:
    """What `path` holds (a Hugging Face directory: it has config.json; else a jaxmp
    checkpoint directory), without reading any weights."""
    import os

    if not os.path.isdir(path):
        raise ValueError(f"{name}={path}: no such directory; give a jaxmp checkpoint "
                         "directory or a Hugging Face model directory")
    if hf.is_hf_directory(path):
        directory = hf.HFDirectory(path)
        model_type = directory.config.get("model_type")
        if not model_type:
            raise hf.HFError(f"{path}/config.json has no model_type")
        family = registry.for_hf(model_type)
        config = registry.hf_format(family, model_type).config_from_hf(directory.config)
        tok_file = directory.tokenizer_file()
        from jaxmp.tokenizer import read_tokenizer

        tokenizer = read_tokenizer(tok_file) if tok_file else None
        from jaxmp.chat import read_chat

        return Source(path, family, config, tokenizer, directory.config, directory=directory,
                      chat=read_chat(path))
    from jaxmp.checkpoint import Checkpoints

    ckpts = Checkpoints(path, create=False)
    try:
        step = ckpts.resolve(step)
        record = ckpts.record(step)
    finally:
        ckpts.close()
    return Source(path, registry.get(record.family), record.config, record.tokenizer,
                  record.hf_config, step=step, chat=record.chat)
