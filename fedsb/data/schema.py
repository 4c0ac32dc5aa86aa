"""The data layer's contract: every task is a `datasets.Dataset` with columns `text` and `label`.

`label` is a `ClassLabel` whose names are the task's label names, whatever the source's column
names were, so partitioning, tokenisation and training can rely on it. This module holds that
contract (column names, `make_dataset`), the layer's one error type and two column helpers
shared by the other modules of `fedsb.data`.
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import ClassLabel, Dataset, Features, Value

TEXT = "text"
LABEL = "label"


class DataError(ValueError):
    """A data source that cannot be used as given (bad column, label, extension, split...)."""


def make_dataset(texts: list[str], labels: list[int], label_names: Sequence[str]) -> Dataset:
    """A (text, label) dataset with `label` a ClassLabel of `label_names`."""
    features = Features({TEXT: Value("string"), LABEL: ClassLabel(names=list(label_names))})
    return Dataset.from_dict({TEXT: texts, LABEL: labels}, features=features)


def column(ds: Dataset, name: str) -> list:
    """One column as a Python list."""
    # `ds[name]` is a lazy Column in datasets 4; slicing it reads the whole column at once (fast).
    values = ds[name][:]
    return values if isinstance(values, list) else list(values)


def check_columns(available: Sequence[str], wanted: Sequence[str], where: str) -> None:
    """A one-line DataError naming the first of `wanted` missing from `available`."""
    for name in wanted:
        if name not in available:
            raise DataError(f"column {name!r} not found in {where}; "
                            f"available columns: {', '.join(map(str, available)) or '(none)'}")
