"""Tokenisation with a per-process cache, and the batchers that feed training and evaluation.

`tokenize` turns a (text, label) or (text, text_pair, label) dataset into padded int64 tensors
once per process (a worker sees the same partition every round); `iterate_batches` slices them
into batches with the all-padding tail trimmed, and `make_dataloader` wraps them in a DataLoader
for Opacus. Every batcher keeps every tensor of the data (`token_type_ids` of pairs included).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from fedsb.data.schema import LABEL, TEXT, DataError, check_columns, column

# input_ids, attention_mask, labels: (N, L), (N, L), (N,); token_type_ids (N, L) for pairs.
TokenData = dict[str, torch.Tensor]

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
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = len(next(iter(data.values())))
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
             else torch.arange(n))
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        yield trim_padding({k: v[index] for k, v in data.items()})


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the trailing columns that are padding in every row of a batch.

    Texts are padded to `max_length` once, when tokenised; most batches need far fewer columns
    (SST-2's training phrases average 9 words). A trailing all-padding column is masked out of
    every attention and (for class labels) out of the loss, so the outputs are unchanged. Only
    right-padded class-label batches are trimmed: left padding would shift positions, and
    per-token labels may score padding.
    """
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if mask is None or mask.dim() != 2 or labels is None or labels.dim() != 1 or not len(mask):
        return batch
    if bool((mask[:, 0] == 0).any()):  # left padding (or an empty text): leave as it is
        return batch
    width = int(mask.sum(1).max())
    if width == mask.shape[1]:
        return batch
    columns = mask.shape[1]
    return {k: v[:, :width] if v.dim() == 2 and v.shape[1] == columns else v for k, v in batch.items()}
