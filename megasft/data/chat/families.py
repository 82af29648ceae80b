"""Built-in chat template families: ``--template qwen3`` etc.

A built-in family is a named Jinja template shipped with megasft (:mod:`megasft.data.chat.family_templates`,
written after the official template's rendering) with the family's special tokens, compiled into masks
by the same template-agnostic compiler as any other template (:mod:`megasft.data.chat.jinja`), plus its
documented end-of-turn attribution. ``llama3`` and ``chatml`` stay plain-Python templates (fast; tested
equal to their Jinja originals); ``qwen2.5`` and ``qwen3`` have plain-Python renderers giving the compiler's
segments (:mod:`megasft.data.chat.qwen`), with the compiler as their fallback. Nothing is read from ``../shared`` at run time: the copies of the
originals there are the references the tests compare against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megasft.data.chat import family_templates as T


@dataclass(frozen=True)
class Family:
    source: str
    bos_token: Optional[str]
    eos_token: str
    end_of_turn: str
    """What closes an assistant turn (trained with completion_eot); the next turn's header never is."""
    reference: Optional[str] = None
    """The original's file in ../shared/chat_templates the tests compare rendering against (None: own tests only)."""

    def tokens(self) -> dict:
        return {"eos_token": self.eos_token, **({"bos_token": self.bos_token} if self.bos_token else {})}


_DEEPSEEK = Family(T.DEEPSEEK_V3, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                   "`<｜end▁of▁sentence｜>` (after `<｜tool▁calls▁end｜>` for a call)", "deepseekv3.jinja")
_GEMMA = Family(T.GEMMA, "<bos>", "<eos>", "`<end_of_turn>\\n`", "gemma.jinja")

FAMILIES: dict[str, Family] = {
    "llama3.1": Family(T.LLAMA3_1, "<|begin_of_text|>", "<|eot_id|>",
                       "`<|eot_id|>` (`<|eom_id|>` after a built-in ipython tool call)", "llama3_1.jinja"),
    "qwen2.5": Family(T.QWEN2_5, None, "<|im_end|>", "`<|im_end|>\\n`", "qwen2_5.jinja"),
    "qwen3": Family(T.QWEN3, None, "<|im_end|>", "`<|im_end|>\\n`", "qwen3.jinja"),
    "mistral": Family(T.MISTRAL, "<s>", "</s>", "`</s>` (also after `[TOOL_CALLS] [...]`)", "mistral.jinja"),
    "mistral-tekken": Family(T.MISTRAL_TEKKEN, "<s>", "</s>", "`</s>`"),
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": Family(T.GEMMA3, "<bos>", "<eos>", "`<end_of_turn>\\n`"),
    "phi3": Family(T.PHI3, "<s>", "<|endoftext|>", "`<|end|>\\n` (+ the final `<|endoftext|>`)", "phi3.jinja"),
    "phi4": Family(T.PHI4, None, "<|im_end|>", "`<|im_end|>`"),
    "deepseek-v3": _DEEPSEEK,
    "deepseek-r1": _DEEPSEEK,
    "gpt-oss": Family(T.GPT_OSS, None, "<|return|>",
                      "`<|end|>`; `<|call|>` after a tool call; `<|return|>` after the last message"),
}


def family_template(name: str):
    """The template of built-in family ``name`` (a key of FAMILIES): its JinjaTemplate, or for qwen2.5 / qwen3
    the plain-Python renderer with the JinjaTemplate as its fallback (:mod:`megasft.data.chat.qwen`)."""
    from megasft.data.chat.jinja import JinjaTemplate
    from megasft.data.chat.qwen import accelerated

    family = FAMILIES[name]
    return accelerated(JinjaTemplate(family.source, name, family.tokens(), trusted=True))
