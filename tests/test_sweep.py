"""`fedsb sweep`: the sweep file's checks, sweep.csv, skipping and failures with a fake runner (fast),
and one tiny real sweep through Flower (slow: three real runs of tests/configs/tiny.yaml)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import run_outputs
import yaml

from fedsb.analysis.sweep import cli, outputs, report, table, tuning
from fedsb.analysis.sweep.runner import run_sweep
from fedsb.analysis.sweep.spec import SweepError, describe, format_value, grid_labels, load_sweep, parse_value
from fedsb.analysis.sweep.table import COMPLETED, INVALID_CONFIG
from fedsb.experiment.config import ConfigError
from fedsb.experiment.summary import MetricsRow, PrivacySummary

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def write_sweep(path: Path, grid: dict, fixed: dict | None = None, output_dir: Path | None = None,
                base: str | Path = TINY, tune: object = None) -> Path:
    data = {"base": str(base), "output_dir": str(output_dir or path.parent / "out"), "grid": grid}
    if fixed is not None:
        data["set"] = fixed
    if tune is not None:
        data["tune"] = tune
    path.write_text("# Run: fedsb sweep " + str(path) + "\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- a fake runner: writes what a finished run leaves, without Flower -------------------------------

@dataclass
class FakeOutcome:
    run_id: int | None
    status: str
    details: str
    run_dir: Path
    elapsed_s: float


class FakeRunner:
    """Stands in for run_simulation: a run directory with summary.json and metrics.jsonl (the schema
    of the Flower app: validation per round, the test split at the best validation round and at the end).

    A cell with method.rank == 13 fails as a Flower run would (finished:failed); one with
    method.rank == 17 raises, as a SuperLink that does not start would. `accuracies(overrides)` gives
    (best validation, test at that round, test after the last round); by default they follow the rank.
    """

    def accuracies(self, overrides: dict) -> tuple[float, float, float]:
        test = 0.5 + overrides.get("method.rank", 4) / 100
        return test + 0.03, test, test - 0.01

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, config_path, overrides, **kwargs) -> FakeOutcome:
        self.calls.append(dict(overrides))
        rank = overrides.get("method.rank", 4)
        method = overrides.get("method.name", "fedsb")
        if rank == 17:
            raise RuntimeError("the SuperLink exited with code 1")
        run_dir = Path(overrides["output_dir"]) / f"run-{len(self.calls)}-{method}-r{rank}"
        run_dir.mkdir(parents=True)
        if rank == 13:
            return FakeOutcome(1, "finished:failed", "ServerApp raised: boom", run_dir, 3.0)
        val, test, final_test = self.accuracies(overrides)
        comm = {"up": {"bytes": 100 * rank, "wire_bytes": 120 * rank, "params": 25 * rank,
                       "bytes_by_component": {"lora_R": 80 * rank, "head": 20 * rank}},
                "down": {"bytes": 1000 + 100 * rank, "wire_bytes": 1100 + 120 * rank, "params": 0,
                         "bytes_by_component": {"lora_R": 80 * rank, "head": 20 * rank, "init": 1000}}}
        privacy = None
        if overrides.get("privacy.enabled"):  # as fedsb.experiment.report.privacy_summary writes it
            epsilon = overrides["privacy.epsilon"]
            privacy = PrivacySummary(enabled=True, status="private", target_epsilon=epsilon,
                                     epsilon_max=epsilon * 0.9, delta_max=2e-5, max_grad_norm=1.0,
                                     noise_multiplier_range=[1.1, 1.3])
        summary = run_outputs.summary(
            method, rank, seed=overrides.get("seed", 0), rounds=1, rounds_completed=1,
            initial_val_accuracy=0.25, final_val_accuracy=val, final_val_loss=0.9, best_val_accuracy=val,
            best_round=1, test_accuracy=test, test_loss=0.8, final_test_accuracy=final_test,
            final_test_loss=0.85, lr=overrides.get("train.lr", 0.01), communication=comm, wall_s=2.5,
            privacy=privacy)
        rows = [run_outputs.metrics_row(0, 0.25, 1.4),
                run_outputs.metrics_row(1, val, 0.9, bytes_up=100 * rank, bytes_down=1000 + 100 * rank,
                                        cum_bytes_up=100 * rank, cum_bytes_down=1000 + 100 * rank)]
        run_outputs.write_run(run_dir, summary, rows)
        return FakeOutcome(1, COMPLETED, "", run_dir, 5.0)


# --- the sweep file ---------------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_with_linked_axes(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {
        "method.name": ["fedsb", "ffa"],
        "privacy": [{"privacy.enabled": False},
                    {"privacy.enabled": True, "privacy.epsilon": 1},
                    {"privacy": {"enabled": True, "epsilon": 3}}],  # nested form of the same thing
    }, fixed={"federation": {"rounds": 1}})
    spec = load_sweep(path)
    assert spec.fixed == {"federation.rounds": 1}
    assert spec.columns == ["method.name", "privacy.enabled", "privacy.epsilon"]
    assert spec.shape == "2 x 3"
    cells = spec.cells()
    assert [c.label for c in cells] == [
        "method.name=fedsb privacy.enabled=false",
        "method.name=fedsb privacy.enabled=true privacy.epsilon=1",
        "method.name=fedsb privacy.enabled=true privacy.epsilon=3",
        "method.name=ffa privacy.enabled=false",
        "method.name=ffa privacy.enabled=true privacy.epsilon=1",
        "method.name=ffa privacy.enabled=true privacy.epsilon=3",
    ]
    assert cells[4].overrides == {"method.name": "ffa", "privacy.enabled": True, "privacy.epsilon": 1}


def test_a_relative_base_is_taken_from_the_sweep_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(TINY.read_text())
    (tmp_path / "configs" / "sweeps").mkdir()
    path = write_sweep(tmp_path / "configs" / "sweeps" / "s.yaml", {"seed": [0, 1]}, base="../base.yaml")
    assert load_sweep(path).base == (tmp_path / "configs" / "base.yaml").resolve()


def test_labels_read_back_as_the_values():
    for value in ("fedsb", "1", "true", "", "a: b", 1, 1.5, True, None, ["query", "value"]):
        assert parse_value(format_value(value)) == value or value == ""


@pytest.mark.parametrize("grid, fixed, message", [
    ({"method.nme": ["fedsb"]}, None, "grid.method.nme: unknown config key 'method.nme'"),
    ({"method": ["fedsb"]}, None, "grid.method: 'method' is a section, not a value"),
    ({"method.rank": []}, None, "grid.method.rank: expected a non-empty list of values"),
    ({"method.rank": 4}, None, "grid.method.rank: expected a non-empty list of values"),
    ({"method.rank": [4, 4]}, None, "grid.method.rank: value method.rank=4 is listed twice"),
    ({"dp": [{"privacy.enabled": False}, 3]}, None, "grid.dp: mixes mappings and plain values"),
    ({"dp": [{"privacy.epsilonn": 1}]}, None, "grid.dp[0].privacy.epsilonn: unknown config key"),
    ({"dp": [{}]}, None, "grid.dp[0]: an empty mapping"),
    ({"output_dir": ["a", "b"]}, None, "grid.output_dir: the sweep sets each cell's output_dir"),
    ({"method.rank": [4], "r": [{"method.rank": 8}]}, None,
     "grid.r: method.rank is also set by grid.method.rank"),
    ({"method.rank": [4]}, {"method.rank": 8}, "set.method.rank: also set by grid.method.rank"),
    ({"method.rank": [4]}, {"train.lrr": 0.1}, "set.train.lrr: unknown config key"),
    ({"method.rank": [4]}, ["x"], "set: expected a mapping"),
    ({"m": [{"train.lr": []}]}, None, "grid.m[0].train.lr: an empty list"),
    ({"m": [{"train.lr": [0.1]}, {"train.lr": [0.2, 0.1]}]}, None,
     "grid.m: value train.lr=0.1 is listed twice"),
    ({"m": [{"train.lrr": [0.1]}]}, None, "grid.m[0].train.lrr: unknown config key"),
    ({}, None, "grid: expected a non-empty mapping"),
])
def test_bad_sweep_files_stop_with_one_line_naming_the_key(tmp_path, grid, fixed, message):
    path = write_sweep(tmp_path / "s.yaml", grid, fixed)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_a_list_in_a_linked_value_expands_into_one_value_per_element(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {
        "method": [{"method.name": "fedsb", "method.rank": 64, "train.lr": [0.003, 0.01, 0.03]},
                   {"method.name": "ffa", "train.lr": [0.1, 0.2], "method.rank": [4, 8]},  # a product
                   {"method.name": "fedex", "model.target_modules": ["query", "value"]}],  # a list-typed key
        "seed": [0, 1],
    })
    (method, seed) = load_sweep(path).axes
    assert [describe(value) for value in method.values] == [
        "method.name=fedsb method.rank=64 train.lr=0.003",
        "method.name=fedsb method.rank=64 train.lr=0.01",
        "method.name=fedsb method.rank=64 train.lr=0.03",
        "method.name=ffa train.lr=0.1 method.rank=4",
        "method.name=ffa train.lr=0.1 method.rank=8",
        "method.name=ffa train.lr=0.2 method.rank=4",
        "method.name=ffa train.lr=0.2 method.rank=8",
        'method.name=fedex model.target_modules=["query", "value"]',
    ]
    assert method.values[-1]["model.target_modules"] == ["query", "value"]
    spec = load_sweep(path)
    assert spec.shape == "8 x 2" and len(spec.cells()) == 16
    assert spec.columns == ["method.name", "method.rank", "train.lr", "model.target_modules", "seed"]
    assert spec.cells()[1].overrides == {"method.name": "fedsb", "method.rank": 64, "train.lr": 0.003,
                                         "seed": 1}
    # sweep.json's record of the grid gives the same cells, in the same order (for `fedsb plot`).
    record = json.loads(json.dumps({axis.name: list(axis.values) for axis in spec.axes}))
    assert grid_labels(record) == [cell.label for cell in spec.cells()]


@pytest.mark.parametrize("tune, message", [
    ("train.lr", "tune: train.lr is not set by any grid axis (grid keys: method.name, seed)"),
    ("seed", "tune: seed is the repetition the tuning averages over"),
    (["train.lr"], "tune: train.lr is not set by any grid axis"),  # keys tuned together: each one checked
    ([], "tune.key: expected a config key or a non-empty list"),
    (3, "tune: expected a config key"),
])
def test_tune_names_a_key_of_the_grid(tmp_path, tune, message):
    path = write_sweep(tmp_path / "s.yaml", {"method.name": ["fedsb", "ffa"], "seed": [0, 1]}, tune=tune)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("base: x.yaml\noutput_dir: o\ngrid: {seed: [0]}\n", "base: file"),
    (f"base: {TINY}\ngrid: {{seed: [0]}}\n", "output_dir: missing"),
    (f"base: {TINY}\noutput_dir: o\ngrid: {{seed: [0]}}\nseeds: [1]\n", "seeds: unknown key"),
    ("- a\n- b\n", "sweep:"),
    ("base: [\n", "sweep:"),
])
def test_bad_top_level(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match="^" + message):
        load_sweep(path)


# --- running with a fake runner ------------------------------------------------------------------------

def test_each_cell_is_a_row_failures_are_recorded_and_a_rerun_skips_completed_cells(tmp_path):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"method.rank": [4, 0, 13, 17, 8]}, output_dir=out)
    runner, lines, bar = FakeRunner(), [], io.StringIO()
    result = run_sweep(path, runner=runner, echo=lines.append, progress=bar)

    rows = read_csv(out / "sweep.csv")
    assert [r["method.rank"] for r in rows] == ["4", "0", "13", "17", "8"]
    by_rank = {r["method.rank"]: r for r in rows}
    assert by_rank["4"]["status"] == COMPLETED and by_rank["8"]["status"] == COMPLETED
    assert by_rank["0"]["status"] == INVALID_CONFIG
    assert by_rank["0"]["error"].startswith("method.rank: got 0") and by_rank["0"]["run_dir"] == ""
    assert by_rank["13"]["status"] == "finished:failed" and by_rank["13"]["error"] == "ServerApp raised: boom"
    assert by_rank["17"]["status"] == "error" and "SuperLink exited" in by_rank["17"]["error"]
    assert len(runner.calls) == 4  # the invalid config never reached the runner
    assert all(call["output_dir"] == str(out / "runs") for call in runner.calls)
    assert len(result.failed) == 3

    row = by_rank["8"]
    assert float(row["test_accuracy"]) == pytest.approx(0.58)
    assert float(row["best_val_accuracy"]) == pytest.approx(0.61)
    assert float(row["final_test_accuracy"]) == pytest.approx(0.57)
    assert float(row["initial_val_accuracy"]) == 0.25 and row["best_round"] == "1"
    assert float(row["lr"]) == 0.01 and row["centralised"] == "false"  # from the cell's config
    assert int(row["bytes_up"]) == 800 and int(row["bytes_down"]) == 1800 and int(row["bytes_total"]) == 2600
    assert int(row["bytes_down_init"]) == 1000 and int(row["bytes_up_lora_R"]) == 640
    assert int(row["bytes_up_lora_A"]) == 0
    assert row["method"] == "fedsb" and row["rank"] == "8" and row["private"] == "false"
    assert row["run_dir"].startswith("runs/") and (out / row["run_dir"] / "summary.json").is_file()
    assert float(row["elapsed_s"]) == 5.0 and float(row["wall_s"]) == 2.5

    # Progress over the sweep: a tqdm bar (cells done of all, time left); the per-cell lines say
    # how each cell ended, where its run is.
    assert "fedsb sweep:" in bar.getvalue() and "5/5" in bar.getvalue()
    assert not any("cells |" in line for line in lines)  # no hand-made progress lines beside the bar
    done = next(line for line in lines if "done method.rank=8" in line)
    assert "test accuracy 0.58 at round 1 (validation 0.61" in done and f"run dir {row['run_dir']}" in done

    # Again: completed cells are skipped, failed ones are retried (and appended).
    runner2 = FakeRunner()
    again = run_sweep(path, runner=runner2, echo=lines.append)
    assert [c.label for c in again.skipped] == ["method.rank=4", "method.rank=8"]
    assert [call["method.rank"] for call in runner2.calls] == [13, 17]
    assert len(read_csv(out / "sweep.csv")) == 8


# --- tuning ---------------------------------------------------------------------------------------------

# (method, lr) -> per seed 0, 1, 2: (best validation accuracy, test at that round, test after the last round).
# fedsb: validation prefers lr 0.01, the test split would prefer 0.03: validation must win.
# ffa: its two lrs tie on validation: the first in grid order (0.03, listed first) is chosen.
# fedex: seed 1 fails at lr 0.01: the two completed seeds count.
TUNE_RESULTS = {
    ("fedsb", 0.003): [(0.80, 0.78, 0.77), (0.81, 0.79, 0.78), (0.79, 0.77, 0.76)],
    ("fedsb", 0.01): [(0.85, 0.74, 0.73), (0.86, 0.77, 0.75), (0.84, 0.72, 0.70)],
    ("fedsb", 0.03): [(0.70, 0.90, 0.91), (0.71, 0.91, 0.92), (0.72, 0.92, 0.90)],
    ("ffa", 0.03): [(0.75, 0.60, 0.61), (0.76, 0.62, 0.63), (0.77, 0.61, 0.60)],
    ("ffa", 0.01): [(0.75, 0.70, 0.71), (0.76, 0.72, 0.73), (0.77, 0.71, 0.70)],
    ("fedex", 0.01): [(0.90, 0.80, 0.79), None, (0.92, 0.84, 0.83)],
    ("fedex", 0.03): [(0.60, 0.95, 0.94), (0.61, 0.96, 0.95), (0.62, 0.97, 0.96)],
}


class TuneRunner(FakeRunner):
    """Accuracies from TUNE_RESULTS by method, lr and seed; a None entry fails as a Flower run would."""

    def accuracies(self, overrides: dict) -> tuple[float, float, float]:
        return TUNE_RESULTS[overrides["method.name"], overrides["train.lr"]][overrides["seed"]]

    def __call__(self, config_path, overrides, **kwargs) -> FakeOutcome:
        if TUNE_RESULTS[overrides["method.name"], overrides["train.lr"]][overrides["seed"]] is None:
            self.calls.append(dict(overrides))
            run_dir = Path(overrides["output_dir"]) / f"failed-{len(self.calls)}"
            run_dir.mkdir(parents=True)
            return FakeOutcome(1, "finished:failed", "ServerApp raised: boom", run_dir, 3.0)
        return super().__call__(config_path, overrides, **kwargs)


def tune_sweep(tmp_path: Path) -> Path:
    return write_sweep(tmp_path / "tune.yaml", {
        "method": [{"method.name": "fedsb", "train.lr": [0.003, 0.01, 0.03]},
                   {"method.name": "ffa", "train.lr": [0.03, 0.01]},
                   {"method.name": "fedex", "train.lr": [0.01, 0.03]}],
        "seed": [0, 1, 2],
    }, output_dir=tmp_path / "out", tune="train.lr")


def test_tuning_chooses_on_validation_and_reports_the_test_mean_and_std_there(tmp_path):
    lines: list[str] = []
    result = run_sweep(tune_sweep(tmp_path), runner=TuneRunner(), echo=lines.append)
    assert len(result.ran) == 21 and len(result.failed) == 1
    fedsb, ffa, fedex = result.tuned
    assert [g.label for g in result.tuned] == ["fedsb r=4", "ffa r=4", "fedex r=4"]

    # fedsb: validation picks 0.01; the test split alone would have picked 0.03.
    assert [(c.value, c.seeds) for c in fedsb.candidates] == [("0.003", 3), ("0.01", 3), ("0.03", 3)]
    assert fedsb.chosen.value == "0.01" and fedsb.seeds == 3
    assert max(fedsb.candidates, key=lambda c: c.test_mean).value == "0.03"
    tests = [0.74, 0.77, 0.72]
    assert fedsb.test_accuracy.mean == pytest.approx(statistics.mean(tests), abs=1e-12)
    assert fedsb.test_accuracy.std == pytest.approx(statistics.stdev(tests), abs=1e-12)
    assert fedsb.final_test_accuracy.mean == pytest.approx(statistics.mean([0.73, 0.75, 0.70]), abs=1e-12)
    assert fedsb.final_test_accuracy.std == pytest.approx(statistics.stdev([0.73, 0.75, 0.70]), abs=1e-12)
    assert fedsb.val_accuracy.mean == pytest.approx(0.85, abs=1e-12)
    assert [c.val_mean for c in fedsb.candidates] == pytest.approx([0.80, 0.85, 0.71])
    assert fedsb.bytes_total.mean == 400 + 1400 and fedsb.elapsed_s.mean == 5.0
    assert fedsb.cells == ("method.name=fedsb train.lr=0.01 seed=0", "method.name=fedsb train.lr=0.01 seed=1",
                           "method.name=fedsb train.lr=0.01 seed=2")

    # ffa: a tie on validation keeps the first value in grid order (0.03), though its test is lower.
    assert ffa.candidates[0].val_mean == ffa.candidates[1].val_mean
    assert ffa.chosen.value == "0.03"
    assert ffa.test_accuracy.mean == pytest.approx(0.61, abs=1e-12)

    # fedex: seed 1 failed at the chosen lr: the mean and std of the two completed seeds, n = 2.
    assert fedex.chosen.value == "0.01" and fedex.seeds == 2 and fedex.chosen.failed == 1
    assert fedex.test_accuracy.mean == pytest.approx(0.82, abs=1e-12)
    assert fedex.test_accuracy.std == pytest.approx(statistics.stdev([0.80, 0.84]), abs=1e-12)

    rows = {r["group"]: r for r in read_csv(tmp_path / "out" / "tuned.csv")}
    assert list(rows) == ["fedsb r=4", "ffa r=4", "fedex r=4"]
    header = list(rows["fedsb r=4"])
    assert header[:2] == ["group", "method.name"] and "train.lr" not in header and "seed" not in header
    assert header[2:] == list(tuning.TUNED_FIELDS[1:])
    row = rows["fedsb r=4"]
    assert row["tune_key"] == "train.lr" and row["tune_value"] == "0.01" and row["seeds"] == "3"
    assert float(row["test_accuracy_mean"]) == pytest.approx(statistics.mean(tests), abs=1e-6)
    assert float(row["test_accuracy_std"]) == pytest.approx(statistics.stdev(tests), abs=1e-6)
    assert float(row["val_accuracy_mean"]) == pytest.approx(0.85, abs=1e-6)
    assert int(float(row["bytes_total_mean"])) == 1800
    assert row["candidates"].startswith("0.003: val 0.8, test 0.78, n 3; 0.01: val 0.85, test 0.743333, n 3")
    assert rows["fedex r=4"]["seeds"] == "2" and rows["fedex r=4"]["seeds_failed"] == "1"

    # The printed table, and sweep.json's record of `tune` for `fedsb plot`.
    table = lines[lines.index(next(line for line in lines if "chosen per group on validation" in line)) + 1:]
    assert table[0].split() == ["group", "train.lr", "seeds", "val", "acc", "test", "acc", "[95%", "CI]",
                                "final-round", "test", "acc", "[95%", "CI]", "bytes", "total"]
    assert table[1].split()[:4] == ["fedsb", "r=4", "0.01", "3"]
    # means and 95% CIs over the 3 seeds (t = 4.303): [0.74, 0.77, 0.72] and [0.73, 0.75, 0.70]
    assert "0.850 ± 0.010" in table[1] and "0.743 [0.681, 0.806]  0.727 [0.664, 0.789]" in table[1]
    pin = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert pin["tune"] == "train.lr"

    # A rerun runs nothing and chooses the same.
    again = run_sweep(tune_sweep(tmp_path), runner=TuneRunner(), echo=lambda line: None)
    assert [c.value for c in (g.chosen for g in again.tuned)] == ["0.01", "0.03", "0.01"]


def _row(cell: str, status: str = COMPLETED, **fields) -> dict:
    return {"cell": cell, "status": status, "method": "fedit", "rank": "8", **fields}


def test_tune_results_labels_the_centralised_reference_and_handles_one_seed_and_no_seed():
    columns = ["federation.centralised", "method.name", "train.lr", "seed"]
    rows = [
        _row("c0", **{"federation.centralised": "false", "train.lr": "0.01", "seed": "0",
                      "best_val_accuracy": "0.8", "test_accuracy": "0.7", "centralised": "false"}),
        _row("c1", **{"federation.centralised": "true", "train.lr": "0.01", "seed": "0",
                      "best_val_accuracy": "0.9", "test_accuracy": "0.85", "centralised": "true",
                      "method_label": "LoRA"}),  # the centralised run's summary names its adapter
        _row("c2", **{"federation.centralised": "true", "train.lr": "0.03", "seed": "0",
                      "best_val_accuracy": "0.7", "test_accuracy": "0.95", "centralised": "true",
                      "method_label": "LoRA"}),
        _row("c3", status="finished:failed", **{"federation.centralised": "false", "train.lr": "0.03",
                                                 "seed": "0", "centralised": "false"}),
        _row("c4", status="invalid config", **{"federation.centralised": "false", "method.name": "ffa",
                                                "train.lr": "0.01", "seed": "0", "method": "", "rank": ""}),
    ]
    federated, centralised, nothing = tuning.tune_results(rows, columns, "train.lr")
    assert federated.label == "fedit r=8"
    assert centralised.label == "LoRA r=8, centralised (not federated)"  # fedit centralised: plain LoRA
    assert nothing.label == "ffa r=?"
    assert centralised.centralised and not federated.centralised
    assert centralised.chosen.value == "0.01" and centralised.test_accuracy.mean == 0.85
    assert centralised.test_accuracy.std is None  # one seed: no spread
    assert report.mean_std_text(centralised.test_accuracy) == "0.850"
    assert federated.chosen.value == "0.01" and [c.failed for c in federated.candidates] == [0, 1]
    assert federated.candidates[1].val_mean is None  # the failed value is no candidate
    assert nothing.chosen is None and nothing.seeds == 0 and nothing.method == "ffa"
    row = tuning.tuned_row(nothing)
    assert row["tune_value"] is None and row["test_accuracy_mean"] is None
    # A centralised run is named by its summary's method_label (without one: the config's name).
    assert tuning.setting_label("ffa", 4, True, method_label="LoRA (A frozen)") == \
        "LoRA (A frozen) r=4, centralised (not federated)"
    assert tuning.setting_label("fedsb", 4, centralised=True, method_label="LoRA-SB").startswith("LoRA-SB r=")
    assert tuning.setting_label("fedsb", 4, centralised=True).startswith("fedsb r=4")
    assert tuning.setting_label("fedsb", 4, extras=["privacy.epsilon=1"], method_label="Fed-SB") == \
        "fedsb r=4 privacy.epsilon=1"


def test_sweep_and_plots_import_without_torch():
    code = ("import sys, importlib, pkgutil, fedsb.analysis.sweep as s, fedsb.analysis.plots as p\n"
            "for pkg in (s, p):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__):\n"
            "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
            "assert 'fedsb.analysis.plots.cli' in sys.modules and 'fedsb.analysis.sweep.cli' in sys.modules\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_method_is_named_in_the_analysis_code():
    """Method names live in fedsb.methods: figures name a method by its runs' method_label and style it
    by its registry index. (Docstrings and comments may still give examples.)"""
    import ast

    names = set(__import__("fedsb.methods", fromlist=["method_names"]).method_names())
    root = Path(outputs.__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in docstrings:
                assert node.value not in names, f"{path}:{node.lineno} names method {node.value!r}"


def test_a_summary_off_the_schema_is_an_error_not_an_empty_column(tmp_path):
    """The drift this reader had: privacy keys no run writes (delta, noise_multiplier) read as empty."""
    run_dir = run_outputs.write_run(tmp_path / "run", run_outputs.summary("fedsb", 4, communication={
        d: {"bytes": 1, "wire_bytes": 1, "params": 1, "bytes_by_component": {}} for d in ("up", "down")}), [])
    assert outputs.result_fields(run_dir)["bytes_total"] == 2
    data = json.loads((run_dir / "summary.json").read_text())
    data["privacy"]["delta"] = 1e-5
    (run_dir / "summary.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"keys \['delta'\] are not in the schema of PrivacySummary"):
        outputs.result_fields(run_dir)


def test_privacy_fields_and_the_largest_of_per_client_values(tmp_path):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"privacy": [{"privacy.enabled": False},
                                                         {"privacy.enabled": True, "privacy.epsilon": 3}]},
                       output_dir=out)
    run_sweep(path, runner=FakeRunner(), echo=lambda line: None)
    off, on = read_csv(out / "sweep.csv")
    assert off["private"] == "false" and off["privacy_requested"] == "false" and off["epsilon_max"] == ""
    assert on["private"] == "true" and on["privacy_requested"] == "true"
    assert float(on["epsilon_target"]) == 3 and float(on["epsilon_max"]) == pytest.approx(2.7)
    assert float(on["delta"]) == 2e-5 and float(on["noise_multiplier"]) == 1.3


def test_privacy_asked_for_but_not_applied_is_not_private_and_is_flagged(tmp_path):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"privacy.enabled": [True]}, output_dir=out)

    def runner(config_path, overrides, **kwargs):  # a run that ignores privacy.enabled
        return FakeRunner()(config_path, {k: v for k, v in overrides.items() if k != "privacy.enabled"})

    lines = []
    run_sweep(path, runner=runner, echo=lines.append)
    (row,) = read_csv(out / "sweep.csv")
    assert row["privacy_requested"] == "true" and row["private"] == "false"
    # The run's summary says privacy was off (the recorder always writes a `privacy` object).
    assert row["privacy_status"] == "off"
    assert any("privacy status is 'off'" in line for line in lines)


def test_privacy_fields_as_the_flower_app_writes_them():
    summary_privacy = {  # server/app.py's summary.json `privacy` object
        "enabled": True, "status": "private", "target_epsilon": 3.0, "accountant": "rdp", "epsilon_max": 2.91,
        "delta_max": 1e-5, "max_grad_norm": 1.0, "noise_multiplier_range": [0.9, 1.2],
        "per_client": {"0": {"epsilon": 2.91, "delta": 1e-5, "noise_multiplier": 1.2}}}
    privacy = PrivacySummary.from_dict(summary_privacy)
    assert outputs.privacy_fields(privacy, None) == {
        "private": True, "privacy_status": "private", "epsilon_max": 2.91, "delta": 1e-5,
        "noise_multiplier": 1.2}
    pooled = PrivacySummary.from_dict(
        {**summary_privacy, "status": "not private: the Fed-SB init pooled every client's raw data"})
    assert outputs.privacy_fields(pooled, None)["private"] is False
    assert outputs.privacy_fields(PrivacySummary(enabled=False), None) == {"private": False,
                                                                           "privacy_status": "off"}
    assert outputs.privacy_fields(None, None) == {"private": False, "privacy_status": "not reported"}
    # No epsilon in the summary: the last round's largest over all clients.
    last_round = MetricsRow.from_dict({**run_outputs.metrics_row(3, 0.5, 1.0).to_dict(), "epsilon_max": 1.0,
                                       "epsilon_max_all": 1.5})
    assert outputs.privacy_fields(PrivacySummary(enabled=True), last_round)["epsilon_max"] == 1.5


def test_other_shared_settings_in_the_same_directory_stop_the_sweep(tmp_path):
    out = tmp_path / "out"
    run_sweep(write_sweep(tmp_path / "s.yaml", {"method.rank": [4]}, {"seed": 1}, out), runner=FakeRunner(),
              echo=lambda line: None)
    with pytest.raises(SweepError, match="^output_dir: .* other `set` overrides"):
        run_sweep(write_sweep(tmp_path / "s.yaml", {"method.rank": [4]}, {"seed": 2}, out),
                  runner=FakeRunner(), echo=lambda line: None)


def test_a_grown_grid_widens_sweep_csv_and_keeps_the_old_rows(tmp_path):
    out = tmp_path / "out"
    run_sweep(write_sweep(tmp_path / "s.yaml", {"method.rank": [4]}, output_dir=out), runner=FakeRunner(),
              echo=lambda line: None)
    runner = FakeRunner()
    run_sweep(write_sweep(tmp_path / "s.yaml", {"method.rank": [4, 8], "seed": [0]}, output_dir=out),
              runner=runner, echo=lambda line: None)
    rows = read_csv(out / "sweep.csv")
    assert list(rows[0])[:3] == ["cell", "method.rank", "seed"]
    assert [(r["cell"], r["seed"]) for r in rows] == [("method.rank=4", "0"), ("method.rank=4 seed=0", "0"),
                                                      ("method.rank=8 seed=0", "0")]
    assert list(rows[0]).count("seed") == 1  # the grid's seed is the run's seed
    assert len(runner.calls) == 2  # a new key makes new cells


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", {"method.rank": [4, 8]}, output_dir=tmp_path / "out")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args([str(path), "--dry-run"])) == 0
    printed = capsys.readouterr().out
    assert "2 cells (2)" in printed and "not run" in printed and "method.rank=8" in printed
    assert not (tmp_path / "out").exists()


def test_completed_is_the_launch_status():
    from fedsb.experiment.comm import METER_COMPONENTS
    from fedsb.ops.launch import COMPLETED as LAUNCH_COMPLETED

    assert COMPLETED == LAUNCH_COMPLETED
    assert table.COMPONENTS == METER_COMPONENTS


def test_every_shipped_sweep_starts_with_its_command_and_every_cell_validates():
    from fedsb.experiment.config import load_config

    root = Path(__file__).resolve().parents[1]
    sizes = {}
    for path in sorted((root / "configs" / "sweeps").glob("*.yaml")):
        relative = path.relative_to(root)
        assert path.read_text().startswith(f"# Run: fedsb sweep {relative}"), path
        spec = load_sweep(path)
        for cell in spec.cells():
            try:
                load_config(spec.base, {**spec.fixed, **cell.overrides})
            except ConfigError as err:  # local data that is not on this machine (e.g. SST-2)
                on_sst2 = path.stem in ("sst2", "sst2_pilot", "sst2_private", "inits", "hetero_ranks")
                assert str(err).startswith("data.source: got") and on_sst2, (path, err)
        sizes[path.stem] = spec.cells()
    assert {name: len(cells) for name, cells in sizes.items()} == {
        "comm": 12, "hetero_ranks": 34, "inits": 25, "paper_private": 10, "privacy": 16, "sst2": 90,
        "sst2_pilot": 3, "sst2_private": 108}
    # The SST-2 study: every setting (4 methods and the centralised reference, on each partition) runs
    # its three lrs on seeds 0, 1 and 2, and the lr is chosen on the mean over every completed seed.
    def grid_of(cells, *keys):
        out: dict = {}
        for c in cells:
            setting = tuple(c.overrides.get(k, False) for k in keys)
            out.setdefault(setting, set()).add((c.overrides["seed"], c.overrides["train.lr"]))
        return out

    sst2 = grid_of(sizes["sst2"], "partition.scheme", "method.name", "federation.centralised")
    assert len(sst2) == 10 and all(len(v) == 9 and {s for s, _ in v} == {0, 1, 2} for v in sst2.values())
    spec = load_sweep(root / "configs/sweeps/sst2.yaml")
    assert spec.tune == "train.lr" and spec.tune_seeds is None and spec.compare == {"method.name": "fedsb"}
    assert (spec.engine, spec.keep, spec.output_dir.name) == ("inprocess", "results", "sst2")
    # The private study's first stage: lr and clipping norm tuned together at epsilon 3 (3 x 2 on seeds
    # 0-2), the lr alone without DP.
    private = grid_of(sizes["sst2_private"], "privacy.epsilon", "method.name", "privacy.max_grad_norm")
    assert len(private) == 4 * (1 + 2) and all(len(v) == 9 for v in private.values())
    assert load_sweep(root / "configs/sweeps/sst2_private.yaml").tune == "train.lr+privacy.max_grad_norm"
    # Inits: two lrs for each new init on seed 0 and the chosen one on seed 1 (stage 2); the references
    # at one lr on seeds 0 and 1.
    inits: dict = {}
    for c in sizes["inits"]:
        group = (c.overrides["method.name"], c.overrides["method.init.name"],
                 c.overrides.get("federation.centralised", False))
        inits.setdefault(group, set()).add((c.overrides["seed"], c.overrides["train.lr"]))
    for (_, init, _), v in inits.items():
        if init in ("olora", "pissa", "lora_ga"):
            chosen = {lr for seed, lr in v if seed == 1}
            assert len([lr for seed, lr in v if seed == 0]) == 2 and len(chosen) == 1
            assert chosen <= {lr for seed, lr in v if seed == 0}  # seed 1 runs an lr seed 0 tried
    assert inits[("fedsb", "lora_sb", False)] == {(0, 0.01), (1, 0.01)}
    assert inits[("fedit", "kaiming", True)] == {(0, 0.003)}
    no_dp = [c for c in sizes["privacy"] if c.overrides["privacy.enabled"] is False]
    assert len(no_dp) == 4 and all("privacy.epsilon" not in c.overrides for c in no_dp)


def test_numbers_in_sweep_files_read_as_numbers(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {"train.lr": ["1e-3", "5E-4"]})
    text = path.read_text().replace("'1e-3'", "1e-3").replace("'5E-4'", "5E-4")
    path.write_text(text)
    assert [c.overrides["train.lr"] for c in load_sweep(path).cells()] == [0.001, 0.0005]


# --- a real sweep -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_tiny_real_sweep_writes_every_row_and_figure_and_reruns_nothing(tmp_path, monkeypatch):
    """2 x 2 cells of the tiny config, 1 round; fedsb with DP is refused at config validation (the
    pooled init sees all clients' data), so 3 real Flower runs, through one SuperLink. A cell's run
    is the same run as its config run alone (its own SuperLink): same metrics, same bytes."""
    import fedsb.ops.launch as launch
    from fedsb.analysis.plots.cli import plot_dir

    started = []

    def counted(*args, **kwargs):  # the real SuperLink, counted
        started.append(args)
        return real_superlink(*args, **kwargs)

    real_superlink = launch.local_superlink
    monkeypatch.setattr(launch, "local_superlink", counted)
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path / "tiny-sweep.yaml", {
        "method.name": ["fedsb", "ffa"],
        "privacy": [{"privacy.enabled": False}, {"privacy.enabled": True, "privacy.epsilon": 8}],
    }, fixed={"federation.rounds": 1, "method.init.source": "pooled"}, output_dir=out)
    result = run_sweep(path, echo=print)
    assert len(started) == 1  # one SuperLink for the three runs

    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 4
    status = {r["cell"]: r["status"] for r in rows}
    assert status["method.name=fedsb privacy.enabled=true privacy.epsilon=8"] == INVALID_CONFIG
    assert [s for s in status.values() if s == COMPLETED] == [COMPLETED] * 3
    assert len(result.failed) == 1
    for row in rows:
        if row["status"] == COMPLETED:
            assert int(row["bytes_up"]) > 0 and int(row["bytes_down"]) > 0
            assert 0 <= float(row["test_accuracy"]) <= 1 and 0 <= float(row["best_val_accuracy"]) <= 1
            assert (out / row["run_dir"] / "summary.json").is_file()

    calls = []
    again = run_sweep(path, runner=lambda *a, **k: calls.append(a), echo=print)
    assert calls == [] and len(again.skipped) == 3  # only the invalid cell is tried again (no run)
    assert len(read_csv(out / "sweep.csv")) == 5

    private = next(r for r in rows if r["cell"] == "method.name=ffa privacy.enabled=true privacy.epsilon=8")
    assert private["private"] == "true" and private["privacy_status"] == "private"
    assert 0 < float(private["epsilon_max"]) <= 8 and float(private["epsilon_target"]) == 8

    output = plot_dir(out)
    expected = {"comm_vs_accuracy", "privacy_vs_utility", "accuracy_vs_round", "bytes_vs_round",
                "bytes_by_component"}
    assert set(output.figures) == expected
    for name in expected:
        assert (out / "report" / f"{name}.png").stat().st_size > 0
        assert (out / "report" / f"{name}.svg").stat().st_size > 0
    assert len(output.figures["comm_vs_accuracy"].axes[0].containers) == 2  # fedsb and ffa
    privacy_axes = output.figures["privacy_vs_utility"].axes[0]
    assert len(privacy_axes.containers) == 1  # ffa with DP; fedsb with DP was refused
    assert len([line for line in privacy_axes.lines if line.get_gid() == "reference"]) == 2
    report = output.report.read_text()
    assert "## Failed cells" in report and "allow_pooled_init" in report

    # The private ffa cell again, alone: `fedsb run` of its config, on a SuperLink of its own.
    alone = launch.run_simulation(out / private["run_dir"] / "config.yaml",
                                  {"output_dir": str(tmp_path / "alone")}, echo=print)
    assert alone.ok and len(started) == 2

    def rows_of(run_dir):
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]

    assert rows_of(alone.run_dir) == rows_of(out / private["run_dir"])
    assert (alone.run_dir / "comm.csv").read_text() == (out / private["run_dir"] / "comm.csv").read_text()


def test_tune_seeds_chooses_on_those_seeds_and_reports_every_seed_of_the_choice(tmp_path):
    """Successive halving: every lr runs on seed 0, the chosen one on seeds 1 and 2 too. The choice
    reads seed 0's validation only; the result is the test mean and std over all three seeds."""
    def row(lr, seed, val, test):
        return _row(f"seed={seed} method.name=fedit train.lr={lr}", seed=str(seed), **{
            "method.name": "fedit", "train.lr": str(lr), "best_val_accuracy": str(val),
            "test_accuracy": str(test), "final_test_accuracy": str(test)})

    rows = [row(0.001, 0, 0.80, 0.70), row(0.003, 0, 0.78, 0.75), row(0.001, 1, 0.70, 0.71),
            row(0.001, 2, 0.72, 0.69)]
    columns = ["seed", "method.name", "train.lr"]
    (group,) = tuning.tune_results(rows, columns, "train.lr", select_seeds=[0])
    assert group.chosen.value == "0.001" and group.seeds == 3 and group.select_seeds == (0,)
    assert group.test_accuracy.mean == pytest.approx(statistics.mean([0.70, 0.71, 0.69]), abs=1e-12)
    assert group.test_accuracy.std == pytest.approx(statistics.stdev([0.70, 0.71, 0.69]), abs=1e-12)
    # Without it, the mean over whatever seeds completed would compare 3 seeds with 1.
    (naive,) = tuning.tune_results(rows, columns, "train.lr")
    assert naive.chosen.value == "0.003" and naive.seeds == 1

    path = write_sweep(tmp_path / "s.yaml", {"train.lr": [0.001, 0.003], "seed": [0, 1]},
                       tune={"key": "train.lr", "seeds": [0]})
    spec = load_sweep(path)
    assert (spec.tune, spec.tune_seeds) == ("train.lr", (0,))
    for bad, message in (({"key": "train.lr", "seeds": []}, "tune.seeds: expected a non-empty list"),
                         ({"key": "train.lr", "every": 1}, "tune.every: unknown key")):
        with pytest.raises(SweepError, match=message):
            load_sweep(write_sweep(tmp_path / "b.yaml", {"train.lr": [0.001], "seed": [0]}, tune=bad))


def test_tuned_groups_carry_the_truncated_accuracies_of_their_chosen_cells():
    """Clients of different ranks: each chosen cell's test_accuracy_at_rank (JSON in sweep.csv) becomes a
    mean and std per rank in the tuned group, tuned.csv and the report's tuned table."""
    from fedsb.analysis.plots.report import tuned_section

    def row(lr, seed, val, at_rank):
        return _row(f"seed={seed} method.name=fedit train.lr={lr}", seed=str(seed), **{
            "method.name": "fedit", "train.lr": str(lr), "best_val_accuracy": str(val),
            "test_accuracy": "0.8", "final_test_accuracy": "0.8",
            "test_accuracy_at_rank": json.dumps(at_rank)})

    rows = [row(0.001, 0, 0.80, {"4": 0.70, "16": 0.9}), row(0.003, 0, 0.70, {"4": 0.1, "16": 0.1}),
            row(0.001, 1, 0.75, {"4": 0.74, "16": 0.8})]
    (group,) = tuning.tune_results(rows, ["seed", "method.name", "train.lr"], "train.lr", select_seeds=[0])
    assert list(group.test_accuracy_at_rank) == ["4", "16"]  # ranks in numeric order
    assert group.test_accuracy_at_rank["4"].mean == pytest.approx(0.72, abs=1e-12)
    assert group.test_accuracy_at_rank["4"].std == pytest.approx(statistics.stdev([0.70, 0.74]), abs=1e-12)
    assert json.loads(tuning.tuned_row(group)["test_accuracy_at_rank_mean"]) == {"4": 0.72, "16": 0.85}
    table = "\n".join(tuned_section([group]))
    assert "truncated to rank 4" in table and "0.720 ± 0.028" in table
