"""Uncertainty and paired comparisons over seeds (fedsb.analysis.sweep.stats and .compare), a study's
small outputs (`keep: results`) and the sweep's pace line: fast, with the fake runner of test_sweep."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_sweep import FakeRunner, read_csv, write_sweep

from fedsb.analysis.sweep.compare import MARGIN, paired_differences
from fedsb.analysis.sweep.runner import keep_results_only, kept_paths, pace, run_sweep
from fedsb.analysis.sweep.spec import RESULT_FILES, SweepError, load_sweep
from fedsb.analysis.sweep.stats import DOES_NOT_HOLD, HOLDS, UNDECIDED, t_interval, t_quantile, verdict
from fedsb.analysis.sweep.tuning import tune_results

# Student's t 0.975 quantiles from a printed table (e.g. NIST/SEMATECH e-Handbook, Table 1.3.5.3)
T_975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(df) == pytest.approx(T_975[df], abs=5e-4)


def test_the_interval_is_mean_plus_minus_t_times_the_standard_error():
    values = [0.81, 0.84, 0.79, 0.83, 0.82]
    interval = t_interval(values)
    mean, sd = sum(values) / 5, math.sqrt(sum((v - 0.818) ** 2 for v in values) / 4)
    assert interval.mean == pytest.approx(mean)
    assert interval.half_width == pytest.approx(2.776445 * sd / math.sqrt(5), rel=1e-5)
    assert interval.n == 5
    one = t_interval([0.7])
    assert (one.low, one.high, one.n) == (0.7, 0.7, 1)
    assert t_interval([]) is None


@pytest.mark.parametrize(("values", "threshold", "expected"), [
    ([0.02, 0.03, 0.025], 0.0, HOLDS),
    ([-0.02, -0.03, -0.025], 0.0, DOES_NOT_HOLD),
    ([-0.02, 0.03, 0.0], 0.0, UNDECIDED),
    ([-0.004, -0.003, -0.005], -MARGIN, HOLDS),  # worse, but by less than the margin: reaches
    ([0.05], 0.0, UNDECIDED),  # one seed decides nothing
])
def test_verdicts(values, threshold, expected):
    assert verdict(t_interval(values), threshold) == expected


class SeededRunner(FakeRunner):
    """Test accuracy by method and seed: the seed's own luck is shared by every method (paired seeds)."""

    LUCK = {0: 0.00, 1: 0.06, 2: -0.05, 3: 0.02, 4: -0.03}
    BASE = {"fedsb": 0.80, "fedit": 0.78, "ffa": 0.795}

    def accuracies(self, overrides):
        method, seed = overrides.get("method.name", "fedsb"), overrides.get("seed", 0)
        lr_bonus = 0.0 if overrides.get("train.lr") == 0.01 else -0.1  # the lr 0.01 is the better one
        # a little noise of its own per (method, seed), so the paired differences are not constant
        own = 0.004 * (((3 * seed + len(method)) % 7) - 3) / 3 if method != "fedsb" else 0.0
        central = 0.05 if overrides.get("federation.centralised") else 0.0
        test = self.BASE[method] + self.LUCK[seed] + lr_bonus + own + central
        return test + 0.01, test, test - 0.002


def study(tmp_path: Path, **extra) -> Path:
    grid = {"setting": [{"method.name": "fedsb", "train.lr": [0.01, 0.1]},
                        {"method.name": "fedit", "train.lr": [0.01, 0.1]},
                        {"method.name": "ffa", "train.lr": [0.01, 0.1]},
                        {"method.name": "fedit", "federation.centralised": True, "train.lr": [0.01, 0.1]}],
            "partition.scheme": ["iid", "dirichlet"], "seed": [0, 1, 2, 3, 4]}
    path = write_sweep(tmp_path / "study.yaml", grid, tune="train.lr")
    data = yaml.safe_load(path.read_text().split("\n", 1)[1])
    data.update({"compare": {"method.name": "fedsb"}, **extra})
    path.write_text("# Run: fedsb sweep study.yaml\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def test_tuned_csv_has_the_interval_and_paired_csv_the_differences(tmp_path):
    result = run_sweep(study(tmp_path), runner=SeededRunner(), echo=lambda line: None)
    out = result.spec.output_dir
    tuned = {(r["group"]): r for r in read_csv(out / "tuned.csv")}
    assert len(tuned) == 8  # 4 settings x 2 partitions
    rows = read_csv(out / "sweep.csv")
    for group in tuned.values():
        assert group["tune_value"] == "0.01"
        tests = [float(r["test_accuracy"]) for r in rows if r["method"] == group["method"]
                 and r["train.lr"] == "0.01" and r["partition.scheme"] == group["partition.scheme"]
                 and r["centralised"] == group["centralised"]]
        assert len(tests) == 5
        half = T_975[4] * statistics.stdev(tests) / math.sqrt(5)
        assert float(group["test_accuracy_ci95_half_width"]) == pytest.approx(half, rel=5e-4)
        assert float(group["test_accuracy_ci95_low"]) == pytest.approx(np.mean(tests) - half, rel=5e-4)

    pairs = read_csv(out / "paired.csv")
    # per partition: fedsb against fedit and ffa; fedsb, fedit and ffa against the reference
    assert len(pairs) == 2 * (2 + 3)
    fedsb_fedit = [p for p in pairs if p["kind"] == "focus" and p["a"].startswith("fedsb")
                   and p["b"].startswith("fedit") and p["context"] == "partition.scheme=iid"]
    assert len(fedsb_fedit) == 1
    row = fedsb_fedit[0]
    by_seed = {m: {r["seed"]: float(r["test_accuracy"]) for r in rows if r["method"] == m
                   and r["train.lr"] == "0.01" and r["partition.scheme"] == "iid"
                   and r["centralised"] == "false"} for m in ("fedsb", "fedit")}
    diffs = [by_seed["fedsb"][s] - by_seed["fedit"][s] for s in by_seed["fedsb"]]
    assert float(row["diff_mean"]) == pytest.approx(np.mean(diffs))
    assert float(row["diff_high"]) - float(row["diff_mean"]) == pytest.approx(
        T_975[4] * np.std(diffs, ddof=1) / math.sqrt(5), rel=5e-4)
    # the seeds' luck (+-0.06) cancels in the pairs: fedsb's 0.02 lead over FedIT is decided
    assert row["more_accurate"] == HOLDS and row["reaches"] == HOLDS
    reference = [p for p in pairs if p["kind"] == "reference" and p["a"].startswith("fedsb")]
    assert {p["more_accurate"] for p in reference} == {DOES_NOT_HOLD}  # 0.03 below the centralised run


def test_paired_differences_use_only_the_seeds_both_completed(tmp_path):
    runner = SeededRunner()
    result = run_sweep(study(tmp_path), runner=runner, echo=lambda line: None)
    rows = read_csv(result.spec.output_dir / "sweep.csv")
    dropped = [r for r in rows if not (r["method"] == "fedit" and r["seed"] == "4")]
    groups = tune_results(dropped, result.spec.columns, "train.lr")
    pairs = paired_differences(groups, {"method.name": "fedsb"})
    with_fedit = [p for p in pairs if p.a.method == "fedsb" and p.b.method == "fedit" and not p.b.centralised]
    assert {p.seeds for p in with_fedit} == {("0", "1", "2", "3")}


def test_keep_results_leaves_only_the_small_outputs(tmp_path):
    run_dir = tmp_path / "run"
    for name in (*RESULT_FILES, "adapter/adapter_model.safetensors", "prepared/base.pt",
                 "checkpoint/state.pt", "partition.png"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("x")
    outside = tmp_path.parent / "data" / "train.tsv"  # a path of this machine, made relative
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"source": str(outside), "test_file": None},
                                                          "output_dir": str(tmp_path), "seed": 3}))
    summary = {"data": str(outside), "run_dir": str(run_dir), "seed": 3}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    keep_results_only(run_dir)
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == sorted(RESULT_FILES)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    relative = "../../data/train.tsv"
    assert config == {"data": {"source": relative, "test_file": None}, "output_dir": "..", "seed": 3}
    assert json.loads((run_dir / "summary.json").read_text()) == {"data": relative, "run_dir": ".", "seed": 3}
    # Rerunning the kept cell gets its paths back, absolute (benchmarks/rerun_check.py); a missing
    # data file is left out.
    assert kept_paths(run_dir) == {"output_dir": str(tmp_path.resolve())}
    outside.parent.mkdir(exist_ok=True)
    outside.write_text("text,label\n")
    assert kept_paths(run_dir) == {"data.source": str(outside.resolve()),
                                   "output_dir": str(tmp_path.resolve())}


def test_a_study_with_keep_results_prunes_each_completed_cell(tmp_path):
    class WithWeights(SeededRunner):
        def __call__(self, config_path, overrides, **kwargs):
            outcome = super().__call__(config_path, overrides, **kwargs)
            (outcome.run_dir / "adapter").mkdir()
            (outcome.run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
            return outcome

    result = run_sweep(study(tmp_path, keep="results"), runner=WithWeights(), echo=lambda line: None)
    runs = list((result.spec.output_dir / "runs").iterdir())
    assert len(runs) == 80
    assert all(not (r / "adapter").exists() and (r / "summary.json").is_file() for r in runs)


@pytest.mark.parametrize(("extra", "message"), [
    ({"engine": "ray"}, "engine: got 'ray'; accepted: flower or inprocess"),
    ({"keep": "weights"}, "keep: got 'weights'; accepted: all or results"),
    ({"compare": {"method.alpha": 8}}, "compare.method.alpha: not set by any grid axis"),
    ({"compare": "fedsb"}, "compare: expected a mapping of grid keys to values"),
])
def test_bad_study_keys_stop_with_one_line(tmp_path, extra, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_sweep(study(tmp_path, **extra))


def test_pace_says_cells_per_hour_and_time_left():
    assert pace(3, 40, 720.0) == ("fedsb sweep: 3/40 cells of this invocation in 12 min: 15.0 cells/h, "
                                  "about 2 h 28 min left")
    assert pace(2, 2, 1800.0).endswith("in 30 min: 4.0 cells/h, about 0 min left")


def test_the_sweep_prints_the_paired_table(tmp_path):
    lines: list[str] = []
    run_sweep(study(tmp_path), runner=SeededRunner(), echo=lines.append)
    text = "\n".join(lines)
    assert "paired differences over seeds" in text
    assert any("fedsb" in line and "fedit" in line and HOLDS in line for line in lines)
    assert any(line.startswith("fedsb sweep: 1/80 cells of this invocation") for line in lines)


def test_paired_csv_is_written_even_without_compare(tmp_path):
    path = study(tmp_path)
    data = yaml.safe_load(path.read_text().split("\n", 1)[1])
    del data["compare"]
    path.write_text("# Run: fedsb sweep study.yaml\n" + yaml.safe_dump(data, sort_keys=False))
    result = run_sweep(path, runner=SeededRunner(), echo=lambda line: None)
    with open(result.spec.output_dir / "paired.csv", newline="") as f:
        kinds = {r["kind"] for r in csv.DictReader(f)}
    assert kinds == {"reference"}


def test_two_keys_are_tuned_together(tmp_path):
    class Joint(FakeRunner):
        def accuracies(self, overrides):
            test = 0.7 + (0.05 if overrides["train.lr"] == 0.01 else 0.0) \
                + (0.03 if overrides.get("privacy.max_grad_norm") == 0.1 else 0.0)
            return test + 0.01, test, test

    grid = {"setting": [{"method.name": "fedsb", "train.lr": [0.001, 0.01],
                         "privacy.max_grad_norm": [0.1, 1.0]}], "seed": [0, 1]}
    path = write_sweep(tmp_path / "joint.yaml", grid, tune={"key": ["train.lr", "privacy.max_grad_norm"],
                                                            "seeds": [0, 1]})
    result = run_sweep(path, runner=Joint(), echo=lambda line: None)
    (group,) = result.tuned
    assert group.tune_key == "train.lr+privacy.max_grad_norm"
    assert group.chosen.value == "0.01+0.1" and group.seeds == 2
    assert [c.value for c in group.candidates] == ["0.001+0.1", "0.001+1.0", "0.01+0.1", "0.01+1.0"]
    assert group.test_interval.mean == pytest.approx(0.78)


@pytest.mark.parametrize(("cheap", "other", "expected"), [
    ((1000.0, 10.0), (0.0, 20.0), 101),  # 1000 + 101 * 10 = 2010 < 2020; at 100 rounds both 2000
    ((999.0, 10.0), (0.0, 20.0), 100),
    ((0.0, 10.0), (50.0, 20.0), 1),
    ((0.0, 20.0), (0.0, 20.0), None),  # never cheaper: the same every round
    ((10.0, 30.0), (0.0, 20.0), None),
])
def test_crossover_round(cheap, other, expected):
    from fedsb.analysis.plots.report import crossover_round

    assert crossover_round(cheap, other) == expected
    if expected is not None:  # the first round where the total is lower, and not the one before
        total = lambda c, r: c[0] + r * c[1]  # noqa: E731
        assert total(cheap, expected) < total(other, expected)
        assert expected == 1 or total(cheap, expected - 1) >= total(other, expected - 1)


def test_report_md_has_the_intervals_and_the_paired_verdicts(tmp_path):
    from fedsb.analysis.plots.cli import plot_dir

    result = run_sweep(study(tmp_path), runner=SeededRunner(), echo=lambda line: None)
    report = plot_dir(result.spec.output_dir).report.read_text()
    assert "## Paired differences over seeds" in report
    assert "test accuracy (mean [95% CI])" in report
    start = "| partition.scheme=iid | fedsb r=4 partition.scheme=iid | fedit r=4"
    line = next(row for row in report.splitlines() if row.startswith(start))
    assert "| 5 | +0.02" in line and f"| {HOLDS} | {HOLDS} |" in line
    assert str(tmp_path) not in report  # names no path of this machine
