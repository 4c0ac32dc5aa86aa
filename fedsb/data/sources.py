"""Task sources: local files, the Hugging Face hub, label normalisation, and `load_task`.

(Over 400 lines on purpose: the file and hub readers share one row-cleaning and labelling rule,
`_rows`, and `load_task` applies it to both; split apart they would import each other.)

Every loader returns `datasets.Dataset`s with the columns `text` (str), `text_pair` (str; only
when a `text_pair_column` is named: a sentence-pair task) and `label` (a `ClassLabel` whose names
are the task's label names; see `fedsb.data.schema`). Rows without a label (missing, empty or '-';
a negative ClassLabel value on the hub) are an error; with `drop_unlabelled` they are dropped and
counted in one logged line, and so are rows with any negative integer label (SNLI's -1).
The arithmetic task (`source: arithmetic`, a causal-LM instruction task) has the columns `prompt`,
`response` and `label` (its operation).

Data sources for `load_task` (the one entry point):

- ``"synthetic"`` (default): a topic-classification task generated from the seed, so the
  simulator runs with no download (`fedsb.data.synthetic`).
- ``"arithmetic"``: an instruction task (arithmetic word problems with GSM8K-style answers)
  generated from the seed (`fedsb.data.arithmetic`); its datasets have columns `prompt`,
  `response` and `label` (the operation) instead of `text` and `label`.
- a local file path ending in .csv, .tsv, .json, .jsonl or .parquet, read by `datasets`'
  packaged builders; a separate test file is optional (without one, a stratified
  `test_fraction` of the file is held out).
- ``"hf:<name>"`` or ``"hf:<name>:<config>"``: a Hugging Face hub dataset (needs the internet
  or a warm cache), e.g. ``"hf:stanfordnlp/sst2"`` or ``"hf:nyu-mll/glue:sst2"``.

The test split is the server's: it is used for centralised evaluation and never partitioned.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from datasets import ClassLabel, Dataset
from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled
from datasets.utils.stratify import stratified_shuffle_split_generate_indices

from fedsb.data.arithmetic import ARITHMETIC, arithmetic_dataset, arithmetic_label_names
from fedsb.data.schema import LABEL, TEXT, DataError, UnknownLabelsError, check_columns, column, make_dataset
from fedsb.data.synthetic import synthetic_dataset, synthetic_label_names

__all__ = ["ARITHMETIC", "DataError", "EXTENSIONS", "HF_PREFIX", "SYNTHETIC", "derive_label_names",
           "encode_labels", "load_file", "load_hf", "load_task", "parse_hf_source", "split_train_test",
           "subsample"]

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
HF_PREFIX = "hf:"
# Extension -> reader kind. .tsv is read without quote handling (GLUE-style files contain
# unbalanced quotes in sentences that a CSV quote parser would swallow).
EXTENSIONS: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json",
                              ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------

def read_table(path: Path, header: bool = True) -> Dataset:
    """Read a local file by its extension into a Dataset of all its columns.

    `header=False`: a csv/tsv file without a header row, whose columns are named by position,
    "0", "1", ... (json and parquet files name their columns themselves).
    """
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"unsupported file extension {suffix or '(none)'!r} for {path}; "
                        f"accepted: {', '.join(sorted(EXTENSIONS))}")
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    kind = EXTENSIONS[suffix]
    if not header and kind not in ("csv", "tsv"):
        raise DataError(f"{path}: only csv and tsv files can be read without a header row")
    # One chunk per file (CSV chunks count rows, JSON chunks bytes; a file has no more rows
    # than bytes): `datasets` infers column types per chunk and fails when a later chunk
    # disagrees (numbers-only sentences after row 10,000, say). Whole-file inference is what a
    # plain pandas.read_csv or json.load gives, so the values are the same as theirs.
    whole = path.stat().st_size + 1
    try:
        if kind == "json":
            return _read_json(path, whole)
        if kind == "parquet":
            return _build(Dataset.from_parquet, path)
        # keep_default_na=False: a sentence such as "NA" or "null" is text, not missing.
        options: dict[str, Any] = {"keep_default_na": False, "chunksize": whole}
        if kind == "tsv":
            options.update(sep="\t", quoting=csv.QUOTE_NONE)
        if not header:
            options["header"] = None  # pandas names the columns 0, 1, ...; `datasets` makes them "0", "1"
        return _build(Dataset.from_csv, path, **options)
    except (DataError, FileNotFoundError):
        raise
    except Exception as err:  # parser errors differ by format; name the file in one line
        cause = err.__cause__ or err  # `datasets` wraps the parser's error in its own
        message = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise DataError(f"cannot read {path}: {message}") from err


def _build(reader: Any, path: Path, **options: Any) -> Dataset:
    """`Dataset.from_csv/json/parquet` of one local file, held in memory, nothing left cached."""
    # A throw-away cache directory: `datasets` keys its cache on the file's path and mtime, and
    # a data file is read once per process anyway; this leaves nothing in ~/.cache to go stale.
    # No "Generating train split" bar per file (the pandas reader this replaces printed nothing).
    bars = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="fedsb-data-") as cache_dir:
            return reader(str(path), cache_dir=cache_dir, keep_in_memory=True, **options)
    except ValueError as err:
        if "corresponds to no data" in str(err):  # `datasets`' words for a file of no rows
            raise DataError(f"{path} holds no examples") from err
        raise
    finally:
        if bars:
            enable_progress_bar()


def _read_json(path: Path, chunksize: int) -> Dataset:
    """JSON Lines, a JSON list of objects, or one JSON object of columns or of one record list."""
    try:
        # `datasets` reads JSON Lines and lists of objects alike, whatever the extension says.
        ds = _build(Dataset.from_json, path, chunksize=chunksize)
    except Exception as err:
        _raise_bad_json_line(path, err)
        raise
    if len(ds) != 1 or not all(isinstance(v, list) for v in ds[0].values()):
        return ds
    # One object read as one row of lists: {"data": [{...}, ...]} or {"text": [...], ...}.
    row = ds[0]
    if len(row) == 1:
        (field, records), = row.items()
        if records and all(isinstance(r, dict) for r in records):
            return _build(Dataset.from_json, path, field=field)  # the library's way to unwrap it
    if len({len(v) for v in row.values()}) != 1:
        raise DataError(f"{path}: expected a list of records or an object of equal-length columns")
    return Dataset.from_dict(row)


def _raise_bad_json_line(path: Path, err: Exception) -> None:
    """Name the first line that is not JSON (the parser's message counts rows, not lines)."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as bad:
                    if number == 1:  # maybe one multi-line JSON document: not a line problem
                        return
                    raise DataError(f"{path}, line {number}: invalid JSON: {bad}") from err


# --------------------------------------------------------------------------------------------
# Labels: missing values, normalisation, names and encoding
# --------------------------------------------------------------------------------------------

def _is_missing(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _normalise_label(value: Any) -> int | str:
    """A raw label as an int (ints, integral floats) or a str (anything else)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)  # ints in a column with gaps are read as floats
    return str(value)


class _Rows(NamedTuple):
    """A source's cleaned columns: texts, second texts (pair tasks; else None) and raw labels."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int | str]


def _is_unlabelled(value: Any, negative: bool) -> bool:
    """A missing, empty or '-' label (SNLI's files), or with `negative` a negative integer (-1)."""
    if _is_missing(value) or (isinstance(value, str) and value.strip() == "-"):
        return True
    label = _normalise_label(value)
    return negative and isinstance(label, int) and label < 0


def column_hint(columns: Sequence[str], header: bool = True) -> str:
    """What to say when a file lacks a named column: a headerless file's first row read as its
    header (names with spaces or over 20 characters, or numbers), or the positions to name."""
    if not header:
        return (f"without a header row (data.header=false) the columns are named by position, "
                f"0..{len(columns) - 1}")
    looks_like_data = any(len(c) > 20 or " " in c.strip() or c.strip().lstrip("-").isdigit() for c in columns)
    if looks_like_data:
        return ("the file seems to have no header row: add one, or set data.header=false and name the "
                "columns by position (data.text_column=0, data.label_column=1)")
    return ""


def _rows(table: Dataset, where: str, text_column: str, label_column: str, text_pair_column: str | None,
          drop_unlabelled: bool, hint: str = "") -> _Rows:
    """The text(s) and raw labels of a table; missing texts are an error, unlabelled rows too unless
    `drop_unlabelled` (then they are dropped, and counted in one logged line). `hint` follows a
    missing column's message."""
    text_columns = [text_column] + ([text_pair_column] if text_pair_column else [])
    check_columns(table.column_names, [*text_columns, label_column], where, hint)
    labels = column(table, label_column)
    texts = {name: column(table, name) for name in text_columns}
    rows: Sequence[int] = range(len(labels))  # each kept row's number in the source
    if drop_unlabelled:
        rows = [i for i, v in enumerate(labels) if not _is_unlabelled(v, negative=True)]
        if len(rows) < len(labels):
            logger.info("dropped %d rows of %s whose label is missing or negative", len(labels) - len(rows),
                        where)
            labels = [labels[i] for i in rows]
            texts = {name: [values[i] for i in rows] for name, values in texts.items()}
        if not rows:
            raise DataError(f"{where} has no labelled rows")
    for name, values in texts.items():
        missing = [i for i, v in enumerate(values) if _is_missing(v)]
        if missing:
            raise DataError(f"column {name!r} in {where} has {len(missing)} missing or empty "
                            f"value(s), first at row {rows[missing[0]]}")
    unlabelled = [i for i, v in enumerate(labels) if _is_unlabelled(v, negative=False)]
    if unlabelled:
        raise DataError(f"column {label_column!r} in {where} has {len(unlabelled)} missing, empty or '-' "
                        f"label(s), first at row {rows[unlabelled[0]]}; set data.drop_unlabelled=true "
                        "to drop such rows")
    pairs = [str(t) for t in texts[text_pair_column]] if text_pair_column else None
    return _Rows([str(t) for t in texts[text_column]], pairs, [_normalise_label(v) for v in labels])


def derive_label_names(labels: Sequence[int | str]) -> list[str]:
    """Label names from raw labels: sorted strings, or sorted integers written as strings.

    Integer labels 0..C-1 keep their values; other integers map to their rank.
    """
    values = set(labels)
    if all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def encode_labels(labels: Sequence[int | str], label_names: Sequence[str], where: str) -> list[int]:
    """Map raw labels to class indices of `label_names`.

    A label maps to the position of its string form in `label_names`; integer labels that
    are not names are taken as indices when all of them fit (e.g. 0/1 with names
    ['negative', 'positive']).
    """
    index = {name: i for i, name in enumerate(label_names)}
    if all(str(v) in index for v in labels):
        return [index[str(v)] for v in labels]
    # Integers as indices only where the names are not integers themselves: with names '1', '2', a
    # label 0 is an unknown label, not the first class.
    numbered = all(name.lstrip("-").isdigit() for name in label_names)
    if all(isinstance(v, int) for v in labels) and not numbered:
        bad = sorted({v for v in labels if not 0 <= v < len(label_names)})
        if not bad:
            return [int(v) for v in labels]
        if any(v < 0 for v in bad):
            raise DataError(_unlabelled(where, bad))
    if any(isinstance(v, int) and v < 0 for v in labels):
        raise DataError(_unlabelled(where, sorted({v for v in labels if isinstance(v, int) and v < 0})))
    unknown = sorted({str(v) for v in labels if str(v) not in index})
    raise UnknownLabelsError(f"{where} has labels {unknown[:10]} that the training data does not have "
                             f"(its labels: {list(label_names)})", where)


def _unlabelled(where: str, negative: Sequence[int]) -> str:
    return (f"{where} has negative labels {list(negative)[:5]}: the split looks unlabelled "
            f"(use a labelled split or file for testing, or set data.drop_unlabelled=true to drop "
            f"such rows)")


# --------------------------------------------------------------------------------------------
# Loaders: a local file, a hub split
# --------------------------------------------------------------------------------------------

def _read_local(path: str | Path, text_column: str, label_column: str, text_pair_column: str | None = None,
                drop_unlabelled: bool = False, header: bool = True) -> _Rows:
    path = Path(path).expanduser()
    table = read_table(path, header)
    return _rows(table, str(path), text_column, label_column, text_pair_column, drop_unlabelled,
                 column_hint(table.column_names, header))


def _dataset(rows: _Rows, names: Sequence[str], where: str) -> Dataset:
    return make_dataset(rows.texts, encode_labels(rows.labels, names, where), names, rows.pairs)


def load_file(path: str | Path, *, text_column: str = TEXT, label_column: str = LABEL,
              label_names: Sequence[str] | None = None, text_pair_column: str | None = None,
              drop_unlabelled: bool = False, header: bool = True) -> tuple[Dataset, list[str]]:
    """Load a local .csv/.tsv/.json/.jsonl/.parquet file as a (text, label) dataset.

    Labels may be strings or integers; without `label_names` they are derived from this file
    (see `derive_label_names`). Pass the train file's names when loading its test file, or
    use `load_task`, which derives them from both. `text_pair_column` adds a `text_pair`
    column (a sentence-pair task); `drop_unlabelled` drops rows without a label (see `_rows`).
    `header=False`: a csv/tsv file without a header row, its columns named "0", "1", ...
    """
    rows = _read_local(path, text_column, label_column, text_pair_column, drop_unlabelled, header)
    names = list(label_names) if label_names is not None else derive_label_names(rows.labels)
    return _dataset(rows, names, str(path)), names


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """'hf:<name>' or 'hf:<name>:<config>' -> (name, config)."""
    body = source[len(HF_PREFIX):] if source.startswith(HF_PREFIX) else source
    name, _, config = body.partition(":")
    if not name:
        raise DataError(f"hub source {source!r} names no dataset; expected 'hf:<name>[:<config>]'")
    return name, config or None


def _read_hf(name: str, config: str | None, split: str, text_column: str, label_column: str,
             text_pair_column: str | None = None, drop_unlabelled: bool = False
             ) -> tuple[_Rows, list[str] | None]:
    import datasets  # imported here so tests can monkeypatch `datasets.load_dataset`

    where = f"hub dataset {name!r}" + (f" (config {config!r})" if config else "") + f" split {split!r}"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except ValueError as err:  # an unknown split is a ValueError naming the available ones
        raise DataError(f"cannot load {where}: {err}") from err
    rows = _rows(ds, where, text_column, label_column, text_pair_column, drop_unlabelled)
    feature = ds.features[label_column]
    if not isinstance(feature, ClassLabel):
        return rows, None
    # ClassLabel values are indices: turn them into their names so that encoding is by name
    # (a label named "1" at index 0 must not be read as index 1).
    negative = sorted({v for v in rows.labels if isinstance(v, int) and v < 0})
    if negative:
        raise DataError(_unlabelled(where, negative))
    names = list(feature.names)
    return rows._replace(labels=[names[int(v)] for v in rows.labels]), names


def load_hf(name: str, *, split: str = "train", config: str | None = None,
            text_column: str = TEXT, label_column: str = LABEL,
            label_names: Sequence[str] | None = None, text_pair_column: str | None = None,
            drop_unlabelled: bool = False) -> tuple[Dataset, list[str]]:
    """Load one split of a Hugging Face hub dataset (`datasets.load_dataset`) as (text, label).

    A `ClassLabel` label column keeps its names; other labels are treated as in `load_file`.
    """
    rows, hub_names = _read_hf(name, config, split, text_column, label_column, text_pair_column,
                               drop_unlabelled)
    names = list(label_names or hub_names or derive_label_names(rows.labels))
    return _dataset(rows, names, f"{name} split {split!r}"), names


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def subsample(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of at most `limit` examples (None: all)."""
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def split_train_test(ds: Dataset, test_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out a seeded, label-stratified fraction of `ds` (plain random if a class is tiny)."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(ds) < 2:
        raise DataError(f"cannot split {len(ds)} example(s) into train and test")
    if isinstance(ds.features.get(LABEL), ClassLabel):
        # datasets' own `train_test_split(stratify_by_column=...)`, step for step, but reading the labels
        # in one slice: datasets 4 reads them row by row there (SST-2's 67,349 rows: 3.95 s against
        # 0.04 s, benchmarks/data_split.py), in every process that loads the data. tests/test_data.py
        # checks that the two split the same.
        n_test = math.ceil(test_fraction * len(ds))
        labels = np.asarray(column(ds, LABEL))
        try:
            train, test = next(stratified_shuffle_split_generate_indices(
                labels, len(ds) - n_test, n_test, rng=np.random.default_rng(seed)))
            return ds.select(train), ds.select(test)
        except ValueError:  # stratification needs >= 2 examples per class
            pass
    parts = ds.train_test_split(test_size=test_fraction, seed=seed)
    return parts["train"], parts["test"]


def _test_seed(seed: int) -> int:
    """An independent stream of the same seed (no clash with another run's training seed)."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def load_task(
    source: str = SYNTHETIC,
    *,
    text_column: str = TEXT,
    label_column: str = LABEL,
    test_file: str | Path | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    num_examples: int | None = None,
    num_test: int | None = None,
    test_fraction: float = 0.2,
    num_classes: int = 4,
    label_noise: float = 0.0,
    label_names: Sequence[str] | None = None,
    seed: int = 0,
    text_pair_column: str | None = None,
    drop_unlabelled: bool = False,
    header: bool = True,
) -> tuple[Dataset, Dataset, list[str]]:
    """Load a task: (train, test, label_names), both datasets with columns `text` and `label`
    (and `text_pair`, the second text of each example, when `text_pair_column` is named).
    (`prompt`, `response` and `label` for the arithmetic task).

    `source` is 'synthetic', a local file path, or 'hf:<name>[:<config>]' (see module doc).

    - arithmetic: `num_examples` training (default 2000) and `num_test` test (default 500)
      instruction examples (columns `prompt`, `response`, `label`); the test set comes from an
      independent stream of the same seed and never shares a prompt with the training set
      (`fedsb.data.arithmetic`). `num_classes` does not apply (the labels are its operations).
    - synthetic: `num_examples` training (default 2000) and `num_test` test (default 500)
      examples with `num_classes` topics; `label_noise` applies to training labels only; the
      test set comes from an independent stream of the same seed.
    - local file: `test_file` is the server's test set; without it a stratified
      `test_fraction` of the file is held out. Label names come from both files.
    - hub: `train_split`, and `test_split` (else a `test_fraction` of the train split).

    `num_examples` / `num_test` cap real datasets by a seeded random subsample (None: all).
    `label_names` fixes the label order (otherwise strings sort, integers keep their order).
    `drop_unlabelled` drops the rows of real datasets that have no label (SNLI's -1 or '-').
    `header=False`: local csv/tsv files (source and test file) have no header row; their columns
    are named by position, "0", "1", ...
    """
    if source == SYNTHETIC:
        if label_names is not None:
            raise DataError("label_names cannot be set for the synthetic task (its names are topics)")
        if text_pair_column is not None:
            raise DataError("text_pair_column cannot be set for the synthetic task (it has one text)")
        n_train = 2000 if num_examples is None else num_examples
        n_test = 500 if num_test is None else num_test
        train = synthetic_dataset(n_train, num_classes, seed, label_noise=label_noise)
        test = synthetic_dataset(n_test, num_classes, _test_seed(seed))
        return train, test, synthetic_label_names(num_classes)

    if source == ARITHMETIC:
        if label_names is not None:
            raise DataError("label_names cannot be set for the arithmetic task (its names are operations)")
        if label_noise:
            raise DataError("label_noise does not apply to the arithmetic task (its labels are not targets)")
        train = arithmetic_dataset(2000 if num_examples is None else num_examples, seed, split="train")
        test = arithmetic_dataset(500 if num_test is None else num_test, _test_seed(seed), split="test")
        return train, test, arithmetic_label_names()

    columns = (text_column, label_column, text_pair_column, drop_unlabelled)
    test_rows: _Rows | None = None
    if source.startswith(HF_PREFIX):
        name, config = parse_hf_source(source)
        rows, hub_names = _read_hf(name, config, train_split, *columns)
        if test_split is not None:
            test_rows = _read_hf(name, config, test_split, *columns)[0]
        train_where, test_where = f"{name} split {train_split!r}", f"{name} split {test_split!r}"
    else:
        path = Path(source).expanduser()
        if not path.suffix and not path.exists():
            raise DataError(f"unknown data source {source!r}: expected {SYNTHETIC!r}, a local file "
                            f"({', '.join(sorted(EXTENSIONS))}) or '{HF_PREFIX}<name>[:<config>]'")
        rows, hub_names = _read_local(path, *columns, header=header), None
        if test_file:
            test_rows = _read_local(test_file, *columns, header=header)
        train_where, test_where = str(path), str(test_file)

    if label_names is not None:
        names = list(label_names)
    elif hub_names is not None:
        names = hub_names
    else:
        names = derive_label_names(rows.labels)  # a test label the training data lacks is an error
    train = _dataset(rows, names, train_where)
    if test_rows is None:
        train, test = split_train_test(train, test_fraction, seed)
    else:
        test = _dataset(test_rows, names, test_where)
    train = subsample(train, num_examples, seed)
    test = subsample(test, num_test, seed)
    logger.info("task %s: %d train / %d test examples, %d classes", source, len(train), len(test),
                len(names))
    return train, test, names


