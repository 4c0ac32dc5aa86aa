"""The data layer's contract: every task is a `datasets.Dataset` with columns `text` and `label`,
and `text_pair` for a sentence-pair task (the second text: SNLI's hypothesis, say).

`label` is a `ClassLabel` whose names are the task's label names, whatever the source's column
names were, so partitioning, tokenisation and training can rely on it. This module holds that
contract (column names, `make_dataset`), the layer's one error type and two column helpers
shared by the other modules of `fedsb.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where datasets are built: a client serving prepared tokens never loads it
    from datasets import Dataset

TEXT = "text"
TEXT_PAIR = "text_pair"  # the second text of a sentence-pair task (config data.text_pair_column)
LABEL = "label"


class DataError(ValueError):
    """A data source that cannot be used as given (bad column, label, extension, split...)."""


def make_dataset(texts: list[str], labels: list[int], label_names: Sequence[str],
                 text_pairs: list[str] | None = None) -> Dataset:
    """A (text, label) dataset with `label` a ClassLabel of `label_names`; with `text_pairs`, a
    (text, text_pair, label) dataset."""
    from datasets import ClassLabel, Dataset, Features, Value

    columns: dict[str, list] = {TEXT: texts}
    types: dict[str, Value | ClassLabel] = {TEXT: Value("string")}
    if text_pairs is not None:
        columns[TEXT_PAIR], types[TEXT_PAIR] = text_pairs, Value("string")
    columns[LABEL], types[LABEL] = labels, ClassLabel(names=list(label_names))
    return Dataset.from_dict(columns, features=Features(types))


def column(ds: Dataset, name: str) -> list:
    """One column as a Python list."""
    # `ds[name]` is a lazy Column in datasets 4; slicing it reads the whole column at once (fast).
    values = ds[name][:]
    return values if isinstance(values, list) else list(values)


class UnknownLabelsError(DataError):
    """Labels of a test or validation file that the training data does not have; `where` names the file."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where


class MissingColumnError(DataError):
    """A named column that the source does not have; `column` is the name that was asked for."""

    def __init__(self, message: str, column: str):
        super().__init__(message)
        self.column = column


def short(text: object, width: int = 20) -> str:
    """`text` as a string of at most `width` characters (an ellipsis marks a cut)."""
    value = " ".join(str(text).split())
    return value if len(value) <= width else value[:width - 1] + "\u2026"


def check_columns(available: Sequence[str], wanted: Sequence[str], where: str, hint: str = "") -> None:
    """A one-line MissingColumnError naming the first of `wanted` missing from `available`.

    The available columns are listed each cut to 20 characters (a headerless file's "columns"
    are its first row's values); `hint` is appended after a semicolon.
    """
    for name in wanted:
        if name not in available:
            found = ", ".join(short(a) for a in available) or "(none)"
            raise MissingColumnError(f"column {name!r} not found in {where}; available columns: {found}"
                                     + (f"; {hint}" if hint else ""), name)
