"""Datasets: the embedded synthetic task, local files, Hugging Face hub; partitions; tokenisation.

Every loader returns `datasets.Dataset`s with exactly two columns, `text` (str) and `label`
(a `ClassLabel` whose names are the task's label names), whatever the source's column
names were. Everything downstream (partitioning, tokenisation, training) can rely on that.

Data sources for `load_task` (the one entry point):

- ``"synthetic"`` (default): a topic-classification task generated here from the seed, so the
  simulator runs with no download (see `synthetic_dataset`).
- a local file path ending in .csv, .tsv, .json, .jsonl or .parquet; a separate test file is
  optional (without one, a stratified `test_fraction` of the file is held out).
- ``"hf:<name>"`` or ``"hf:<name>:<config>"``: a Hugging Face hub dataset (needs the internet
  or a warm cache), e.g. ``"hf:stanfordnlp/sst2"`` or ``"hf:nyu-mll/glue:sst2"``.

The test split is the server's: it is used for centralised evaluation and never partitioned.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import ClassLabel, Dataset, Features, Value

logger = logging.getLogger(__name__)

TEXT = "text"
LABEL = "label"
SYNTHETIC = "synthetic"
HF_PREFIX = "hf:"
SCHEMES = ("iid", "dirichlet", "classes")
# Extension -> reader kind. .tsv is read without quote handling (GLUE-style files contain
# unbalanced quotes in sentences that a CSV quote parser would swallow).
EXTENSIONS: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
                              ".parquet": "parquet"}


class DataError(ValueError):
    """A data source that cannot be used as given (bad column, label, extension, split...)."""


# --------------------------------------------------------------------------------------------
# The embedded synthetic task
# --------------------------------------------------------------------------------------------

# Topic -> (nouns, past-tense verb phrases, adjectives). Only these words carry the label.
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "sports": (
        ("striker", "goalkeeper", "referee", "stadium", "league", "tournament", "marathon",
         "playoff game", "penalty kick", "relay team", "tennis match", "championship",
         "locker room", "scoreboard"),
        ("coached", "defeated", "tackled", "cheered for", "scored against", "raced", "outplayed",
         "trained with"),
        ("undefeated", "athletic", "competitive", "olympic", "defensive", "sporty"),
    ),
    "science": (
        ("telescope", "molecule", "laboratory", "experiment", "hypothesis", "microscope",
         "particle", "genome", "fossil", "chemical reaction", "satellite data", "neutron star",
         "research paper", "physics lecture"),
        ("measured", "analysed", "observed", "simulated", "tested", "calibrated", "sequenced",
         "published"),
        ("experimental", "molecular", "scientific", "quantum", "genetic", "theoretical"),
    ),
    "business": (
        ("quarterly profit", "stock market", "startup", "merger", "investor", "shareholder",
         "budget", "invoice", "revenue", "bank loan", "supply chain", "balance sheet",
         "retail chain", "pension fund"),
        ("invested in", "acquired", "audited", "financed", "negotiated", "sold", "merged with",
         "valued"),
        ("profitable", "corporate", "financial", "bankrupt", "lucrative", "commercial"),
    ),
    "food": (
        ("soup", "recipe", "bakery", "omelette", "pasta", "spice blend", "chocolate cake",
         "kitchen", "sourdough bread", "curry", "salad", "dessert", "barbecue", "fresh herbs"),
        ("cooked", "baked", "tasted", "seasoned", "grilled", "served", "roasted", "simmered"),
        ("delicious", "spicy", "crispy", "savory", "homemade", "sweet"),
    ),
    "music": (
        ("guitar", "orchestra", "album", "melody", "concert", "choir", "drum kit", "symphony",
         "lyrics", "piano", "jazz band", "playlist", "chorus", "violin"),
        ("played", "composed", "recorded", "rehearsed", "sang", "tuned", "performed", "remixed"),
        ("acoustic", "melodic", "classical", "upbeat", "orchestral", "rhythmic"),
    ),
    "travel": (
        ("airport", "passport", "hotel", "beach resort", "train station", "museum", "island",
         "cruise ship", "mountain trail", "luggage", "itinerary", "old town", "ferry", "hostel"),
        ("visited", "toured", "booked", "explored", "flew to", "hiked", "sailed to",
         "photographed"),
        ("scenic", "tropical", "remote", "coastal", "overseas", "historic"),
    ),
    "health": (
        ("clinic", "patient", "nurse", "fever", "vaccine", "surgery", "hospital ward",
         "blood pressure", "prescription", "therapy", "flu symptoms", "pharmacy", "x-ray",
         "doctor"),
        ("treated", "vaccinated", "diagnosed", "examined", "prescribed", "nursed", "operated on",
         "screened"),
        ("medical", "chronic", "clinical", "healthy", "contagious", "surgical"),
    ),
    "politics": (
        ("parliament", "senator", "election", "ballot", "campaign", "minister", "policy",
         "coalition", "referendum", "governor", "city council", "tax bill", "voters", "embassy"),
        ("elected", "debated", "vetoed", "campaigned for", "voted on", "lobbied", "governed",
         "impeached"),
        ("political", "electoral", "partisan", "legislative", "democratic", "diplomatic"),
    ),
}
MAX_SYNTHETIC_CLASSES = len(TOPICS)

# Shared by every topic, so they carry no label information on their own.
_SUBJECTS = ("my neighbour", "the reporter", "a local family", "the students", "a friend of mine",
             "the new manager", "two volunteers", "the committee", "a young woman", "an old man",
             "the visitors", "everyone", "my sister", "the whole town")
_TIMES = ("on sunday", "last week", "this morning", "after lunch", "in the city",
          "before the holidays", "yesterday", "at the weekend", "in the spring", "late at night",
          "for the first time", "once again")
_OPENERS = ("apparently", "according to the news", "to everyone's surprise", "as expected",
            "surprisingly", "honestly", "in the end", "believe it or not")
# Words that sound topical but appear in every class: they make single words unreliable.
_AMBIGUOUS = ("record", "report", "results", "season", "team", "schedule", "plan", "crowd",
              "event", "announcement", "review", "star", "show", "deal", "training", "club")

# Slots: {s} subject, {t} time, {o} opener, {n}/{m} topic nouns, {v} topic verb, {a} topic
# adjective, {x} an ambiguous shared noun, {d} a noun from ANOTHER topic (a distractor).
# Every template has at least two topic slots and at most one distractor.
_TEMPLATES = (
    "{s} {v} the {a} {n} {t}",
    "{o}, {s} {v} the {n} and the {x}",
    "{s} said the {x} about the {n} was {a}",
    "{t}, {s} {v} a {a} {n} near the {d}",
    "nobody expected the {n} to be so {a}",
    "{s} wrote a {x} on the {a} {n} {t}",
    "{o}, the {a} {n} drew a big crowd {t}",
    "{s} {v} the {n} while talking about the {d}",
    "is the {n} really {a}? {s} is not so sure",
    "the {x} mentioned the {n} and the {m}",
    "{s} {v} the {n} but kept thinking about the {d}",
    "{o}, the {n} and the {m} made the {x} worth it",
    "{s} {v} the {m} {t}",
    "{t}, the {d} was forgotten once {s} {v} the {n}",
)


def synthetic_label_names(num_classes: int = 4) -> list[str]:
    """The topic names of the synthetic task with `num_classes` classes (a prefix of TOPICS)."""
    if not 2 <= num_classes <= MAX_SYNTHETIC_CLASSES:
        raise DataError(f"synthetic task: num_classes must be in 2..{MAX_SYNTHETIC_CLASSES}, "
                        f"got {num_classes}")
    return list(TOPICS)[:num_classes]


def _sentence(rng: np.random.Generator, topic: str, others: Sequence[str]) -> str:
    nouns, verbs, adjectives = TOPICS[topic]

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    template = pick(_TEMPLATES)
    noun = pick(nouns)
    second = pick([w for w in nouns if w != noun])
    # The distractor comes from one of the other topics *in this task*, so it is misleading.
    distractor = pick(TOPICS[pick(others)][0]) if others else pick(_AMBIGUOUS)
    return template.format(s=pick(_SUBJECTS), t=pick(_TIMES), o=pick(_OPENERS), n=noun, m=second,
                           v=pick(verbs), a=pick(adjectives), x=pick(_AMBIGUOUS), d=distractor)


def synthetic_dataset(num_examples: int, num_classes: int = 4, seed: int = 0, *,
                      label_noise: float = 0.0) -> Dataset:
    """A deterministic topic-classification dataset: short English sentences, balanced labels.

    Each sentence comes from one of a dozen templates filled with shared function words,
    shared subjects/times, words that appear in every class, at least two words of its own
    topic and sometimes one distractor noun of another topic. Labels are balanced to within
    one example. With `label_noise` p, a fraction p of the labels is replaced by a different
    class (so a perfect classifier scores 1 - p). Only a local generator seeded by `seed` is
    used; global random state is untouched.
    """
    if num_examples < 0:
        raise DataError(f"synthetic task: num_examples must be >= 0, got {num_examples}")
    if not 0.0 <= label_noise < 1.0:
        raise DataError(f"synthetic task: label_noise must be in [0, 1), got {label_noise}")
    names = synthetic_label_names(num_classes)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % num_classes)
    texts = [_sentence(rng, names[y], [t for t in names if t != names[y]]) for y in labels]
    if label_noise > 0:
        flip = rng.random(num_examples) < label_noise
        # Adding 1..C-1 modulo C always lands on a different class.
        shift = rng.integers(1, num_classes, size=num_examples)
        labels = np.where(flip, (labels + shift) % num_classes, labels)
    return _make_dataset(texts, labels.tolist(), names)


# --------------------------------------------------------------------------------------------
# Local files and the Hugging Face hub
# --------------------------------------------------------------------------------------------

def _column(ds: Dataset, name: str) -> list:
    # `ds[name]` is a lazy Column in datasets 4; slicing it reads the whole column at once (fast).
    values = ds[name][:]
    return values if isinstance(values, list) else list(values)


def _make_dataset(texts: list[str], labels: list[int], label_names: Sequence[str]) -> Dataset:
    features = Features({TEXT: Value("string"), LABEL: ClassLabel(names=list(label_names))})
    return Dataset.from_dict({TEXT: texts, LABEL: labels}, features=features)


def _read_table(path: Path) -> pd.DataFrame:
    """Read a local file into a DataFrame by its extension (no type guessing for text)."""
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"unsupported file extension {suffix or '(none)'!r} for {path}; "
                        f"accepted: {', '.join(sorted(EXTENSIONS))}")
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    kind = EXTENSIONS[suffix]
    try:
        if kind in ("csv", "tsv"):
            # keep_default_na=False: a sentence such as "NA" or "null" is text, not missing.
            options: dict[str, Any] = {"keep_default_na": False}
            if kind == "tsv":
                options.update(sep="\t", quoting=3)  # csv.QUOTE_NONE
            return pd.read_csv(path, **options)
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.DataFrame.from_records(_read_json_records(path, lines=kind == "jsonl"))
    except (DataError, FileNotFoundError):
        raise
    except Exception as err:  # parser errors differ by format; name the file in one line
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from err


def _read_json_records(path: Path, lines: bool) -> list[dict]:
    """Records from JSON Lines, a JSON list of objects, or a JSON object of columns/records."""
    text = path.read_text(encoding="utf-8")
    if not lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if "Extra data" not in str(err):
                raise
            lines = True  # a .json file holding JSON Lines, as `datasets` also accepts
        else:
            if isinstance(data, list):
                return data
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
                    return lists[0]  # {"data": [{...}, ...]}
                if lists and len(lists) == len(data):
                    return pd.DataFrame(data).to_dict("records")  # {"text": [...], ...}
            raise DataError(f"{path}: expected a list of records or an object of columns")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: invalid JSON: {err}") from err
    return records


def _check_columns(available: Sequence[str], wanted: Sequence[str], where: str) -> None:
    for column in wanted:
        if column not in available:
            raise DataError(f"column {column!r} not found in {where}; "
                            f"available columns: {', '.join(map(str, available)) or '(none)'}")


def _is_missing(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))  # None, NaN, pd.NA, NaT
    except (TypeError, ValueError):  # list-like values are not "missing"
        return False


def _normalise_label(value: Any) -> int | str:
    """A raw label as an int (ints, integral floats) or a str (anything else)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)  # ints in a column with gaps are read as floats
    return str(value)


def _clean_columns(texts: list, labels: list, where: str, text_column: str, label_column: str
                   ) -> tuple[list[str], list[int | str]]:
    for name, values in ((text_column, texts), (label_column, labels)):
        missing = [i for i, v in enumerate(values) if _is_missing(v)]
        if missing:
            raise DataError(f"column {name!r} in {where} has {len(missing)} missing or empty "
                            f"value(s), first at row {missing[0]}")
    return [str(t) for t in texts], [_normalise_label(v) for v in labels]


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
    if all(isinstance(v, int) for v in labels):
        bad = sorted({v for v in labels if not 0 <= v < len(label_names)})
        if not bad:
            return [int(v) for v in labels]
        if any(v < 0 for v in bad):
            raise DataError(_unlabelled(where, bad))
    unknown = sorted({str(v) for v in labels if str(v) not in index})
    raise DataError(f"{where} has labels {unknown[:10]} not among the label names "
                    f"{list(label_names)}")


def _unlabelled(where: str, negative: Sequence[int]) -> str:
    return (f"{where} has negative labels {list(negative)[:5]}: the split looks unlabelled "
            f"(use a labelled split or file for testing)")


def _read_local(path: str | Path, text_column: str, label_column: str
                ) -> tuple[list[str], list[int | str]]:
    path = Path(path).expanduser()
    frame = _read_table(path)
    _check_columns(list(frame.columns), [text_column, label_column], str(path))
    return _clean_columns(frame[text_column].tolist(), frame[label_column].tolist(), str(path),
                          text_column, label_column)


def load_file(path: str | Path, *, text_column: str = TEXT, label_column: str = LABEL,
              label_names: Sequence[str] | None = None) -> tuple[Dataset, list[str]]:
    """Load a local .csv/.tsv/.json/.jsonl/.parquet file as a (text, label) dataset.

    Labels may be strings or integers; without `label_names` they are derived from this file
    (see `derive_label_names`). Pass the train file's names when loading its test file, or
    use `load_task`, which derives them from both.
    """
    texts, raw = _read_local(path, text_column, label_column)
    names = list(label_names) if label_names is not None else derive_label_names(raw)
    return _make_dataset(texts, encode_labels(raw, names, str(path)), names), names


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """'hf:<name>' or 'hf:<name>:<config>' -> (name, config)."""
    body = source[len(HF_PREFIX):] if source.startswith(HF_PREFIX) else source
    name, _, config = body.partition(":")
    if not name:
        raise DataError(f"hub source {source!r} names no dataset; expected 'hf:<name>[:<config>]'")
    return name, config or None


def _read_hf(name: str, config: str | None, split: str, text_column: str, label_column: str
             ) -> tuple[list[str], list[int | str], list[str] | None]:
    import datasets  # imported here so tests can monkeypatch `datasets.load_dataset`

    where = f"hub dataset {name!r}" + (f" (config {config!r})" if config else "") + f" split {split!r}"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except ValueError as err:  # an unknown split is a ValueError naming the available ones
        raise DataError(f"cannot load {where}: {err}") from err
    _check_columns(list(ds.column_names), [text_column, label_column], where)
    texts, labels = _clean_columns(_column(ds, text_column), _column(ds, label_column), where,
                                   text_column, label_column)
    feature = ds.features[label_column]
    if not isinstance(feature, ClassLabel):
        return texts, labels, None
    # ClassLabel values are indices: turn them into their names so that encoding is by name
    # (a label named "1" at index 0 must not be read as index 1).
    negative = sorted({v for v in labels if isinstance(v, int) and v < 0})
    if negative:
        raise DataError(_unlabelled(where, negative))
    names = list(feature.names)
    return texts, [names[int(v)] for v in labels], names


def load_hf(name: str, *, split: str = "train", config: str | None = None,
            text_column: str = TEXT, label_column: str = LABEL,
            label_names: Sequence[str] | None = None) -> tuple[Dataset, list[str]]:
    """Load one split of a Hugging Face hub dataset (`datasets.load_dataset`) as (text, label).

    A `ClassLabel` label column keeps its names; other labels are treated as in `load_file`.
    """
    texts, raw, hub_names = _read_hf(name, config, split, text_column, label_column)
    names = list(label_names or hub_names or derive_label_names(raw))
    return _make_dataset(texts, encode_labels(raw, names, f"{name} split {split!r}"), names), names


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
    try:
        parts = ds.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column=LABEL)
    except ValueError:  # stratification needs >= 2 examples per class
        parts = ds.train_test_split(test_size=test_fraction, seed=seed)
    return parts["train"], parts["test"]


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
) -> tuple[Dataset, Dataset, list[str]]:
    """Load a task: (train, test, label_names), both datasets with columns `text` and `label`.

    `source` is 'synthetic', a local file path, or 'hf:<name>[:<config>]' (see module doc).

    - synthetic: `num_examples` training (default 2000) and `num_test` test (default 500)
      examples with `num_classes` topics; `label_noise` applies to training labels only; the
      test set comes from an independent stream of the same seed.
    - local file: `test_file` is the server's test set; without it a stratified
      `test_fraction` of the file is held out. Label names come from both files.
    - hub: `train_split`, and `test_split` (else a `test_fraction` of the train split).

    `num_examples` / `num_test` cap real datasets by a seeded random subsample (None: all).
    `label_names` fixes the label order (otherwise strings sort, integers keep their order).
    """
    if source == SYNTHETIC:
        if label_names is not None:
            raise DataError("label_names cannot be set for the synthetic task (its names are topics)")
        n_train = 2000 if num_examples is None else num_examples
        n_test = 500 if num_test is None else num_test
        train = synthetic_dataset(n_train, num_classes, seed, label_noise=label_noise)
        # An independent stream of the same seed (no clash with another run's training seed).
        test_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
        test = synthetic_dataset(n_test, num_classes, test_seed)
        return train, test, synthetic_label_names(num_classes)

    if source.startswith(HF_PREFIX):
        name, config = parse_hf_source(source)
        texts, raw, hub_names = _read_hf(name, config, train_split, text_column, label_column)
        test_raw = (_read_hf(name, config, test_split, text_column, label_column)
                    if test_split is not None else None)
        train_where, test_where = f"{name} split {train_split!r}", f"{name} split {test_split!r}"
    else:
        path = Path(source).expanduser()
        if not path.suffix and not path.exists():
            raise DataError(f"unknown data source {source!r}: expected {SYNTHETIC!r}, a local file "
                            f"({', '.join(sorted(EXTENSIONS))}) or '{HF_PREFIX}<name>[:<config>]'")
        texts, raw = _read_local(path, text_column, label_column)
        hub_names = None
        test_raw = (*_read_local(test_file, text_column, label_column), None) if test_file else None
        train_where, test_where = str(path), str(test_file)

    if label_names is not None:
        names = list(label_names)
    elif hub_names is not None:
        names = hub_names
    else:
        names = derive_label_names(raw + (test_raw[1] if test_raw else []))
    train = _make_dataset(texts, encode_labels(raw, names, train_where), names)
    if test_raw is None:
        train, test = split_train_test(train, test_fraction, seed)
    else:
        test = _make_dataset(test_raw[0], encode_labels(test_raw[1], names, test_where), names)
    train = subsample(train, num_examples, seed)
    test = subsample(test, num_test, seed)
    logger.info("task %s: %d train / %d test examples, %d classes", source, len(train), len(test),
                len(names))
    return train, test, names


# --------------------------------------------------------------------------------------------
# Partitioning (flwr-datasets partitioners on an in-memory dataset)
# --------------------------------------------------------------------------------------------

def partition_dataset(
    ds: Dataset,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 1,
    seed: int = 0,
    label_column: str = LABEL,
) -> list[Dataset]:
    """Split `ds` into `num_partitions` non-empty client datasets, deterministically from `seed`.

    Schemes: 'iid' (seeded shuffle, then equal contiguous shards), 'dirichlet' (per-class
    Dirichlet(alpha) proportions; smaller alpha = more label skew), 'classes' (each client
    holds exactly `classes_per_client` classes, the first one round-robin so every class is
    used when there are at least as many clients as classes). 'dirichlet' uses flwr-datasets'
    self-balancing (a client above the average size gets no more classes), and every client
    gets at least `min_partition_size` examples (default 1: non-empty; flwr-datasets' own
    default is 10): the Dirichlet draw is repeated (about 100 times at most, seeded), then a
    DataError says it is impossible. Redrawing favours less extreme draws, so a large
    minimum makes small alphas less skewed than they look.
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; accepted: {', '.join(SCHEMES)}")
    if not 1 <= num_partitions <= len(ds):
        raise DataError(f"cannot split {len(ds)} examples into {num_partitions} non-empty partitions")
    _check_columns(ds.column_names, [label_column], "the dataset")
    labels = np.asarray(_column(ds, label_column), dtype=np.int64)
    num_classes = len(np.unique(labels))

    if scheme == "iid":
        partitioner: Any = IidPartitioner(num_partitions)
        partitioner.dataset = ds.shuffle(seed=seed)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        if not 1 <= min_partition_size <= len(ds) // num_partitions:
            raise DataError(f"min_partition_size must be in 1..{len(ds) // num_partitions} "
                            f"({len(ds)} examples, {num_partitions} clients), got {min_partition_size}")
        # Retries with derived seeds (still deterministic): flwr-datasets gives up after 10
        # draws, which strongly skewed settings (alpha 0.1, many clients) can exhaust.
        for attempt in range(10):
            partitioner = DirichletPartitioner(
                num_partitions, partition_by=label_column, alpha=alpha,
                min_partition_size=min_partition_size, self_balancing=True, shuffle=True,
                seed=seed if attempt == 0 else int(np.random.SeedSequence([seed, attempt])
                                                   .generate_state(1)[0]),
            )
            partitioner.dataset = ds
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # flwr warns on every failed draw
                    partitioner.load_partition(0)
                break
            except ValueError:
                continue
        else:
            raise DataError(
                f"dirichlet partitioning (alpha={alpha}) could not give each of {num_partitions} "
                f"clients at least {min_partition_size} of {len(ds)} examples ({num_classes} classes); "
                f"use fewer clients, a larger alpha, more data or a smaller min_partition_size"
            )
    else:
        if not 1 <= classes_per_client <= num_classes:
            raise DataError(f"classes_per_client must be in 1..{num_classes} (the dataset's "
                            f"classes), got {classes_per_client}")
        counts = np.bincount(labels)
        partitioner = PathologicalPartitioner(
            num_partitions, partition_by=label_column, num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic", shuffle=True, seed=seed,
        )
        partitioner.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "classes will NOT be used" when P < C
                partitioner.load_partition(0)
        except ValueError as err:
            raise DataError(f"'classes' partitioning of {len(ds)} examples (class counts "
                            f"{counts.tolist()}) into {num_partitions} clients with "
                            f"{classes_per_client} classes each is impossible: {err}") from err

    parts = [partitioner.load_partition(i) for i in range(num_partitions)]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:  # defensive: every scheme above should prevent this
        raise DataError(f"partitions {empty} are empty; use fewer clients or more data")
    return parts


def partition_stats(partitions: Sequence[Dataset], num_classes: int, label_column: str = LABEL
                    ) -> list[list[int]]:
    """Label counts per partition: stats[client][class]."""
    return [np.bincount(np.asarray(_column(p, label_column), dtype=np.int64), minlength=num_classes)
            .tolist() for p in partitions]


def format_partition_stats(stats: Sequence[Sequence[int]], label_names: Sequence[str]) -> str:
    """A small text table of `partition_stats` for logs and reports."""
    width = max([len(n) for n in label_names] + [6])
    head = "client " + " ".join(f"{n:>{width}}" for n in label_names) + f" {'total':>{width}}"
    rows = [f"{i:>6} " + " ".join(f"{c:>{width}}" for c in row) + f" {sum(row):>{width}}"
            for i, row in enumerate(stats)]
    return "\n".join([head, *rows])


# --------------------------------------------------------------------------------------------
# Tokenisation, its per-process cache, and batches
# --------------------------------------------------------------------------------------------

TokenData = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (N, L), (N, L), (N,)

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
             label_column: str = LABEL, cache: bool = True) -> TokenData:
    """Tokenise a (text, label) dataset into padded int64 tensors that stack into batches.

    Returns {'input_ids': (N, max_length), 'attention_mask': (N, max_length), 'labels': (N,)}.
    Texts are truncated to `max_length`. With `cache`, results are kept per process, keyed by
    (dataset fingerprint, tokenizer, max_length, columns), so a worker tokenises each partition
    once; the returned tensors are shared between callers and must not be modified in place.
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    key = (_dataset_key(ds), _tokenizer_key(tokenizer), max_length, text_column, label_column)
    if cache and key in _token_cache:
        _token_cache.move_to_end(key)
        return _token_cache[key]
    _check_columns(ds.column_names, [text_column, label_column], "the dataset")
    encoded = tokenizer(_column(ds, text_column), padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
    data: TokenData = {
        "input_ids": encoded["input_ids"].long(),
        "attention_mask": encoded["attention_mask"].long(),
        "labels": torch.as_tensor(np.asarray(_column(ds, label_column), dtype=np.int64)),
    }
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
