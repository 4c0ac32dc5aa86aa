"""Tokenisation with a per-process cache, and the batchers that feed training and evaluation.

`tokenize` turns a (text, label) or (text, text_pair, label) dataset into padded int64 tensors
once per process (a worker sees the same partition every round); `iterate_batches` slices them
into batches with the all-padding tail trimmed, and `make_dataloader` wraps them in a DataLoader
for Opacus. Every batcher keeps every tensor of the data (`token_type_ids` of pairs included).

Causal-LM instruction tuning has two more: `tokenize_instructions` (prompt + response + EOS,
right-padded, per-token labels that score only the response) for training and teacher-forced
loss, and `tokenize_prompts` (the formatted prompts alone, left-padded) for generation. Both
write the prompt through `fedsb.data.templates.format_prompt` and encode it the same way, so the
model is asked, at generation time, exactly the tokens it was trained to answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from datasets import Dataset

from fedsb.data.schema import LABEL, TEXT, DataError, check_columns, column
from fedsb.data.templates import check_template, format_prompt

# input_ids, attention_mask: (N, L); labels: (N,) class labels, or (N, L) token labels, or absent;
# token_type_ids (N, L) for pairs.
TokenData = dict[str, torch.Tensor]
IGNORE_INDEX = -100  # a token label that the loss ignores (torch's and transformers' default)

_CACHE_SIZE = 256
_token_cache: OrderedDict[tuple, TokenData] = OrderedDict()


def _dataset_key(ds: Dataset) -> str:
    # A content-derived fingerprint: equal for the same partition recomputed in a worker.
    fingerprint = getattr(ds, "_fingerprint", None)
    return fingerprint if fingerprint else f"id:{id(ds)}"


def _tokenizer_key(tokenizer: Any) -> tuple:
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
            getattr(tokenizer, "padding_side", "right"), getattr(tokenizer, "pad_token_id", None))


def tokenize(ds: Dataset, tokenizer: Any, max_length: int = 64, *, text_column: str = TEXT,
             label_column: str = LABEL, text_pair_column: str | None = None, cache: bool = True
             ) -> TokenData:
    """Tokenise a (text, label) dataset into padded int64 tensors that stack into batches.

    Returns {'input_ids': (N, max_length), 'attention_mask': (N, max_length), 'labels': (N,)}.
    With `text_pair_column` each example is the pair (text, text_pair), encoded as the tokenizer
    encodes pairs (BERT: [CLS] a [SEP] b [SEP]), plus 'token_type_ids' (N, max_length) when the
    tokenizer gives them (BERT: 0 on the first segment, 1 on the second).
    Texts are truncated to `max_length` (pairs: the longer text first). With `cache`, results are
    kept per process, keyed by (dataset fingerprint, tokenizer, max_length, columns), so a worker
    tokenises each partition once; the returned tensors are shared between callers and must not
    be modified in place.
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    key = (_dataset_key(ds), _tokenizer_key(tokenizer), max_length, text_column, text_pair_column,
           label_column)
    if cache and key in _token_cache:
        _token_cache.move_to_end(key)
        return _token_cache[key]
    pair = [text_pair_column] if text_pair_column else []
    check_columns(ds.column_names, [text_column, *pair, label_column], "the dataset")
    pairs = column(ds, text_pair_column) if text_pair_column else None
    encoded = tokenizer(column(ds, text_column), pairs, padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
    data: TokenData = {
        "input_ids": encoded["input_ids"].long(),
        "attention_mask": encoded["attention_mask"].long(),
        "labels": torch.as_tensor(np.asarray(column(ds, label_column), dtype=np.int64)),
    }
    if pairs is not None and "token_type_ids" in encoded:
        data["token_type_ids"] = encoded["token_type_ids"].long()
    if cache:
        _token_cache[key] = data
        while len(_token_cache) > _CACHE_SIZE:
            _token_cache.popitem(last=False)
    return data


# --------------------------------------------------------------------------------------------
# Instruction tuning (causal LM)
# --------------------------------------------------------------------------------------------

def eos_token_id(tokenizer: Any) -> int:
    """The token that ends a response: the tokenizer's EOS, else its SEP.

    BERT-style tokenizers (the tiny test models share MiniLM's) have no EOS but end every
    sequence with [SEP], which the tiny GPT-2 config also names its EOS.
    """
    for token_id in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither an EOS nor a "
                    f"SEP token to end a response with")


def pad_token_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else its EOS (`eos_token_id`).

    The tokenizer itself is not changed (it may be shared): padding is masked out of the
    attention and the loss anyway, so which id fills it does not matter to the model.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_token_id(tokenizer)


def _prefix_ids(tokenizer: Any, template: str) -> list[int]:
    """The BOS token to put before a prompt, if the tokenizer adds one to its own encodings.

    Prompts and responses are encoded without special tokens (a BERT-style tokenizer would
    otherwise put [CLS]/[SEP] around each piece); a BOS is kept for the models trained with one
    (Llama, Mistral, Gemma), and never for "chat", whose template writes its own.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if template == "chat" or bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _prompt_ids(ds: Dataset, tokenizer: Any, template: str, prompt_column: str,
                input_column: str | None) -> list[list[int]]:
    """The formatted prompts' token ids, without special tokens (see `_prefix_ids`)."""
    prompts = column(ds, prompt_column)
    inputs = column(ds, input_column) if input_column else [None] * len(prompts)
    return _encode(tokenizer, [format_prompt(str(p), template, tokenizer, None if i is None else str(i))
                               for p, i in zip(prompts, inputs, strict=True)])


def _instruction_key(kind: str, ds: Dataset, tokenizer: Any, max_length: int, template: str,
                     *columns: str | None) -> tuple:
    # The chat template is part of the text: two tokenizers of one name may carry different ones.
    chat = str(getattr(tokenizer, "chat_template", None)) if template == "chat" else None
    return (kind, _dataset_key(ds), _tokenizer_key(tokenizer), chat, max_length, template, *columns)


def _cached(key: tuple, cache: bool, build: Any) -> TokenData:
    if cache and key in _token_cache:
        _token_cache.move_to_end(key)
        return _token_cache[key]
    data = build()
    if cache:
        _token_cache[key] = data
        while len(_token_cache) > _CACHE_SIZE:
            _token_cache.popitem(last=False)
    return data


def _fit_instruction(prefix: list[int], prompt: list[int], response: list[int], eos: int, max_length: int
                    ) -> tuple[list[int], list[int]]:
    """(context, target) of one example within `max_length`: the response is kept first.

    context = prefix + prompt, target = response + [eos]. When they do not fit, tokens are
    dropped from the start of the prompt (after the BOS prefix), the end of a problem being
    what the response answers; only a response that does not fit on its own (after the
    prefix) is cut at its end, and then has no EOS (it does not end there).
    """
    room = max_length - len(prefix)  # for prompt + response + eos
    if len(response) + 1 > room:
        return list(prefix), response[:room]
    keep = room - len(response) - 1  # prompt tokens that fit, counted from its end
    return prefix + prompt[max(len(prompt) - keep, 0):], response + [eos]


def tokenize_instructions(ds: Dataset, tokenizer: Any, max_length: int, *, template: str = "plain",
                          prompt_column: str = "prompt", response_column: str = "response",
                          input_column: str | None = None, cache: bool = True) -> TokenData:
    """Tokenise (prompt, response) pairs for causal-LM training, scoring only the response.

    Each row is [BOS] + format_prompt(prompt) + response + EOS, right-padded to `max_length`,
    prompt and response encoded separately (so the prompt's tokens are exactly those that
    `tokenize_prompts` gives for generation). Returns int64 tensors of shape (N, max_length):
    `input_ids`; `attention_mask` (1 on the tokens, 0 on padding); `labels`: the token id on the
    response's tokens and the EOS, IGNORE_INDEX (-100) on the prompt and the padding, as the
    transformers causal-LM loss expects (it shifts them by one itself).

    EOS is the tokenizer's EOS, else its SEP (`eos_token_id`); padding uses its pad token, else
    that EOS (`pad_token_id`); the tokenizer is not modified. Truncation keeps the response:
    see `_fit_instruction`. With `cache`, results are kept per process like `tokenize`'s, keyed by
    (dataset fingerprint, tokenizer, chat template, max_length, template, columns); the returned
    tensors are shared between callers and must not be modified in place.
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    check_template(template)
    key = _instruction_key("instructions", ds, tokenizer, max_length, template, prompt_column,
                           response_column, input_column)

    def build() -> TokenData:
        wanted = [prompt_column, response_column] + ([input_column] if input_column else [])
        check_columns(ds.column_names, wanted, "the dataset")
        prompts = _prompt_ids(ds, tokenizer, template, prompt_column, input_column)
        responses = _encode(tokenizer, [str(r) for r in column(ds, response_column)])
        prefix, eos = _prefix_ids(tokenizer, template), eos_token_id(tokenizer)
        n = len(prompts)
        input_ids = np.full((n, max_length), pad_token_id(tokenizer), dtype=np.int64)
        attention = np.zeros((n, max_length), dtype=np.int64)
        labels = np.full((n, max_length), IGNORE_INDEX, dtype=np.int64)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            context, target = _fit_instruction(prefix, prompt, response, eos, max_length)
            end = len(context) + len(target)
            input_ids[row, :end] = context + target
            attention[row, :end] = 1
            labels[row, len(context):end] = target
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
                "labels": torch.from_numpy(labels)}

    return _cached(key, cache, build)


def tokenize_prompts(ds: Dataset, tokenizer: Any, max_length: int, *, template: str = "plain",
                     prompt_column: str = "prompt", input_column: str | None = None,
                     cache: bool = True) -> TokenData:
    """Tokenise the formatted prompts alone for generation: left-padded, no labels.

    Returns int64 `input_ids` and `attention_mask` of shape (N, max_length); each row ends with
    its prompt's last token, so generation continues right after it. A prompt longer than
    `max_length` loses tokens from its start (after the BOS, if any). Padding, BOS and the cache
    are as in `tokenize_instructions`.
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    check_template(template)
    key = _instruction_key("prompts", ds, tokenizer, max_length, template, prompt_column, input_column)

    def build() -> TokenData:
        check_columns(ds.column_names, [prompt_column] + ([input_column] if input_column else []),
                      "the dataset")
        prompts = _prompt_ids(ds, tokenizer, template, prompt_column, input_column)
        prefix = _prefix_ids(tokenizer, template)
        room = max_length - len(prefix)
        input_ids = np.full((len(prompts), max_length), pad_token_id(tokenizer), dtype=np.int64)
        attention = np.zeros((len(prompts), max_length), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids = prefix + prompt[max(len(prompt) - room, 0):]
            input_ids[row, max_length - len(ids):] = ids
            attention[row, max_length - len(ids):] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention)}

    return _cached(key, cache, build)


def clear_token_cache() -> None:
    """Empty this process's tokenisation cache."""
    _token_cache.clear()


def token_cache_size() -> int:
    """How many tokenised datasets this process holds."""
    return len(_token_cache)


class TensorDictDataset(torch.utils.data.Dataset):
    """Row i of a dict of equal-length tensors, as a dict (default collate stacks it back)."""

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"tensors of unequal length: { {k: len(v) for k, v in data.items()} }")
        self.data = dict(data)
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.data.items()}


def make_dataloader(data: Mapping[str, torch.Tensor], batch_size: int, *, shuffle: bool = True,
                    seed: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of dict batches, shuffled by its own torch.Generator seeded with `seed`.

    A real DataLoader (not just an iterator) so that Opacus can swap in Poisson sampling.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(TensorDictDataset(data), batch_size=batch_size,
                                       shuffle=shuffle, drop_last=drop_last, generator=generator)


def iterate_batches(data: Mapping[str, torch.Tensor], batch_size: int, *, shuffle: bool = True,
                    seed: int = 0, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Yield dict batches by slicing the tensors (faster than a DataLoader; same seeding)."""
    n = len(next(iter(data.values())))
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
             else torch.arange(n))
    stop = n - n % batch_size if drop_last and batch_size > 0 else n
    yield from _slices(data, order[:stop], batch_size)


def evaluation_batches(data: Mapping[str, torch.Tensor], batch_size: int
                       ) -> Iterator[dict[str, torch.Tensor]]:
    """Batches for evaluation, shortest rows first, so that each batch is trimmed to rows of about
    its own length (`trim_padding`): on SST-2's validation split (13 tokens on average, up to 58)
    batches of 64 in file order hold 3.3x the token positions of length-sorted ones
    (benchmarks/evaluation_order.py). What `evaluate` returns (sums over examples) does not depend
    on the order; the batches' shapes change its floats by rounding only."""
    mask = data.get("attention_mask")
    order = (torch.argsort(mask.sum(1), stable=True) if mask is not None
             else torch.arange(len(next(iter(data.values())))))
    yield from _slices(data, order, batch_size)


def _slices(data: Mapping[str, torch.Tensor], order: torch.Tensor, batch_size: int
            ) -> Iterator[dict[str, torch.Tensor]]:
    """The rows `order` lists, batch_size at a time, each batch trimmed of its all-padding tail."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield trim_padding({k: v[index] for k, v in data.items()})


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the trailing columns that are padding in every row of a batch.

    Texts are padded to `max_length` once, when tokenised; most batches need far fewer columns
    (SST-2's training phrases average 9 words). A trailing all-padding column is masked out of
    every attention and out of the loss, so the outputs are unchanged. Only right-padded
    batches with labels are trimmed: class labels (N,), or token labels (N, L) that ignore
    every trimmed column (IGNORE_INDEX, as `tokenize_instructions` writes on padding). Left
    padding (`tokenize_prompts`) would shift positions, and token labels that score padding
    would lose loss terms: such batches are left as they are, as are batches without labels.
    """
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if mask is None or mask.dim() != 2 or labels is None or not len(mask):
        return batch
    if labels.dim() != 1 and labels.shape != mask.shape:
        return batch
    if bool((mask[:, 0] == 0).any()):  # left padding (or an empty text): leave as it is
        return batch
    width = int(mask.sum(1).max())
    if width == mask.shape[1]:
        return batch
    if labels.dim() == 2 and not bool((labels[:, width:] == IGNORE_INDEX).all()):
        return batch  # token labels on padding: the loss counts those columns
    columns = mask.shape[1]
    return {k: v[:, :width] if v.dim() == 2 and v.shape[1] == columns else v for k, v in batch.items()}
