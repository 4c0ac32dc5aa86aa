"""Sentence-pair tasks (SNLI, MNLI, QNLI, RTE): the pair column, unlabelled rows, pair tokenisation
and one run of the real apps on a generated pair task."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset

from fedsb.data.sources import DataError, load_file, load_hf, load_task
from fedsb.data.tokens import clear_token_cache, iterate_batches, make_dataloader, tokenize
from fedsb.experiment.config import ConfigError, load_config

SNLI_ROWS = [  # (premise, hypothesis, gold label) as in SNLI's files: '-' where annotators disagreed
    ("A man plays a guitar.", "A man plays music.", "entailment"),
    ("A dog runs in the park.", "A cat sleeps.", "contradiction"),
    ("Two kids are at the beach.", "The kids are siblings.", "neutral"),
    ("A woman reads a book.", "Someone is reading.", "-"),
    ("A child eats an apple.", "A child eats fruit.", "entailment"),
]


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_token_cache()
    yield
    clear_token_cache()


def write_tsv(rows: list[tuple], path: Path, header: str = "premise\thypothesis\tlabel") -> Path:
    path.write_text("\n".join([header, *("\t".join(map(str, row)) for row in rows)]) + "\n")
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------- sources

def test_a_pair_file_keeps_both_texts_and_drops_unlabelled_rows_with_a_count(tmp_path, caplog):
    path = write_tsv(SNLI_ROWS, tmp_path / "snli.tsv")
    with caplog.at_level(logging.INFO, logger="fedsb.data.sources"):
        ds, names = load_file(path, text_column="premise", text_pair_column="hypothesis",
                              drop_unlabelled=True)
    assert ds.column_names == ["text", "text_pair", "label"]
    assert names == ["contradiction", "entailment", "neutral"]
    kept = [row for row in SNLI_ROWS if row[2] != "-"]
    assert ds["text"] == [r[0] for r in kept] and ds["text_pair"] == [r[1] for r in kept]
    assert ds["label"] == [names.index(r[2]) for r in kept]
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == [f"dropped 1 rows of {path} whose label is missing or negative"]


def test_unlabelled_rows_are_a_one_line_error_naming_the_key_without_drop_unlabelled(tmp_path):
    path = write_tsv(SNLI_ROWS, tmp_path / "snli.tsv")
    with pytest.raises(DataError) as err:
        load_file(path, text_column="premise", text_pair_column="hypothesis")
    assert one_line(err) == (f"column 'label' in {path} has 1 missing, empty or '-' label(s), first at "
                             "row 3; set data.drop_unlabelled=true to drop such rows")
    empty = tmp_path / "gaps.jsonl"
    empty.write_text("".join(json.dumps({"premise": p, "hypothesis": h, "label": None if i == 1 else i})
                             + "\n" for i, (p, h, _) in enumerate(SNLI_ROWS)))
    with pytest.raises(DataError, match=r"has 1 missing, empty or '-' label\(s\), first at row 1; "
                                        r"set data.drop_unlabelled=true"):
        load_file(empty, text_column="premise", text_pair_column="hypothesis")
    ds, _ = load_file(empty, text_column="premise", text_pair_column="hypothesis", drop_unlabelled=True)
    assert ds["label"] == [0, 1, 2, 3]


def test_negative_integer_labels_are_dropped_and_an_all_unlabelled_file_is_an_error(tmp_path, caplog):
    rows = [(p, h, label) for (p, h, _), label in zip(SNLI_ROWS, [0, -1, 2, 1, -1], strict=True)]
    path = write_tsv(rows, tmp_path / "ints.tsv")
    with caplog.at_level(logging.INFO, logger="fedsb.data.sources"):
        ds, names = load_file(path, text_column="premise", text_pair_column="hypothesis",
                              drop_unlabelled=True)
    assert names == ["0", "1", "2"] and ds["label"] == [0, 2, 1]
    assert f"dropped 2 rows of {path} whose label is missing or negative" in caplog.messages
    none = write_tsv([(p, h, -1) for p, h, _ in SNLI_ROWS], tmp_path / "none.tsv")
    with pytest.raises(DataError, match="has no labelled rows"):
        load_file(none, text_column="premise", text_pair_column="hypothesis", drop_unlabelled=True)


def test_an_unknown_pair_column_is_a_one_line_error_naming_it(tmp_path):
    path = write_tsv(SNLI_ROWS, tmp_path / "snli.tsv")
    with pytest.raises(DataError) as err:
        load_task(str(path), text_column="premise", text_pair_column="hypo", drop_unlabelled=True)
    assert one_line(err) == (f"column 'hypo' not found in {path}; "
                             "available columns: premise, hypothesis, label")
    with pytest.raises(DataError, match="text_pair_column cannot be set for the synthetic task"):
        load_task("synthetic", text_pair_column="hypothesis")


def test_a_pair_task_with_a_test_file_keeps_pairs_in_both_splits(tmp_path):
    train = write_tsv(SNLI_ROWS * 4, tmp_path / "train.tsv")
    test = write_tsv(SNLI_ROWS, tmp_path / "test.tsv")
    tr, te, names = load_task(str(train), test_file=test, text_column="premise",
                              text_pair_column="hypothesis", drop_unlabelled=True)
    assert (len(tr), len(te)) == (16, 4) and names == ["contradiction", "entailment", "neutral"]
    assert tr.column_names == te.column_names == ["text", "text_pair", "label"]
    assert set(zip(te["text"], te["text_pair"], strict=True)) == {(p, h) for p, h, g in SNLI_ROWS if g != "-"}


def test_hub_pairs_drop_the_minus_one_class_label(monkeypatch, caplog):
    import datasets

    snli = Dataset.from_dict({"premise": [r[0] for r in SNLI_ROWS], "hypothesis": [r[1] for r in SNLI_ROWS],
                               "label": [0, 2, 1, -1, 0]}).cast_column(
        "label", ClassLabel(names=["entailment", "neutral", "contradiction"]))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, *, split: snli)
    with pytest.raises(DataError, match=r"negative labels \[-1\].*set data.drop_unlabelled=true"):
        load_hf("stanfordnlp/snli", text_column="premise", text_pair_column="hypothesis")
    with caplog.at_level(logging.INFO, logger="fedsb.data.sources"):
        ds, names = load_hf("stanfordnlp/snli", text_column="premise", text_pair_column="hypothesis",
                            drop_unlabelled=True)
    assert names == ["entailment", "neutral", "contradiction"] and ds["label"] == [0, 2, 1, 0]
    assert ds["text_pair"] == [r[1] for i, r in enumerate(SNLI_ROWS) if i != 3]
    assert ("dropped 1 rows of hub dataset 'stanfordnlp/snli' split 'train' whose label is missing or "
            "negative") in caplog.messages


# ------------------------------------------------------------------------- config

def test_the_pair_column_and_drop_unlabelled_keys_validate(tmp_path):
    path = write_tsv(SNLI_ROWS, tmp_path / "snli.tsv")
    config = load_config(None, {"data.source": str(path), "data.text_column": "premise",
                                "data.text_pair_column": "hypothesis", "data.drop_unlabelled": True})
    assert (config.data.text_pair_column, config.data.drop_unlabelled) == ("hypothesis", True)
    assert load_config(None).data.text_pair_column is None and not load_config(None).data.drop_unlabelled
    for overrides in ({"data.text_pair_column": "hypothesis"},  # the synthetic task has one text
                      {"data.source": str(path), "data.text_column": "premise",
                       "data.text_pair_column": "premise"}):
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        assert one_line(err).startswith(f"data.text_pair_column: got {overrides['data.text_pair_column']!r}")
    with pytest.raises(ConfigError, match="data.drop_unlabelled"):
        load_config(None, {"data.drop_unlabelled": "sometimes"})


# ------------------------------------------------------------------------- tokens

def test_pairs_are_encoded_as_pairs_with_segment_ids(tokenizer):
    ds = Dataset.from_dict({"text": ["a man plays a guitar", "a dog"],
                            "text_pair": ["he plays music", "a cat"], "label": [0, 1]})
    out = tokenize(ds, tokenizer, 32, text_pair_column="text_pair")
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert out["token_type_ids"].shape == (2, 32) and out["token_type_ids"].dtype == torch.int64
    for row, (a, b) in enumerate(zip(ds["text"], ds["text_pair"], strict=True)):
        first = tokenizer(a, add_special_tokens=False)["input_ids"]
        second = tokenizer(b, add_special_tokens=False)["input_ids"]
        ids, types = out["input_ids"][row].tolist(), out["token_type_ids"][row].tolist()
        sep, length = 1 + len(first), 3 + len(first) + len(second)  # [CLS] a [SEP] b [SEP]
        assert ids[:length] == [tokenizer.cls_token_id, *first, tokenizer.sep_token_id, *second,
                                tokenizer.sep_token_id]
        assert types[:sep + 1] == [0] * (sep + 1) and types[sep + 1:length] == [1] * (length - sep - 1)
        assert types[length:] == [0] * (32 - length) and out["attention_mask"][row].sum() == length
    # One text alone is encoded as before (no segment ids), and cached apart from the pairs.
    single = tokenize(ds, tokenizer, 32)
    assert set(single) == {"input_ids", "attention_mask", "labels"}
    assert single["input_ids"][0, 1 + len(tokenizer("a man plays a guitar", add_special_tokens=False)
                                           ["input_ids"])] == tokenizer.sep_token_id
    assert tokenize(ds, tokenizer, 32, text_pair_column="text_pair") is out
    with pytest.raises(DataError, match="column 'hypothesis' not found in the dataset"):
        tokenize(ds, tokenizer, 32, text_pair_column="hypothesis")


def test_batches_carry_segment_ids_and_trimming_keeps_the_outputs():
    from fedsb.core.models import load_model, load_tokenizer

    model = load_model("tiny-bert", task="classification", num_labels=2, seed=0).eval()
    ds = Dataset.from_dict({"text": ["good", "a rather long and winding sentence", "bad film"],
                            "text_pair": ["fine", "short", "a film that is long"], "label": [1, 0, 0]})
    tokens = tokenize(ds, load_tokenizer("tiny-bert"), max_length=40, text_pair_column="text_pair",
                      cache=False)
    (trimmed,) = list(iterate_batches(tokens, 8, shuffle=False))
    width = int(tokens["attention_mask"].sum(1).max())
    assert trimmed["token_type_ids"].shape == trimmed["input_ids"].shape == (3, width) and width < 40
    assert torch.equal(trimmed["token_type_ids"], tokens["token_type_ids"][:, :width])
    assert (trimmed["token_type_ids"] == 1).any()
    with torch.no_grad():
        full, cut = model(**tokens), model(**trimmed)
        no_types = model(**{k: v for k, v in tokens.items() if k != "token_type_ids"})
    assert torch.allclose(full.logits, cut.logits, atol=1e-5)
    assert not torch.allclose(full.logits, no_types.logits, atol=1e-5)  # the segment ids are used
    batch = next(iter(make_dataloader(tokens, 2, seed=0)))
    assert set(batch) == set(tokens) and batch["token_type_ids"].shape == (2, 40)


# ------------------------------------------------------------------------- one run of the real apps

WORDS = ("red blue green small large old new quick slow happy sad bright dark warm cold soft loud calm "
         "tall short").split()


def pair_task(path: Path, rows: int = 200, seed: int = 0) -> Path:
    """Label 'yes' when the hypothesis repeats a word of the premise, else 'no' (plus a few '-' rows)."""
    rng = random.Random(seed)
    lines = ["premise\thypothesis\tlabel"]
    for i in range(rows):
        premise = rng.sample(WORDS, 4)
        if i % 2:
            hypothesis = [rng.choice(premise), *rng.sample([w for w in WORDS if w not in premise], 2)]
        else:
            hypothesis = rng.sample([w for w in WORDS if w not in premise], 3)
        rng.shuffle(hypothesis)
        label = "-" if i % 50 == 7 else ("yes" if i % 2 else "no")
        lines.append(f"{' '.join(premise)}\t{' '.join(hypothesis)}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_pair_task_runs_through_the_real_apps(tmp_path):
    from fedsb.experiment.run_config import from_run_config
    from fedsb.experiment.worker import get_worker
    from fedsb.federation.inprocess import run_in_process
    from server.app import APP_DIR

    source = pair_task(tmp_path / "pairs.tsv")
    overrides = (f"data.source={source}; data.text_column=premise; data.text_pair_column=hypothesis; "
                 "data.drop_unlabelled=true")
    run_config = {"config": "tests/configs/tiny.yaml", "run-dir": str(tmp_path / "run"),
                  "overrides": overrides}
    run_in_process(run_config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert isinstance(summary["test_accuracy"], float) and math.isfinite(summary["test_accuracy"])
    worker = get_worker(from_run_config(run_config, APP_DIR))  # the run's worker (one per process)
    assert worker.data.label_names == ["no", "yes"]
    assert sum(map(len, worker.data.partitions)) + len(worker.data.server) + len(worker.data.validation) \
        + len(worker.data.test) == 196  # 4 '-' rows dropped
    tokens = worker.client_tokens(0)
    assert (tokens["token_type_ids"] == 1).any()
