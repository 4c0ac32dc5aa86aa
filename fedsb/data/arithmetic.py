"""The embedded instruction task: short arithmetic word problems generated from a seed.

A stand-in for the Fed-SB paper's arithmetic setting (MetaMathQA -> GSM8K) that needs no
download: each example is a one- or two-sentence English word problem (`prompt`), a brief worked
answer that ends with GSM8K's answer line `#### <integer>` (`response`), and the problem's
operation as a class label (`label`, a `ClassLabel` of `arithmetic_label_names()`) so the usual
label-skewed partitions apply. Numbers are small (at most 20, products and dividends at most 81)
so a tiny model can learn something in a few hundred steps.

Every prompt string belongs to one side of a fixed 80/20 split of the prompt space (a hash of
the text), so `arithmetic_dataset(..., split="train")` and `split="test"` never share a prompt
whatever their seeds and sizes; `load_task("arithmetic")` uses them for its train and test sets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from fedsb.data.schema import LABEL, DataError

ARITHMETIC = "arithmetic"
PROMPT = "prompt"
RESPONSE = "response"
SPLITS = ("train", "test")
TEST_SHARE = 5  # one prompt in TEST_SHARE (by hash) belongs to the test side

_NAMES = ("Tom", "Anna", "Ben", "Maria", "Sam", "Lily", "Omar", "Mei", "Jack", "Sara", "Leo", "Nina")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "stamps", "shells",
          "cards", "balloons")

# Per operation: the templates ({n}, {m} names, {i} items, {a}, {b} operands) and its symbol.
# Templates ask for the result of `a <op> b`; every one is a single short question.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "addition": (
        "{n} has {a} {i} and buys {b} more. How many {i} does {n} have now?",
        "{n} found {a} {i} in the morning and {b} in the afternoon. How many {i} did {n} find?",
        "A box holds {a} {i}. {n} puts in {b} more. How many {i} are in the box?",
        "{n} has {a} {i} and {m} has {b}. How many {i} do they have together?",
        "What is {a} plus {b}?",
    ),
    "subtraction": (
        "{n} has {a} {i} and gives {b} to {m}. How many {i} does {n} have left?",
        "There are {a} {i} on the table. {n} takes {b} of them. How many {i} are left?",
        "{n} has {a} {i} and {m} has {b}. How many more {i} does {n} have than {m}?",
        "What is {a} minus {b}?",
    ),
    "multiplication": (
        "{n} buys {a} bags with {b} {i} in each bag. How many {i} does {n} buy?",
        "There are {a} rows of {i} with {b} in each row. How many {i} are there?",
        "{n} gets {b} {i} every day for {a} days. How many {i} does {n} get?",
        "What is {a} times {b}?",
    ),
    "division": (
        "{n} shares {a} {i} equally among {b} friends. How many {i} does each friend get?",
        "{n} packs {a} {i} into bags of {b}. How many bags does {n} fill?",
        "{a} {i} are split into {b} equal piles. How many {i} are in each pile?",
        "What is {a} divided by {b}?",
    ),
}
_SYMBOLS = {"addition": "+", "subtraction": "-", "multiplication": "*", "division": "/"}


def _operands(operation: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """(a, b, a <op> b) with small non-negative integers and an exact integer result."""
    if operation == "addition":
        a, b = int(rng.integers(1, 21)), int(rng.integers(1, 21))
        return a, b, a + b
    if operation == "subtraction":
        a = int(rng.integers(2, 21))
        b = int(rng.integers(1, a))  # a positive answer
        return a, b, a - b
    if operation == "multiplication":
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
        return a, b, a * b
    b, q = int(rng.integers(2, 10)), int(rng.integers(1, 10))  # division: a = b * q exactly
    return b * q, b, q


_OPERATIONS: tuple[str, ...] = tuple(_TEMPLATES)


def arithmetic_label_names() -> list[str]:
    """The operations, in label order: addition, subtraction, multiplication, division."""
    return list(_OPERATIONS)


def prompt_split(prompt: str) -> str:
    """The side ('train' or 'test') of the fixed prompt-space split that a prompt belongs to."""
    # A stable hash (not Python's salted `hash`): the split must be the same in every process.
    digest = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    return "test" if digest % TEST_SHARE == 0 else "train"


def _problem(operation: str, rng: np.random.Generator) -> tuple[str, str]:
    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    template = pick(_TEMPLATES[operation])
    a, b, result = _operands(operation, rng)
    first = pick(_NAMES)
    second = pick(tuple(n for n in _NAMES if n != first))
    prompt = template.format(n=first, m=second, i=pick(_ITEMS), a=a, b=b)
    response = f"{a} {_SYMBOLS[operation]} {b} = {result}\n#### {result}"
    return prompt, response


def arithmetic_dataset(num_examples: int, seed: int = 0, *, split: str | None = None) -> Dataset:
    """A deterministic arithmetic instruction dataset: columns `prompt`, `response`, `label`.

    Labels (operations) are balanced to within one example and shuffled. Only a local
    generator seeded by `seed` is used; global random state is untouched. With `split`
    ('train' or 'test'), only prompts on that side of the fixed prompt-space split are kept
    (problems are redrawn until one fits), so the two sides never share a prompt; None keeps
    every problem.
    """
    if num_examples < 0:
        raise DataError(f"arithmetic task: num_examples must be >= 0, got {num_examples}")
    if split is not None and split not in SPLITS:
        raise DataError(f"arithmetic task: split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    keep: Callable[[str], bool] = (lambda _: True) if split is None else (lambda p: prompt_split(p) == split)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % len(_OPERATIONS)).tolist()
    prompts, responses = [], []
    for label in labels:
        for _ in range(10_000):  # the test side keeps about 1 in TEST_SHARE: a few draws suffice
            prompt, response = _problem(_OPERATIONS[label], rng)
            if keep(prompt):
                break
        else:  # pragma: no cover - unreachable with the templates above
            raise DataError(f"arithmetic task: no {split} prompt found for {_OPERATIONS[label]}")
        prompts.append(prompt)
        responses.append(response)
    features = Features({PROMPT: Value("string"), RESPONSE: Value("string"),
                         LABEL: ClassLabel(names=arithmetic_label_names())})
    return Dataset.from_dict({PROMPT: prompts, RESPONSE: responses, LABEL: labels}, features=features)
