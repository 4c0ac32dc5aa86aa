"""Tests of the instruction-tuning data: the arithmetic task, prompt templates, and the causal-LM
tokenisers (`tokenize_instructions`, `tokenize_prompts`) with their batches."""

from __future__ import annotations

import re

import pytest
import torch
from datasets import Dataset

from fedsb.core.models import load_tokenizer
from fedsb.data import arithmetic
from fedsb.data.arithmetic import ARITHMETIC, arithmetic_dataset, arithmetic_label_names, prompt_split
from fedsb.data.partition import partition_dataset
from fedsb.data.schema import DataError
from fedsb.data.sources import load_task
from fedsb.data.templates import ALPACA_NO_INPUT, PLAIN_SEPARATOR, TEMPLATES, format_prompt
from fedsb.data.tokens import (
    IGNORE_INDEX,
    clear_token_cache,
    iterate_batches,
    token_cache_size,
    tokenize_instructions,
    tokenize_prompts,
)
from fedsb.training.generation import extract_answer

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SEP = 102  # the MiniLM tokenizer's [SEP]: it has no EOS, so [SEP] ends a response
PAD = 0


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_token_cache()
    yield
    clear_token_cache()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------- the arithmetic task

def true_result(prompt: str, operation: str) -> int:
    """The answer computed from the prompt's two numbers (every template gives a before b)."""
    a, b = (int(x) for x in re.findall(r"\d+", prompt))
    return {"addition": a + b, "subtraction": a - b, "multiplication": a * b, "division": a // b}[operation]


def test_arithmetic_dataset_is_deterministic_varied_and_correct():
    ds = arithmetic_dataset(400, seed=0)
    names = arithmetic_label_names()
    assert ds.column_names == ["prompt", "response", "label"] and len(ds) == 400
    assert ds.features["label"].names == names == ["addition", "subtraction", "multiplication", "division"]
    assert arithmetic_dataset(400, seed=0)["prompt"] == ds["prompt"]
    assert arithmetic_dataset(400, seed=0)["response"] == ds["response"]
    assert arithmetic_dataset(400, seed=1)["prompt"] != ds["prompt"]
    labels = ds["label"]
    assert all(0 <= y < len(names) for y in labels)
    assert max(labels.count(y) for y in range(4)) - min(labels.count(y) for y in range(4)) <= 1
    shapes: dict[int, set[str]] = {y: set() for y in range(4)}
    for row in ds:
        operation = names[row["label"]]
        result = true_result(row["prompt"], operation)
        assert extract_answer(row["response"]) == str(result), row
        assert row["response"].endswith(f"\n#### {result}")
        assert len(row["prompt"].split()) <= 20 and 0 < result <= 81
        shape = re.sub(r"\d+", "N", row["prompt"])
        for word in arithmetic._NAMES + arithmetic._ITEMS:
            shape = re.sub(rf"\b{word}\b", "W", shape)
        shapes[row["label"]].add(shape)
    assert all(len(s) >= 4 for s in shapes.values()), shapes  # several templates per operation
    assert len(set(ds["prompt"])) > 0.8 * len(ds)


def test_arithmetic_splits_never_share_a_prompt():
    train = arithmetic_dataset(300, seed=0, split="train")
    test = arithmetic_dataset(300, seed=0, split="test")
    assert {prompt_split(p) for p in train["prompt"]} == {"train"}
    assert {prompt_split(p) for p in test["prompt"]} == {"test"}
    assert not set(train["prompt"]) & set(test["prompt"])
    with pytest.raises(DataError, match="split must be"):
        arithmetic_dataset(3, split="validation")


def test_load_task_arithmetic_gives_disjoint_train_and_test_streams():
    train, test, names = load_task(ARITHMETIC, num_examples=200, num_test=80, seed=0)
    assert (len(train), len(test), names) == (200, 80, arithmetic_label_names())
    assert train.column_names == test.column_names == ["prompt", "response", "label"]
    assert not set(train["prompt"]) & set(test["prompt"])
    # The test stream is independent of the training size, and both follow the seed.
    again = load_task(ARITHMETIC, num_examples=50, num_test=80, seed=0)
    assert again[1]["prompt"] == test["prompt"]
    other = load_task(ARITHMETIC, num_examples=200, num_test=80, seed=1)
    assert other[0]["prompt"] != train["prompt"] and other[1]["prompt"] != test["prompt"]
    assert len(load_task(ARITHMETIC, seed=0)[0]) == 2000
    with pytest.raises(DataError, match="label_noise"):
        load_task(ARITHMETIC, label_noise=0.1)
    with pytest.raises(DataError, match="label_names"):
        load_task(ARITHMETIC, label_names=["a", "b"])
    # The operation label drives the usual label-skewed partitions.
    parts = partition_dataset(train, 4, "classes", classes_per_client=1, seed=0)
    assert all(len(set(p["label"])) == 1 and p.column_names == train.column_names for p in parts)


# ------------------------------------------------------------------------- templates

def test_plain_and_alpaca_templates():
    assert TEMPLATES == ("plain", "alpaca", "chat")
    assert PLAIN_SEPARATOR == "\nAnswer: "
    assert format_prompt("What is 2 plus 3?", "plain") == "What is 2 plus 3?\nAnswer: "
    assert format_prompt("Add.", "plain", input_text="2 and 3") == "Add.\n\n2 and 3\nAnswer: "
    no_input = ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\nWhat is 2 plus 3?\n\n### Response:")
    assert format_prompt("What is 2 plus 3?", "alpaca") == no_input
    assert format_prompt("What is 2 plus 3?", "alpaca", input_text="") == no_input
    assert format_prompt("What is 2 plus 3?", "alpaca", input_text=None) == no_input
    assert ALPACA_NO_INPUT.format(instruction="What is 2 plus 3?") == no_input
    with_input = ("Below is an instruction that describes a task, paired with an input that provides "
                  "further context. Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:")
    assert format_prompt("Add the numbers.", "alpaca", input_text="2 and 3") == with_input
    with pytest.raises(DataError, match="unknown prompt template 'vicuna'; accepted: plain, alpaca, chat"):
        format_prompt("x", "vicuna")


def test_chat_template_uses_the_tokenizers_own_and_fails_in_one_line_without_one(tokenizer):
    chat = load_tokenizer("tiny-llama")  # a fresh instance: the shared fixture stays as it is
    chat.chat_template = CHAT_TEMPLATE
    assert format_prompt("What is 2 plus 3?", "chat", chat) == "<|user|>What is 2 plus 3?\n<|assistant|>"
    with_input = format_prompt("Add.", "chat", chat, input_text="2 and 3")
    assert with_input == "<|user|>Add.\n\n2 and 3\n<|assistant|>"
    for without in (tokenizer, None):
        with pytest.raises(DataError, match="needs a tokenizer with a chat template") as info:
            format_prompt("What is 2 plus 3?", "chat", without)
        assert "\n" not in str(info.value)
    # The chat template's text is what gets tokenised, with no BOS added before it.
    ds = Dataset.from_dict({"prompt": ["What is 2 plus 3?"], "response": ["#### 5"]})
    tokens = tokenize_instructions(ds, chat, 40, template="chat")
    n = int(tokens["attention_mask"].sum())
    expected = encode(chat, "<|user|>What is 2 plus 3?\n<|assistant|>") + encode(chat, "#### 5") + [SEP]
    assert tokens["input_ids"][0, :n].tolist() == expected


# ------------------------------------------------------------------------- tokenize_instructions

def test_labels_score_the_response_and_eos_only(tokenizer):
    ds = Dataset.from_dict({"prompt": ["What is 2 plus 3?", "Tom has 7 apples and buys 5 more."],
                            "response": ["2 + 3 = 5\n#### 5", "7 + 5 = 12\n#### 12"]})
    out = tokenize_instructions(ds, tokenizer, 40)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (2, 40) and v.dtype == torch.int64 for v in out.values())
    for row in range(2):
        prompt = encode(tokenizer, format_prompt(ds["prompt"][row], "plain"))
        response = encode(tokenizer, ds["response"][row]) + [SEP]
        p, n = len(prompt), len(prompt) + len(response)
        ids, mask, labels = (out[k][row].tolist() for k in ("input_ids", "attention_mask", "labels"))
        assert ids[:p] == prompt and ids[p:n] == response and ids[n:] == [PAD] * (40 - n)
        assert labels[:p] == [IGNORE_INDEX] * p  # the prompt is never scored
        assert labels[p:n] == response  # the response and its EOS are
        assert labels[n:] == [IGNORE_INDEX] * (40 - n) and mask == [1] * n + [0] * (40 - n)
    with pytest.raises(DataError, match="column 'answer' not found"):
        tokenize_instructions(ds, tokenizer, 40, response_column="answer")
    with pytest.raises(DataError, match="unknown prompt template"):
        tokenize_instructions(ds, tokenizer, 40, template="vicuna")


def test_input_column_and_alpaca_template(tokenizer):
    ds = Dataset.from_dict({"instruction": ["Add the numbers."], "context": ["2 and 3"],
                            "output": ["#### 5"]})
    out = tokenize_instructions(ds, tokenizer, 80, template="alpaca", prompt_column="instruction",
                                response_column="output", input_column="context")
    prompt = encode(tokenizer, format_prompt("Add the numbers.", "alpaca", input_text="2 and 3"))
    assert out["input_ids"][0, :len(prompt)].tolist() == prompt
    assert (out["labels"][0, :len(prompt)] == IGNORE_INDEX).all()
    assert out["labels"][0, len(prompt):len(prompt) + 6].tolist() == encode(tokenizer, "#### 5") + [SEP]


def test_truncation_cuts_the_prompt_from_its_start_and_keeps_the_response(tokenizer):
    long_prompt = "one two three four five six seven eight nine ten eleven twelve. What is 2 plus 3?"
    ds = Dataset.from_dict({"prompt": [long_prompt], "response": ["2 + 3 = 5\n#### 5"]})
    prompt = encode(tokenizer, format_prompt(long_prompt, "plain"))
    response = encode(tokenizer, "2 + 3 = 5\n#### 5") + [SEP]
    max_length = len(response) + 6
    assert len(prompt) > 6
    out = tokenize_instructions(ds, tokenizer, max_length)
    assert out["input_ids"][0].tolist() == prompt[-6:] + response  # the prompt's end, the whole response
    assert out["labels"][0].tolist() == [IGNORE_INDEX] * 6 + response
    assert (out["attention_mask"] == 1).all()
    # A response that cannot fit alone loses its end (and has no EOS: it does not end there).
    short = tokenize_instructions(ds, tokenizer, 5)
    assert short["input_ids"][0].tolist() == short["labels"][0].tolist() == response[:5]


def test_a_tokenizer_without_pad_token_pads_with_eos_and_is_not_modified():
    bare = load_tokenizer("tiny-llama")
    bare.pad_token = None
    ds = Dataset.from_dict({"prompt": ["What is 2 plus 3?"], "response": ["#### 5"]})
    out = tokenize_instructions(ds, bare, 30)
    n = int(out["attention_mask"].sum())
    assert (out["input_ids"][0, n:] == SEP).all() and (out["labels"][0, n:] == IGNORE_INDEX).all()
    assert out["labels"][0, n - 1] == SEP  # the EOS is scored; the padding that equals it is not
    assert bare.pad_token is None
    assert (tokenize_prompts(ds, bare, 30)["input_ids"][0, :30 - n + 4] == SEP).all()


def test_instruction_cache_keys(tokenizer):
    ds = arithmetic_dataset(20, seed=0)
    first = tokenize_instructions(ds, tokenizer, 48)
    assert tokenize_instructions(ds, tokenizer, 48) is first and token_cache_size() == 1
    assert tokenize_instructions(ds, tokenizer, 48, template="alpaca") is not first
    assert tokenize_instructions(ds, tokenizer, 32) is not first
    assert tokenize_instructions(arithmetic_dataset(20, seed=0), tokenizer, 48) is first  # same content
    assert tokenize_instructions(ds, tokenizer, 48, cache=False) is not first
    assert token_cache_size() == 3
    prompts = tokenize_prompts(ds, tokenizer, 48)
    assert tokenize_prompts(ds, tokenizer, 48) is prompts and token_cache_size() == 4


# ------------------------------------------------------------------------- tokenize_prompts

def test_prompts_are_left_padded_and_end_with_the_last_prompt_token(tokenizer):
    ds = arithmetic_dataset(12, seed=3)
    out = tokenize_prompts(ds, tokenizer, 40)
    assert set(out) == {"input_ids", "attention_mask"} and out["input_ids"].shape == (12, 40)
    train = tokenize_instructions(ds, tokenizer, 64)
    for row in range(12):
        prompt = encode(tokenizer, format_prompt(ds["prompt"][row], "plain"))
        n = len(prompt)
        assert out["input_ids"][row].tolist() == [PAD] * (40 - n) + prompt
        assert out["attention_mask"][row].tolist() == [0] * (40 - n) + [1] * n
        # The same tokens the model was trained to answer.
        assert train["input_ids"][row, :n].tolist() == prompt and train["labels"][row, n - 1] == IGNORE_INDEX
    short = tokenize_prompts(ds, tokenizer, 8)
    assert (short["attention_mask"] == 1).all()
    for row in range(12):  # truncated from the left: the prompt's last 8 tokens
        prompt = encode(tokenizer, format_prompt(ds["prompt"][row], "plain"))
        assert short["input_ids"][row].tolist() == prompt[-8:]


# ------------------------------------------------------------------------- batches

def test_instruction_batches_trim_only_the_padding_and_prompt_batches_stay_whole(tokenizer):
    ds = arithmetic_dataset(30, seed=0)
    tokens = tokenize_instructions(ds, tokenizer, 64)
    batches = list(iterate_batches(tokens, 8, shuffle=False))
    assert [len(b["labels"]) for b in batches] == [8, 8, 8, 6]
    for start, batch in zip(range(0, 30, 8), batches, strict=True):
        width = int(tokens["attention_mask"][start:start + 8].sum(1).max())
        assert all(v.shape[1] == width for v in batch.values()) and width < 64
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key], tokens[key][start:start + 8, :width])
        # Nothing scored was dropped.
        assert (tokens["labels"][start:start + 8, width:] == IGNORE_INDEX).all()
    prompts = tokenize_prompts(ds, tokenizer, 64)
    for start, batch in zip(range(0, 30, 8), iterate_batches(prompts, 8, shuffle=False), strict=True):
        assert torch.equal(batch["input_ids"], prompts["input_ids"][start:start + 8])
    # Token labels on padding columns (not ours) are never trimmed away.
    scored = {**tokens, "labels": tokens["input_ids"]}
    (whole,) = list(iterate_batches(scored, 30, shuffle=False))
    assert whole["input_ids"].shape == (30, 64)
