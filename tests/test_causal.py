"""Causal-LM instruction tuning through the real apps (in-process grid): every method, DP, the
instruction file formats, and, on the shipped offline config, an exact match that rises."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedsb.core.adapters import HEAD, component_of
from fedsb.data.instructions import load_instructions
from fedsb.data.schema import DataError
from fedsb.experiment.config import ConfigError, load_config
from fedsb.experiment.summary import RunSummary, read_metrics
from fedsb.experiment.worker import get_worker
from fedsb.federation.inprocess import run_in_process
from fedsb.methods import method_names

TINY = "tests/configs/tiny_causal.yaml"


@pytest.mark.parametrize("method", method_names())
def test_every_method_fine_tunes_a_causal_lm_and_reports_exact_match(tmp_path, method):
    _, run = run_in_process({"config": TINY, "run-dir": str(tmp_path), "method": method})
    summary = RunSummary.read(tmp_path)
    assert summary.accuracy_metric == "exact match (greedy generation, gsm8k answers)"
    assert summary.rounds_completed == 2 and 0.0 <= summary.test_accuracy <= 1.0
    rows = read_metrics(tmp_path)
    assert all(r.val_perplexity == pytest.approx(math.exp(r.val_loss), rel=1e-6) for r in rows)
    assert rows[-1].accepted == [0, 1, 2, 3]
    # The clients trained what the method trains: every uploaded adapter tensor moved from the init.
    strategy = run.strategy
    initial = get_worker(load_config(TINY, {"method.name": method})).initial_state()
    uploaded = [k for k in strategy.method.upload(strategy.global_state) if component_of(k) != HEAD]
    assert uploaded and all(not torch.equal(strategy.global_state[k], initial[k]) for k in uploaded)


@pytest.mark.slow
def test_a_causal_lm_trains_privately(tmp_path):
    run_in_process({"config": TINY, "run-dir": str(tmp_path), "method": "ffa", "privacy-epsilon": 8})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["privacy"]["status"] == "private" and 0 < summary["privacy"]["epsilon_max"] <= 8
    assert read_metrics(tmp_path)[-1].train_loss is None  # DP releases no loss


def test_prompt_tokens_are_masked_and_generation_sees_the_same_prompt():
    worker = get_worker(load_config(TINY))
    data = worker.tokens(worker.data.validation)
    labels, ids = data["labels"], data["input_ids"]
    scored = labels != -100
    assert scored.any(1).all()  # every row scores its response
    assert torch.equal(labels[scored], ids[scored])  # and scores the response's own tokens
    first_scored = scored.int().argmax(1)
    prompts = worker.prompt_tokens(worker.data.validation)["input_ids"]
    for row in range(3):  # the left-padded generation prompt ends where the response begins
        prompt = ids[row, : first_scored[row]]
        assert torch.equal(prompts[row, -len(prompt):], prompt)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_instruction_files_with_categories_and_a_test_set_of_other_columns(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": f"add {i} and {i + 1}", "output": f"#### {2 * i + 1}", "category": c}
        for i, c in zip(range(40), ["sum", "easy"] * 20, strict=True)])
    test = _write_jsonl(tmp_path / "test.jsonl", [
        {"question": f"add {i} and 2", "answer": f"#### {i + 2}"} for i in range(10)])
    tr, te, names = load_instructions(str(train), prompt_column="instruction", response_column="output",
                                      category_column="category", test_file=str(test),
                                      test_prompt_column="question", test_response_column="answer")
    assert names == ["easy", "sum"] and len(tr) == 40 and len(te) == 10
    assert tr.features["label"].names == names and set(tr["label"]) == {0, 1}
    assert te[0]["prompt"] == "add 0 and 2" and te[0]["response"] == "#### 2"
    with pytest.raises(DataError, match="column 'missing' not found"):
        load_instructions(str(train), prompt_column="missing", response_column="output")
    config = load_config(TINY, {"data.source": str(train), "data.prompt_column": "instruction",
                                "data.response_column": "output", "data.label_column": "category"})
    worker = get_worker(config)
    assert worker.data.label_names == ["easy", "sum"] and worker.generates


def test_the_generated_sources_belong_to_their_task():
    with pytest.raises(ConfigError, match=r"^data.source: got 'synthetic'; accepted: 'arithmetic'"):
        load_config(TINY, {"data.source": "synthetic"})
    with pytest.raises(ConfigError, match=r"^data.source: got 'arithmetic'; accepted: 'synthetic'"):
        load_config("tests/configs/tiny.yaml", {"data.source": "arithmetic"})


@pytest.mark.slow
def test_the_shipped_arithmetic_config_learns_exact_match(tmp_path):
    """configs/arithmetic.yaml (the packaged MiniLM as a causal LM, Fed-SB): validation exact match
    starts at 0 and rises over the rounds."""
    run_in_process({"config": "configs/arithmetic.yaml", "run-dir": str(tmp_path)})
    rows = read_metrics(tmp_path)
    assert rows[0].val_accuracy == 0.0
    assert max(r.val_accuracy for r in rows[1:]) >= 0.04
    assert rows[-1].val_loss < rows[1].val_loss < rows[0].val_loss


def test_gradient_checkpointing_trains_the_same_adapters():
    """train.gradient_checkpointing recomputes activations: the same step, the same gradients."""
    states = {}
    for checkpointing in (False, True):
        overrides = {"method.name": "fedit", "train.gradient_checkpointing": checkpointing}
        worker = get_worker(load_config(TINY, overrides))
        assert worker.model.is_gradient_checkpointing == checkpointing
        start = worker.initial_state()
        states[checkpointing] = (start, worker.train_client(0, start, 1)[0])
    (start, plain), (_, checkpointed) = states[False], states[True]
    for k, value in plain.items():
        assert torch.allclose(value, checkpointed[k], atol=1e-6), k
    assert any(not torch.equal(v, start[k]) for k, v in plain.items() if "lora" in k)


@pytest.mark.slow
def test_a_real_flwr_run_of_a_causal_lm(tmp_path):
    from fedsb.ops.launch import run_simulation

    lines: list[str] = []
    outcome = run_simulation(TINY, {"output_dir": str(tmp_path), "method.name": "fedsb"}, echo=lines.append)
    assert outcome.ok, (outcome.status, outcome.details, lines[-20:])
    summary = RunSummary.read(outcome.run_dir)
    assert summary.accuracy_metric.startswith("exact match") and summary.rounds_completed == 2
    assert any("round 2: val exact match" in line and "perplexity" in line for line in lines)
