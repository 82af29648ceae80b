"""Where a chat template is read from, as transformers saves and ships them.

- ``chat_template.jinja`` next to the tokenizer (what current transformers, and megasft's HF export, write;
  their tokenizer_config.json then has no ``chat_template`` key), plus named extras in ``chat_templates/*.jinja``;
- ``tokenizer_config.json``'s ``chat_template``: a string, or the named-list form
  ``[{"name": "default", "template": ...}, {"name": "tool_use", "template": ...}]``;
- a ``.jinja`` file given by path.

A name after ``@`` picks one template of a named set (``jinja@tool_use``, ``path/to/tok@tool_use``); without
one the ``default`` template is used, or the only one there is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megasft.data.templates import TemplateError

TEMPLATE_FILE = "chat_template.jinja"
NAMED_TEMPLATES_DIR = "chat_templates"


def templates_in_dir(directory: Path, config: dict) -> dict:
    """name -> source of every template a tokenizer directory holds; ``config`` is its tokenizer_config."""
    found = named_templates(config.get("chat_template"))
    if (directory / TEMPLATE_FILE).is_file():
        found["default"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    extra = directory / NAMED_TEMPLATES_DIR
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            found[f.stem] = f.read_text(encoding="utf-8")
    return found


def named_templates(value) -> dict:
    """A tokenizer_config ``chat_template`` value (string, named list or absent) as name -> source."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value
                if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    return {}


def read_template(name: str, tokenizer_config: Optional[dict] = None) -> tuple[str, dict]:
    """(template source, tokenizer_config giving its special tokens) for ``jinja[@NAME]`` (the tokenizer's own
    template; ``tokenizer_config`` is the tokenizer's config, with any chat_template.jinja merged in by
    load_tokenizer) or ``PATH[@NAME]`` (a tokenizer directory, a tokenizer_config.json or a .jinja file)."""
    where, _, pick = name.partition("@")
    config = dict(tokenizer_config or {})
    if where == "jinja":
        found, origin = named_templates(config.get("chat_template")), "the tokenizer's tokenizer_config.json / " + TEMPLATE_FILE
    else:
        path = Path(where)
        if path.is_dir():
            tok_config = path / "tokenizer_config.json"
            if tok_config.is_file():
                config = {**json.loads(tok_config.read_text(encoding="utf-8")), **_tokens(config)}
            found, origin = templates_in_dir(path, config), f"{path} ({TEMPLATE_FILE}, tokenizer_config.json)"
        elif path.suffix == ".jinja" and path.is_file():
            found, origin = {"default": path.read_text(encoding="utf-8")}, str(path)
        elif path.suffix == ".json" and path.is_file():
            config = {**json.loads(path.read_text(encoding="utf-8")), **_tokens(config)}
            found = templates_in_dir(path.parent, config) if path.name == "tokenizer_config.json" else \
                named_templates(config.get("chat_template"))
            origin = str(path)
        else:
            from megasft.data.chat.families import FAMILIES

            raise TemplateError(f"template {name!r} is not a built-in (llama3, chatml, {', '.join(FAMILIES)}), nor "
                                "jinja, nor an existing tokenizer directory, tokenizer_config.json or .jinja file")
    if not found:
        raise TemplateError(f"{origin} has no chat template: save one as {TEMPLATE_FILE} next to the tokenizer, "
                            "or pass --template llama3 | chatml | a .jinja file")
    if pick:
        if pick not in found:
            raise TemplateError(f"{origin} has no chat template named {pick!r}; it has {sorted(found)}")
        return found[pick], config
    if "default" in found:
        return found["default"], config
    if len(found) == 1:
        return next(iter(found.values())), config
    raise TemplateError(f"{origin} has chat templates {sorted(found)} and none named 'default'; pick one with "
                        f"{where}@NAME")


def _tokens(config: dict) -> dict:
    """The special tokens of the tokenizer's own config, which win over a template file's neighbours."""
    return {k: v for k, v in config.items() if k.endswith("_token")}
