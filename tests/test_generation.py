"""Tests of causal-LM training on instruction batches and of generation-based evaluation
(answer extraction, exact match, greedy generation) on the tiny Llama-like model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedsb.core.models import load_model
from fedsb.data.arithmetic import arithmetic_dataset
from fedsb.data.tokens import (
    IGNORE_INDEX,
    clear_token_cache,
    iterate_batches,
    tokenize_instructions,
    tokenize_prompts,
)
from fedsb.training.generation import (
    ANSWER_STYLES,
    exact_match,
    extract_answer,
    generate,
    generation_accuracy,
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_token_cache()
    yield
    clear_token_cache()


@pytest.fixture
def model():
    return load_model("tiny-llama", task="causal_lm", seed=0)


# ------------------------------------------------------------------------- answers and exact match

EXTRACT = [
    # text, gsm8k, last_number
    ("7 + 5 = 12\n#### 12", "12", "12"),
    ("The total is 1,234.\n#### 1,234", "1234", "1234"),
    ("#### -3", "-3", "-3"),
    ("10 - 13 = -3", None, "-3"),
    ("#### 2.50", "2.5", "2.5"),
    ("#### 12.0", "12", "12"),
    ("#### $1,000,000 exactly", "1000000", "1000000"),
    ("#### 3\nwait, no\n#### 4", "4", "4"),
    ("# # # # 56", "56", "56"),  # the marker as the tiny models' WordPiece tokenizer decodes it
    ("5-3=2", None, "2"),
    ("I do not know", None, None),
    ("#### none", None, None),
    ("", None, None),
]


@pytest.mark.parametrize(("text", "gsm8k", "last"), EXTRACT)
def test_extract_answer(text, gsm8k, last):
    assert extract_answer(text) == extract_answer(text, "gsm8k") == gsm8k
    assert extract_answer(text, "last_number") == last


def test_exact_match_equals_a_hand_count():
    references = ["#### 12", "#### 1,234", "#### -3", "#### 2.5", "#### 7", "#### 8", "no answer here"]
    predictions = [
        "3 * 4 = 12\n#### 12",  # match
        "#### 1234",  # match: thousands separators do not count
        "#### 3",  # sign differs: no match
        "#### 2.50",  # match: the same number
        "7",  # no "####": no answer in gsm8k style (7 in last_number style)
        "#### 9",  # wrong
        "#### 5",  # the reference has no answer: never a match
    ]
    assert exact_match(predictions, references) == pytest.approx(3 / 7)
    assert exact_match(predictions, references, "last_number") == pytest.approx(4 / 7)
    assert exact_match(["nothing"], ["nothing"]) == 0.0  # None never matches None
    assert exact_match([], []) == 0.0
    assert ANSWER_STYLES == ("gsm8k", "last_number")
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown answer style 'first'"):
        extract_answer("#### 1", "first")


def test_generation_accuracy_equals_a_hand_count_with_a_stubbed_generate(model, tokenizer, monkeypatch):
    """The metric's plumbing on chosen continuations (the only place generate is stubbed)."""
    ds = arithmetic_dataset(5, seed=0)
    prompts = tokenize_prompts(ds, tokenizer, 40)
    answers = [extract_answer(r) for r in ds["response"]]
    continuations = [f"#### {answers[0]}", f"#### {int(answers[1]) + 1}", "no idea",
                     f"so #### {answers[3]}", f"{answers[4]}"]  # right, wrong, none, right, none
    seen: list[int] = []

    def stub(input_ids, attention_mask, **options):
        assert options["do_sample"] is False and options["pad_token_id"] == tokenizer.pad_token_id
        assert input_ids.shape == attention_mask.shape
        rows = []
        for prompt in input_ids:
            new = tokenizer(continuations[len(seen)], add_special_tokens=False)["input_ids"][:8]
            seen.append(len(new))
            rows.append(torch.cat([prompt, torch.tensor(new + [0] * (8 - len(new)))]))
        return torch.stack(rows)

    monkeypatch.setattr(model, "generate", stub)
    result = generation_accuracy(model, tokenizer, prompts, ds["response"], batch_size=2, max_new_tokens=8)
    assert result == {"exact_match": pytest.approx(2 / 5), "examples": 5}
    assert len(seen) == 5
    seen.clear()
    texts = generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=8)
    assert texts[2] == "no idea" and texts[4] == answers[4]  # the new tokens only, padding skipped
    assert "#" in texts[0] and "what" not in " ".join(texts)
    with pytest.raises(ValueError, match="5 prompts for 4 references"):
        generation_accuracy(model, tokenizer, prompts, ds["response"][:4], batch_size=2, max_new_tokens=8)


# ------------------------------------------------------------------------- the real generate

def test_generate_on_the_tiny_model_returns_only_the_new_text(model, tokenizer):
    ds = arithmetic_dataset(5, seed=1)
    prompts = tokenize_prompts(ds, tokenizer, 40)
    model.train()
    texts = generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=6)
    assert model.training  # the mode it was in
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    # Row 0 by hand: the prompt without its padding, greedy, the tokens after the prompt.
    mask = prompts["attention_mask"][0].bool()
    ids = prompts["input_ids"][0][mask][None]
    stop = [tokenizer.sep_token_id, model.generation_config.eos_token_id]
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=6, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    assert out.shape[1] <= ids.shape[1] + 6
    assert texts[0] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    batched = generate(model, tokenizer, prompts, batch_size=5, max_new_tokens=6)
    assert len(batched) == 5 and all(isinstance(t, str) for t in batched)
    result = generation_accuracy(model, tokenizer, prompts, ds["response"], batch_size=5, max_new_tokens=6)
    assert result["examples"] == 5 and 0.0 <= result["exact_match"] <= 1.0


# ------------------------------------------------------------------------- training on instructions

def response_loss(model, batch) -> torch.Tensor:
    """The mean next-token cross-entropy over the response tokens alone, by hand."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    return F.cross_entropy(logits[:, :-1][scored], targets[scored])


def test_a_few_adamw_steps_lower_the_response_loss(model, tokenizer):
    ds = arithmetic_dataset(16, seed=0)
    tokens = tokenize_instructions(ds, tokenizer, 48)
    (batch,) = list(iterate_batches(tokens, 16, shuffle=False))
    assert batch["input_ids"].shape[1] < 48  # trimmed padding
    with torch.no_grad():
        before = model(**batch).loss
        # transformers' loss ignores -100: it is the loss on the response tokens (and EOS) alone,
        # and the padding dropped from the batch changes nothing.
        assert before == pytest.approx(response_loss(model, batch).item(), rel=1e-5)
        assert before == pytest.approx(model(**tokens).loss.item(), rel=1e-5)
    params = [p for name, p in model.named_parameters() if "layers" in name or "lm_head" in name]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(8):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss
    assert after < 0.7 * before, (before, after)
