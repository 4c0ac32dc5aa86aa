"""Generation-based evaluation of a causal LM: greedy answers and their exact-match accuracy.

Instruction-tuned models are scored as the Fed-SB paper scores GSM8K: generate an answer to
each prompt greedily, extract the final number from it and from the reference, and count the
matches. Prompts come from `fedsb.data.tokens.tokenize_prompts` (left-padded, so every row's
continuation starts at the same column); references are the datasets' full responses, whose
answer line (`#### <number>`) gives the expected answer.

Answer styles (`extract_answer`):

- ``"gsm8k"``: the first number after the last ``####`` (GSM8K's answer line); none without one.
  The marker may be spaced ("# # # #"), as WordPiece tokenizers decode it.
- ``"last_number"``: the last number anywhere in the text (for models that answer in prose).

Numbers are compared in a canonical form: thousands separators removed, "12.0" -> "12",
"2.50" -> "2.5", "-0" -> "0".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from torch import nn

from fedsb.data.tokens import TokenData, eos_token_id, pad_token_id

ANSWER_STYLES = ("gsm8k", "last_number")
GSM8K_MARKER = "####"
# The marker, also as a WordPiece tokenizer (the tiny test models' MiniLM one) decodes it: "# # # #".
_MARKER = re.compile(r"#\s*#\s*#\s*#")

# A number, not a piece of one: not preceded by a digit or a point (so "5-3" reads 5 and 3, and
# ".5" no number), with an optional sign, optional thousands groups ("1,234", but not the "1,234"
# of "1,2345") and an optional fraction.
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _check_style(style: str) -> None:
    if style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer style {style!r}; accepted: {', '.join(ANSWER_STYLES)}")


def normalize_number(number: str) -> str | None:
    """A number's canonical string: "1,234" -> "1234", "12.0" -> "12", "2.50" -> "2.5"."""
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))  # also turns "-0" into "0"
    return format(value.normalize(), "f")


def extract_answer(text: str, style: str = "gsm8k") -> str | None:
    """The answer a text gives, as a canonical number string, or None when it gives none.

    "gsm8k": the first number after the last "####"; "last_number": the last number in the text.
    """
    _check_style(style)
    if style == "last_number":
        numbers = _NUMBER.findall(text)
        return normalize_number(numbers[-1]) if numbers else None
    markers = list(_MARKER.finditer(text))
    found = _NUMBER.search(text, markers[-1].end()) if markers else None
    return normalize_number(found.group()) if found else None


def exact_match(predictions: Sequence[str], references: Sequence[str], style: str = "gsm8k") -> float:
    """The fraction of predictions whose extracted answer equals their reference's.

    Both sides are read with `extract_answer(style)`; an answer of None (no number) never
    matches, not even another None. 0.0 for no predictions.
    """
    _check_style(style)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    hits = 0
    for prediction, reference in zip(predictions, references, strict=True):
        answer = extract_answer(prediction, style)
        hits += answer is not None and answer == extract_answer(reference, style)
    return hits / len(predictions)


def _stop_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end generation: the EOS the responses were trained with, and the model's own.

    Instruction data ends each response with the tokenizer's EOS (`eos_token_id`); a chat model's
    generation config may name more (the end of a turn), which stay.
    """
    ids = [eos_token_id(tokenizer)]
    config = getattr(model, "generation_config", None)
    own = getattr(config, "eos_token_id", None)
    for token in (own if isinstance(own, (list, tuple)) else [own]):
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: TokenData, *, batch_size: int,
             max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded prompts (`tokenize_prompts`), one string per prompt.

    Batched `model.generate` (do_sample=False) on the model's device; each batch drops the
    leading columns that are padding in all its rows. Returns only the new tokens, decoded
    with skip_special_tokens=True. The model is run in eval mode and left in the mode it was in.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    device = next(model.parameters()).device
    input_ids, attention = prompts["input_ids"], prompts["attention_mask"]
    options = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(tokenizer),
                   eos_token_id=_stop_ids(model, tokenizer))
    texts: list[str] = []
    training = model.training
    model.eval()
    try:
        for start in range(0, len(input_ids), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention[start:start + batch_size]
            used = mask.any(0).nonzero()
            first = int(used[0]) if len(used) else mask.shape[1] - 1  # left padding: leading columns
            ids, mask = ids[:, first:].to(device), mask[:, first:].to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, **options)
            texts.extend(tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(training)
    return texts


def generation_accuracy(model: nn.Module, tokenizer: Any, prompts: TokenData, references: Sequence[str], *,
                        batch_size: int, max_new_tokens: int, style: str = "gsm8k") -> dict[str, float]:
    """Exact match of the model's greedy answers: {"exact_match": fraction, "examples": n}."""
    _check_style(style)
    if len(references) != len(prompts["input_ids"]):
        raise ValueError(f"{len(prompts['input_ids'])} prompts for {len(references)} references")
    predictions = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return {"exact_match": exact_match(predictions, references, style), "examples": len(predictions)}
