"""The run outputs' schema: summary.json and metrics.jsonl round-trip through their dataclasses, and a
file with a key the schema does not have is rejected by name (so writer and readers cannot drift)."""

from __future__ import annotations

import json
import math

import pytest

from fedsb.experiment.summary import MetricsRow, PrivacySummary, RunSummary, append_metrics, read_metrics


def a_summary(**changes) -> RunSummary:
    fields = dict(
        method="fedsb", method_label="Fed-SB", rank=4, alpha=4.0, seed=0, model="tiny-bert", data="synthetic",
        num_clients=4, connected_clients=4, clients_per_round=4, rounds=2, local_steps=2, lr=0.01,
        init_lr=0.0025, weighting="examples", centralised=False, init_source="server", oracle=False,
        partition={"scheme": "dirichlet", "alpha": 1.0, "label_counts": [[1, 2]], "label_names": ["a", "b"]},
        run_dir="/tmp/run", rounds_completed=2, selection="validation", initial_val_accuracy=0.25,
        final_val_accuracy=0.5, final_val_loss=math.nan, best_val_accuracy=0.5, best_round=2,
        test_accuracy=0.5, test_loss=1.0, final_test_accuracy=0.5, final_test_loss=1.0,
        communication={"up": {"bytes": 10}, "down": {"bytes": 20}}, wall_s=1.5,
        privacy=PrivacySummary(enabled=True, status="private", epsilon_max=2.5, delta_max=1e-5,
                               noise_multiplier_range=[0.9, 1.1], per_client={"0": {"epsilon": 2.5}}))
    fields.update(changes)
    return RunSummary(**fields)


def test_summary_round_trips_through_json(tmp_path):
    summary = a_summary()
    path = summary.write(tmp_path)
    written = json.loads(path.read_text())
    assert written["final_val_loss"] is None  # NaN is written as null: strict JSON
    assert written["privacy"]["epsilon_max"] == 2.5
    again = RunSummary.read(tmp_path)
    assert again == a_summary(final_val_loss=None)
    assert again.privacy.noise_multiplier_range == [0.9, 1.1] and again.bytes_total("down") == 20


def test_a_key_the_schema_does_not_have_is_rejected_by_name(tmp_path):
    data = a_summary().to_dict()
    (tmp_path / "summary.json").write_text(json.dumps({**data, "epsilon_target": 3}))
    with pytest.raises(ValueError, match=r"summary.json: keys \['epsilon_target'\] are not in the schema"):
        RunSummary.read(tmp_path)
    data["privacy"]["noise_multiplier"] = 1.0  # the range is written, not one value
    with pytest.raises(ValueError, match=r"privacy: keys \['noise_multiplier'\]"):
        RunSummary.from_dict(data)


def test_metrics_rows_round_trip(tmp_path):
    rows = [MetricsRow(round=0, val_accuracy=0.25, val_loss=1.4, bytes_up=0, bytes_down=0, cum_bytes_up=0,
                       cum_bytes_down=0, wire_bytes_up=0, wire_bytes_down=0, wall_s=0.5),
            MetricsRow(round=1, val_accuracy=0.5, val_loss=1.2, bytes_up=8, bytes_down=16, cum_bytes_up=8,
                       cum_bytes_down=16, wire_bytes_up=9, wire_bytes_down=17, wall_s=1.0, clients=[0, 1],
                       accepted=[0], rejected={1: "no reply before the timeout"}, train_loss=math.inf)]
    for row in rows:
        append_metrics(tmp_path, row)
    again = read_metrics(tmp_path)
    assert again[0] == rows[0]
    assert again[1].rejected == {"1": "no reply before the timeout"}  # JSON keys are strings
    assert again[1].train_loss is None and again[1].clients == [0, 1]
    with pytest.raises(ValueError, match=r"metrics.jsonl: keys \['accuracy'\]"):
        MetricsRow.from_dict({**rows[0].to_dict(), "accuracy": 0.3})
