"""`tracking:`: TensorBoard, MLflow and Weights & Biases get every round's metrics and the config,
read back from what each wrote with its own reader (TensorBoard's event accumulator, MLflow's
client on its local store, the records of W&B's offline run file) and held to the run's own
metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import require_module

from fedsb.experiment.config import ConfigError, load_config
from fedsb.experiment.summary import read_metrics
from fedsb.experiment.tracking import ROUND_METRICS, TRACKERS, Tracker, tracking_problem
from fedsb.federation.inprocess import run_in_process

TINY = "tests/configs/tiny.yaml"


def test_an_unknown_tracker_is_a_one_line_config_error():
    accepted = "a list of 'tensorboard', 'mlflow', 'wandb'"
    with pytest.raises(ConfigError, match=rf"^tracking: got 'comet'; accepted: {accepted}$"):
        load_config(TINY, {"tracking": ["tensorboard", "comet"]})
    twice = r"^tracking: got \['tensorboard', 'tensorboard'\]; each tracker once$"
    with pytest.raises(ConfigError, match=twice):
        load_config(TINY, {"tracking": "tensorboard,tensorboard"})
    assert load_config(TINY, {"tracking": "tensorboard"}).tracking == ["tensorboard"]


def test_a_tracker_whose_package_is_missing_names_the_extra(monkeypatch):
    class Missing(Tracker):
        name, package, extra = "missing", "fedsb_no_such_package", "missing"

    monkeypatch.setitem(TRACKERS, "missing", Missing)
    assert tracking_problem(["missing"]) == ("'missing' needs the fedsb_no_such_package package "
                                             "(pip install 'fedsb[missing]')")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """One tiny run (2 rounds, the real apps in process) with all three trackers."""
    for module in ("tensorboard", "mlflow", "wandb"):
        require_module(module)
    run_dir = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
            patch.delenv(variable, raising=False)
        patch.setenv("WANDB_SILENT", "true")
        run_in_process({"config": TINY, "run-dir": str(run_dir),
                        "overrides": "tracking=[tensorboard, mlflow, wandb]"})
    return run_dir


def expected_rounds(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per round, the numbers metrics.jsonl holds that a tracker gets."""
    rows = {}
    for row in read_metrics(run_dir):
        values = {k: getattr(row, k) for k in ROUND_METRICS}
        rows[row.round] = {k: float(v) for k, v in values.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert sorted(rows) == [0, 1, 2] and "train_loss" in rows[1] and rows[1]["bytes_up"] > 0
    return rows


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_round(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    expected = expected_rounds(tracked_run)
    tags = set(events.Tags()["scalars"])
    for name in {k for row in expected.values() for k in row}:
        assert name in tags
        got = {e.step: e.value for e in events.Scalars(name)}  # float32 in the event file
        assert got == pytest.approx({r: row[name] for r, row in expected.items() if name in row}, rel=1e-6)
    test_accuracy = summary_of(tracked_run)["test_accuracy"]
    assert events.Scalars("summary/test_accuracy")[0].value == pytest.approx(test_accuracy)
    assert "method.name" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_mlflow_local_store_holds_every_round_and_the_config(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("fedsb").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    assert run.data.params["method.name"] == "fedsb" and run.data.params["federation.rounds"] == "2"
    for name, by_round in _by_metric(expected_rounds(tracked_run)).items():
        history = client.get_metric_history(run.info.run_id, name)
        assert {m.step: m.value for m in history} == pytest.approx(by_round, rel=1e-12)
    assert run.data.metrics["summary/test_accuracy"] == summary_of(tracked_run)["test_accuracy"]


@pytest.mark.slow
def test_wandb_offline_run_holds_every_round_and_the_summary(tracked_run):
    from wandb.proto import wandb_internal_pb2

    [run_file] = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary, config = {}, {}, {}
    for raw in wandb_records(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history[items["_step"]] = items
        elif kind == "summary":
            summary.update({item.key: json.loads(item.value_json)
                            for item in record.summary.update if item.key})
        elif kind == "run":  # the run's first record carries its config
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    expected = expected_rounds(tracked_run)
    assert sorted(history) == sorted(expected)
    for step, row in expected.items():
        assert {k: history[step][k] for k in row} == pytest.approx(row, rel=1e-12)
    assert summary["test_accuracy"] == summary_of(tracked_run)["test_accuracy"]
    assert config["method.name"] == "fedsb" and config["federation.rounds"] == 2


def _by_metric(rows: dict[int, dict[str, float]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for step, row in rows.items():
        for name, value in row.items():
            out.setdefault(name, {})[step] = value
    return out


def wandb_records(data: bytes) -> list[bytes]:
    """The records of a W&B run file, read independently of wandb: a 7-byte header (':W&B', magic,
    version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header
    (CRC-32C, length, type: 1 full, 2 first, 3 middle, 4 last), a block's tail under 7 bytes padding."""
    block, position, records, pending = 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records
