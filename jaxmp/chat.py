"""Chat templates: a model's conversation format, rendered the way Hugging Face renders it.

A Hugging Face model directory carries its template in tokenizer_config.json (the
`chat_template` field: one template, or a list of named ones of which "default" is used)
or in chat_template.jinja; checkpoints keep it in their record (`chat`), and serving takes
`--chat_template=FILE` to supply or replace it. Rendering follows transformers'
`apply_chat_template`: a sandboxed jinja2 environment with trim_blocks and lstrip_blocks,
the loopcontrols extension, a `tojson` filter that keeps non-ASCII text, the globals
`raise_exception` and `strftime_now`, and the tokenizer's special tokens (bos_token,
eos_token, ...) as variables. The rendered text is tokenized without adding special
tokens (the template writes them).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
           "mask_token")


class ChatError(ValueError):
    """A conversation the template cannot render (the template's own message)."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_from_config(config: dict, template: str | None = None) -> dict | None:
    """The `chat` record ({"chat_template", special tokens}) of a tokenizer_config.json's
    JSON; `template` (a chat_template.jinja's text) wins over the config's own."""
    if template is None:
        raw = config.get("chat_template")
        if isinstance(raw, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            raw = named.get("default")
        template = raw if isinstance(raw, str) else None
    if not template:
        return None
    chat = {"chat_template": template}
    for name in SPECIAL:
        if (text := _token_text(config.get(name))) is not None:
            chat[name] = text
    return chat


def read_chat(directory: str) -> dict | None:
    """The chat record of a Hugging Face directory (None if it has no template)."""
    config: dict = {}
    path = os.path.join(directory, CONFIG)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a tokenizer_config.json ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path}: not a tokenizer_config.json (not a JSON object)")
    template = None
    if os.path.isfile(jinja := os.path.join(directory, TEMPLATE_FILE)):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return chat_from_config(config, template)


def read_template_file(path: str, base: dict | None = None) -> dict:
    """--chat_template=FILE: a jinja template (or a tokenizer_config.json holding one),
    keeping the special tokens of `base` (the model's own chat record)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"chat_template={path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"chat_template={path}: cannot read ({e})") from None
    chat = dict(base or {})
    if path.endswith(".json"):
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"chat_template={path}: not JSON ({e.msg})") from None
        if not isinstance(config, dict):
            raise ValueError(f"chat_template={path}: not a tokenizer_config.json (a JSON "
                             "object with a chat_template field)")
        found = chat_from_config(config)
        if found is None:
            raise ValueError(f"chat_template={path} has no chat_template field")
        chat.update(found)
    else:
        chat["chat_template"] = text
    ChatTemplate(chat)  # a syntax error now, not at the first request
    return chat


class ChatTemplate:
    """render(messages) -> the prompt text, as transformers' apply_chat_template writes it
    with add_generation_prompt=True."""

    def __init__(self, chat: dict):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(chat["chat_template"])
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not parse (line {e.lineno}: "
                             f"{e.message})") from None
        self.special = {k: v for k, v in chat.items() if k in SPECIAL}

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special, **extra)
        except ChatError:
            raise
        except jinja2.TemplateError as e:
            raise ChatError(f"the chat template failed: {e}") from None
        except Exception as e:  # a template that indexes what a conversation lacks
            raise ChatError(f"the chat template failed on these messages "
                            f"({type(e).__name__}: {e})") from None
