"""Instruction data for causal-LM fine-tuning: rows of (prompt, response), with an optional input
and an optional category that label-skewed partitions split on.

Sources: the generated arithmetic task (`arithmetic`, offline), a local file (csv/tsv/json/jsonl/
parquet) or a hub dataset (`hf:<name>[:<config>]`, e.g. Dolly or MetaMathQA). Every loader returns
datasets with the columns `prompt`, `response`, `input` (only with an input column) and `label`
(a ClassLabel of the categories; one category, 'all', without a category column, so that IID
partitioning is the only sensible scheme).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Value

from fedsb.data.arithmetic import ARITHMETIC
from fedsb.data.schema import LABEL, DataError, check_columns, column
from fedsb.data.sources import HF_PREFIX, load_task, parse_hf_source, read_table, split_train_test, subsample

PROMPT, RESPONSE, INPUT = "prompt", "response", "input"
NO_CATEGORY = "all"


def _instructions(table: Dataset, where: str, prompt_column: str, response_column: str,
                  input_column: str | None, category_column: str | None,
                  categories: Sequence[str] | None = None) -> tuple[Dataset, list[str]]:
    if category_column == LABEL and LABEL not in table.column_names:
        category_column = None  # the config's default label column: no categories in this file
    wanted = [prompt_column, response_column, *(c for c in (input_column, category_column) if c)]
    check_columns(table.column_names, wanted, where)
    prompts, responses = column(table, prompt_column), column(table, response_column)
    for name, values in ((prompt_column, prompts), (response_column, responses)):
        empty = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
        if empty:
            raise DataError(f"{where}: column {name!r} has {len(empty)} missing or empty value(s), "
                            f"first at row {empty[0]}")
    if category_column:
        raw = [str(v) for v in column(table, category_column)]
    else:  # no categories here: the first known one (a test set's categories only matter for partitions)
        raw = [categories[0] if categories else NO_CATEGORY] * len(table)
    names = list(categories) if categories is not None else sorted(set(raw))
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise DataError(f"{where}: categories {unknown[:3]} are not among the training file's {names[:5]}")
    columns: dict[str, list] = {PROMPT: prompts, RESPONSE: responses}
    types: dict = {PROMPT: Value("string"), RESPONSE: Value("string")}
    if input_column:
        columns[INPUT] = [v if isinstance(v, str) else "" for v in column(table, input_column)]
        types[INPUT] = Value("string")
    columns[LABEL] = [names.index(v) for v in raw]
    types[LABEL] = ClassLabel(names=names)
    return Dataset.from_dict(columns, features=Features(types)), names


def _read(source: str, split: str) -> tuple[Dataset, str]:
    if source.startswith(HF_PREFIX):
        import datasets  # here: tests monkeypatch `datasets.load_dataset`

        name, config = parse_hf_source(source)
        where = f"hub dataset {name!r} split {split!r}"
        try:
            return datasets.load_dataset(name, config, split=split), where
        except ValueError as err:
            raise DataError(f"cannot load {where}: {err}") from err
    path = Path(source).expanduser()
    return read_table(path), str(path)


def load_instruction_file(path: str, categories: Sequence[str], *, prompt_column: str = PROMPT,
                          response_column: str = RESPONSE, input_column: str | None = None,
                          category_column: str | None = None) -> Dataset:
    """One local file (a validation or test file) with the training data's categories."""
    table, where = _read(path, "train")
    return _instructions(table, where, prompt_column, response_column, input_column, category_column,
                         categories)[0]


def load_instructions(
    source: str, *, prompt_column: str = PROMPT, response_column: str = RESPONSE,
    input_column: str | None = None, category_column: str | None = None,
    test_file: str | None = None, test_split: str | None = None, num_examples: int | None = None,
    num_test: int | None = None, test_fraction: float = 0.2, seed: int = 0,
    test_prompt_column: str | None = None, test_response_column: str | None = None,
) -> tuple[Dataset, Dataset, list[str]]:
    """(train, test, category names) of an instruction task; the test split is a `test_file` (a local
    file, or 'hf:<name>[:<config>]', whose split 'test' is read), a hub `test_split` of the source,
    or else a seeded `test_fraction` of the source. `test_*_column` name the test set's own columns."""
    if source == ARITHMETIC:
        return load_task(ARITHMETIC, num_examples=num_examples, num_test=num_test, seed=seed)
    options = dict(prompt_column=prompt_column, response_column=response_column, input_column=input_column,
                   category_column=category_column)
    table, where = _read(source, "train")
    train, names = _instructions(table, where, **options)
    if test_file or test_split:
        if test_file:
            test_table, test_where = _read(test_file, "test" if test_file.startswith(HF_PREFIX) else "train")
        else:
            test_table, test_where = _read(source, test_split)
        test_options = dict(options, prompt_column=test_prompt_column or prompt_column,
                            response_column=test_response_column or response_column)
        if test_prompt_column or test_response_column:
            test_options.update(input_column=None, category_column=None)  # another dataset's columns
        test, _ = _instructions(test_table, test_where, **test_options, categories=names)
    else:
        train, test = split_train_test(train, test_fraction, seed)
    return subsample(train, num_examples, seed), subsample(test, num_test, seed), names
