"""The two engines run the same run: a Flower simulation (`engine: flower`, through a private SuperLink
and Ray) and the in-process grid with its clients in worker processes (`engine: inprocess`) give every
registered method the same metrics every round, the same comm.csv, the same summary and the same
exported weights (the PEFT adapter, or the merged model), to the bit. Both go through `fedsb sweep`, one
sweep per engine (slow: real Flower runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedsb.analysis.sweep.runner import run_sweep
from fedsb.analysis.sweep.table import COMPLETED, read_rows
from fedsb.experiment.summary import read_metrics
from fedsb.methods import method_names

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
TIMING = ("wall_s", "elapsed_s", "run_dir")  # the only fields allowed to differ


def sweep_file(tmp_path: Path, engine: str) -> Path:
    path = tmp_path / f"{engine}.yaml"
    data = {"base": str(TINY), "output_dir": str(tmp_path / engine), "engine": engine,
            "grid": {"method.name": method_names()}}
    path.write_text(f"# Run: fedsb sweep {path.name}\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def metric_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.to_dict().items() if k not in TIMING} for row in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("engines")
    out = {}
    for engine in ("flower", "inprocess"):
        lines: list[str] = []
        result = run_sweep(sweep_file(tmp_path, engine), echo=lines.append)
        assert not result.failed, lines[-30:]
        assert f"fedsb sweep: engine {engine}" in lines
        rows = read_rows(result.csv_path)[1]
        out[engine] = {r["method"]: result.spec.output_dir / r["run_dir"] for r in rows
                       if r["status"] == COMPLETED}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", method_names())
def test_the_in_process_engine_runs_the_flower_run_to_the_bit(engines, method):
    flower, local = engines["flower"][method], engines["inprocess"][method]
    assert metric_rows(local) == metric_rows(flower) and len(metric_rows(flower)) == 3  # rounds 0, 1, 2
    assert (local / "comm.csv").read_text() == (flower / "comm.csv").read_text()
    summaries = [json.loads((d / "summary.json").read_text()) for d in (local, flower)]
    for summary in summaries:
        for name in TIMING:
            summary.pop(name, None)
    assert summaries[0] == summaries[1]
    assert summaries[1]["method"] == method and summaries[1]["rounds_completed"] == 2
    # The exported weights: a PEFT adapter (adapter/), or the merged model where PEFT has none (merged/).
    exported = sorted(p.relative_to(flower) for folder in ("adapter", "merged")
                      for p in (flower / folder).glob("*.safetensors"))
    assert exported and exported == sorted(p.relative_to(local) for folder in ("adapter", "merged")
                                           for p in (local / folder).glob("*.safetensors"))
    for name in exported:
        tensors = [load_file(d / name) for d in (local, flower)]
        assert tensors[0].keys() == tensors[1].keys() and len(tensors[1]) > 0
        for k, value in tensors[1].items():
            assert torch.equal(tensors[0][k], value), (name, k)
    assert (local / "run.log").is_file() and "round 2" in (local / "run.log").read_text()


@pytest.mark.slow
def test_the_in_process_engine_checks_writes_and_refuses_to_rerun_a_finished_run(tmp_path):
    """`fedsb run --engine inprocess`: a bad config stops before anything starts; a good one writes its
    run directory and log; resuming a finished run does nothing (a stopped one is resumed from its
    checkpoint by the same server code as under Flower: tests/test_resume.py)."""
    from fedsb.ops.launch import run_in_process_engine

    with pytest.raises(ValueError, match=r"method\.rank: got 0"):
        run_in_process_engine(TINY, {"output_dir": str(tmp_path), "method.rank": 0})
    assert not any(tmp_path.iterdir())
    lines: list[str] = []
    outcome = run_in_process_engine(TINY, {"output_dir": str(tmp_path), "method.name": "ffa"},
                                    stream=False, echo=lines.append)
    assert outcome.ok, (outcome, lines[-5:])
    processes = min(os.cpu_count() or 1, 4)  # one per core, at most one per client (tiny.yaml has 4)
    assert f"in-process engine ({processes} client process(es))" in lines[0]
    assert len(metric_rows(outcome.run_dir)) == 3
    assert "round 2: val accuracy" in (outcome.run_dir / "run.log").read_text()
    again = run_in_process_engine(None, resume=outcome.run_dir, echo=lines.append)
    assert again.ok and again.details == "already finished"
