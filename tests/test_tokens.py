"""Tests of tokenisation, its per-process cache, and the batchers."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import fedsb.data.tokens as data
from fedsb.data.partition import partition_dataset
from fedsb.data.synthetic import synthetic_dataset
from fedsb.data.tokens import (
    clear_token_cache,
    iterate_batches,
    make_dataloader,
    token_cache_size,
    tokenize,
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_token_cache()
    yield
    clear_token_cache()


def test_tokenize_shapes_padding_and_labels(tokenizer):
    ds = synthetic_dataset(50, seed=0)
    out = tokenize(ds, tokenizer, 32)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert out["input_ids"].shape == out["attention_mask"].shape == (50, 32)
    assert out["labels"].shape == (50,) and out["labels"].tolist() == ds["label"]
    assert out["input_ids"].dtype == out["attention_mask"].dtype == out["labels"].dtype == torch.int64
    lengths = out["attention_mask"].sum(1)
    first = tokenizer(ds["text"][0])["input_ids"]
    assert lengths[0].item() == len(first) and out["input_ids"][0, : len(first)].tolist() == first
    assert (out["input_ids"][0, len(first):] == tokenizer.pad_token_id).all()
    short = tokenize(ds, tokenizer, 8)
    assert short["input_ids"].shape == (50, 8) and (short["attention_mask"] == 1).all()


def test_tokenize_cache(tokenizer):
    ds = synthetic_dataset(40, seed=0)
    first = tokenize(ds, tokenizer, 32)
    assert tokenize(ds, tokenizer, 32) is first and token_cache_size() == 1
    assert tokenize(ds, tokenizer, 16) is not first and token_cache_size() == 2
    assert tokenize(ds, tokenizer, 32, cache=False) is not first and token_cache_size() == 2
    # A partition recomputed from the same seed is the same dataset: no second tokenisation.
    full = synthetic_dataset(400, seed=1)
    a = partition_dataset(full, 4, "dirichlet", alpha=0.5, seed=2)[1]
    b = partition_dataset(full, 4, "dirichlet", alpha=0.5, seed=2)[1]
    assert tokenize(a, tokenizer, 32) is tokenize(b, tokenizer, 32)
    c = partition_dataset(full, 4, "dirichlet", alpha=0.5, seed=3)[1]
    assert tokenize(c, tokenizer, 32) is not tokenize(a, tokenizer, 32)
    clear_token_cache()
    assert token_cache_size() == 0


# ------------------------------------------------------------------------- batches

def toy_tensors(n: int = 70) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(n).repeat(4, 1).T.contiguous(), "attention_mask": torch.ones(n, 4,
            dtype=torch.long), "labels": torch.arange(n)}


def test_iterate_batches_covers_everything_once_with_seeded_order():
    data_ = toy_tensors()
    batches = list(iterate_batches(data_, 32, seed=0))
    assert [len(b["labels"]) for b in batches] == [32, 32, 6]
    seen = torch.cat([b["labels"] for b in batches])
    assert sorted(seen.tolist()) == list(range(70)) and seen.tolist() != list(range(70))
    assert all((b["input_ids"][:, 0] == b["labels"]).all() for b in batches)  # rows stay aligned
    again = torch.cat([b["labels"] for b in iterate_batches(data_, 32, seed=0)])
    other = torch.cat([b["labels"] for b in iterate_batches(data_, 32, seed=1)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)
    assert [len(b["labels"]) for b in iterate_batches(data_, 32, drop_last=True)] == [32, 32]
    ordered = torch.cat([b["labels"] for b in iterate_batches(data_, 32, shuffle=False)])
    assert ordered.tolist() == list(range(70))


def test_make_dataloader_yields_seeded_dict_batches():
    data_ = toy_tensors()
    loader = make_dataloader(data_, 16, seed=5)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [16, 16, 16, 16, 6]
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels"}
    assert batches[0]["input_ids"].shape == (16, 4)
    first = torch.cat([b["labels"] for b in batches])
    assert sorted(first.tolist()) == list(range(70))
    assert torch.equal(first, torch.cat([b["labels"] for b in make_dataloader(data_, 16, seed=5)]))
    assert not torch.equal(first, torch.cat([b["labels"] for b in make_dataloader(data_, 16, seed=6)]))


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-llama", "tiny-gpt2"])
def test_trimmed_batches_give_the_same_outputs_as_fully_padded_ones(arch):
    """Batches drop the trailing columns that are padding in every row; the model's logits and loss
    are those of the fully padded batch (to float32 tolerance)."""
    from fedsb.core.models import load_model, load_tokenizer

    model = load_model(arch, task="classification", num_labels=2, seed=0).eval()
    tokenizer = load_tokenizer(arch)
    ds = Dataset.from_dict({"text": ["good", "a rather long and winding sentence about a film", "bad film"],
                            "label": [1, 0, 0]})
    tokens = data.tokenize(ds, tokenizer, max_length=32, cache=False)
    full = {k: v for k, v in tokens.items()}
    (trimmed,) = list(data.iterate_batches(tokens, 8, shuffle=False))
    width = int(full["attention_mask"].sum(1).max())
    assert trimmed["input_ids"].shape == (3, width) and width < 32
    assert torch.equal(trimmed["input_ids"], full["input_ids"][:, :width])
    with torch.no_grad():
        a, b = model(**full), model(**trimmed)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.loss, b.loss, atol=1e-6)
    # Per-token labels (causal LM) and left padding are left as they are.
    left = {**full, "attention_mask": full["attention_mask"].flip(1)}
    assert data.trim_padding(left)["input_ids"].shape[1] == 32
    per_token = {**full, "labels": full["input_ids"]}
    assert data.trim_padding(per_token)["input_ids"].shape[1] == 32


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2"])
def test_evaluation_batches_sort_by_length_and_evaluate_as_file_order_does(arch):
    """Every row once, shortest first, far fewer token positions than file order; `evaluate` on them
    gives the file order's accuracy and loss (sums over examples: the order only rounds)."""
    from fedsb.core.models import load_model, load_tokenizer
    from fedsb.training.local import evaluate

    model = load_model(arch, task="classification", num_labels=2, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    words = ["good", "bad", "film", "plot", "dull", "fine", "actor", "scene"]
    lengths = [1 + int(torch.randint(0, 3, (), generator=g)) if i % 5 else 30 for i in range(60)]
    texts = [" ".join(words[int(j)] for j in torch.randint(0, 8, (n,), generator=g)) for n in lengths]
    ds = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(60)]})
    tokens = data.tokenize(ds, load_tokenizer(arch), max_length=40, cache=False)
    in_order = list(data.iterate_batches(tokens, 8, shuffle=False))
    by_length = list(data.evaluation_batches(tokens, 8))
    rows = torch.cat([b["input_ids"][:, :3] for b in by_length])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, tokens["input_ids"][:, :3].tolist()))
    widths = [b["input_ids"].shape[1] for b in by_length]
    assert widths == sorted(widths)
    padded, sorted_padded = (sum(b["input_ids"].numel() for b in bs) for bs in (in_order, by_length))
    assert sorted_padded < 0.5 * padded, (sorted_padded, padded)
    a, b = evaluate(model, in_order), evaluate(model, by_length)
    assert a["accuracy"] == b["accuracy"] and a["examples"] == b["examples"] == 60
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
