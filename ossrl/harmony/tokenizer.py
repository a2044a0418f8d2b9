"""Harmony special tokens and loading a Harmony tokenizer (the tiny one for tests is ``harmony.tiny_tokenizer``)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The tokens the renderer and parser need. o200k_harmony ids: start 200006, end 200007, message 200008,
# channel 200005, constrain 200003, return 200002, call 200012.
REQUIRED_TOKENS: tuple[str, ...] = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>",
)  # fmt: skip
# Tiny tokenizer: these are ids 0..8, in this order.
TINY_SPECIAL_TOKENS: tuple[str, ...] = ("<|startoftext|>", "<|endoftext|>", *REQUIRED_TOKENS)


@dataclass(frozen=True)
class HarmonyTokens:
    """Ids of the Harmony special tokens in one tokenizer. ``stop`` ends a sampled completion."""

    start: int
    end: int
    message: int
    channel: int
    constrain: int
    return_: int
    call: int
    pad: int | None = None
    endoftext: int | None = None
    by_text: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def stop(self) -> tuple[int, int]:
        return (self.return_, self.call)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> HarmonyTokens:
        try:
            return _CACHE[tokenizer]
        except (KeyError, TypeError):
            pass
        missing = missing_harmony_tokens(tokenizer)
        if missing:
            where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(f"tokenizer {where!r} lacks the Harmony special tokens {', '.join(missing)}; "
                             "it is not a gpt-oss (o200k_harmony) tokenizer")  # fmt: skip
        by_text = {t: tokenizer.convert_tokens_to_ids(t) for t in REQUIRED_TOKENS}
        eot = _token_id(tokenizer, "<|endoftext|>")
        tokens = cls(*(by_text[t] for t in REQUIRED_TOKENS), tokenizer.pad_token_id, eot, by_text)
        try:
            _CACHE[tokenizer] = tokens
        except TypeError:  # not weak-referenceable: just don't cache
            pass
        return tokens


_CACHE: weakref.WeakKeyDictionary[Any, HarmonyTokens] = weakref.WeakKeyDictionary()


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if the tokenizer has it as one token (not the unknown token)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None) or not isinstance(tid, int):
        return None
    return tid if tokenizer.convert_ids_to_tokens(tid) == token else None


def missing_harmony_tokens(tokenizer: Any) -> list[str]:
    return [t for t in REQUIRED_TOKENS if _token_id(tokenizer, t) is None]


def load_harmony_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path)``, checked to have the Harmony special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    missing = missing_harmony_tokens(tokenizer)
    if missing:
        raise ValueError(f"{path}: the tokenizer there lacks the Harmony special tokens {', '.join(missing)}; "
                         "gpt-oss needs its o200k_harmony tokenizer (or ossrl.harmony.build_tiny_tokenizer "
                         "for tests)")  # fmt: skip
    return tokenizer


# --- tiny tokenizer -------------------------------------------------------------------------------------------
