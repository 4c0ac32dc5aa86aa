"""A method is declared in one place: a throw-away method, defined here alone, registered, and run
through the real ServerApp and ClientApp (in-process grid) with no other file knowing its name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from fedsb.core.adapters import State, component_of, key
from fedsb.experiment.config import ConfigError, load_config
from fedsb.experiment.summary import RunSummary, read_metrics
from fedsb.federation.inprocess import run_in_process
from fedsb.methods import get_method, method_names, register, unregister
from fedsb.methods.base import FederatedMethod

TINY = "tests/configs/tiny.yaml"
ROOT = Path(__file__).resolve().parents[1]


class GradientFrozenA(FederatedMethod):
    """A: the top right singular vectors of the init gradient, frozen and sent once; clients train B."""

    name = "throwaway-grad-a"
    label = "Gradient-A LoRA"
    centralised_label = "Gradient-A LoRA (centralised)"
    init_gradients = True
    trainable = ("lora_B",)
    one_time = ("lora_A",)

    @classmethod
    def accepted_inits(cls) -> list[str]:
        return [cls.default_init]  # its own state replaces any init's: it accepts no other

    def initial_adapter_state(self, generator: torch.Generator,
                              gradients: Mapping[str, torch.Tensor] | None = None,
                              lr_eff: float | None = None) -> State:
        assert gradients is not None and lr_eff is not None
        state: State = {}
        for name, spec in self.specs.items():
            _, _, vh = torch.linalg.svd(gradients[name].double(), full_matrices=False)
            state[key(name, "lora_A")] = vh[: self.rank].float().contiguous()
            state[key(name, "lora_B")] = torch.zeros(spec.out_features, self.rank)
        return state


@pytest.fixture
def registered():
    register(GradientFrozenA)
    yield GradientFrozenA
    unregister(GradientFrozenA.name)


def test_an_unregistered_method_is_a_one_line_config_error():
    assert GradientFrozenA.name not in method_names()
    expected = f"method.name: got '{GradientFrozenA.name}'; accepted: one of 'fedit'"
    with pytest.raises(ConfigError, match=expected):
        load_config(TINY, {"method.name": GradientFrozenA.name})


def test_a_method_defined_in_a_test_file_runs_through_a_simulation(tmp_path, registered):
    assert get_method(registered.name) is registered
    _, run = run_in_process({"config": TINY, "run-dir": str(tmp_path), "method": registered.name})
    strategy, summary = run.strategy, RunSummary.read(tmp_path)
    assert summary.method == registered.name and summary.method_label == "Gradient-A LoRA"
    assert summary.init_source == "server" and summary.rounds_completed == 2  # it asked for gradients
    a_keys = [k for k in strategy.global_state if component_of(k) == "lora_A"]
    b_keys = [k for k in strategy.global_state if component_of(k) == "lora_B"]
    assert a_keys and b_keys
    for k in a_keys:  # the gradient init: orthonormal rows, and frozen (never uploaded, never averaged)
        a = strategy.global_state[k].double()
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5), k
    assert all(strategy.global_state[k].abs().sum() > 0 for k in b_keys)  # B trained and averaged
    # What it declared is what crossed the wire: B up, A down once (the meter's `init`), never again.
    meter = strategy.meter
    assert set(meter.by_component(direction="up", phase="train")) == {"lora_B", "head"}
    assert "init" in meter.by_component(round=1, direction="down")
    assert "init" not in meter.by_component(round=2, direction="down")
    rows = read_metrics(tmp_path)
    assert [r.round for r in rows] == [0, 1, 2] and rows[-1].accepted == [0, 1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == registered.name


# The suites that run every registered method (each parametrizes over the registry).
CONFORMANCE_SUITES = ("tests/test_methods.py", "tests/test_privacy.py", "tests/test_flower_app.py",
                      "tests/test_inits.py")


def pytest_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)


def with_method(test_id: str, old: str, new: str) -> str | None:
    """The test id with the method parameter `old` replaced by `new`; None if it has no such parameter."""
    head, _, params = test_id.partition("[")
    parts = params.removesuffix("]").split("-")
    if old not in parts:
        return None
    return f"{head}[{'-'.join(new if part == old else part for part in parts)}]"


@pytest.mark.slow
def test_a_method_registered_by_a_test_file_runs_through_every_conformance_suite():
    """`--with-method FILE::CLASS` registers the throw-away method before collection: it then gets every
    test that FFA-LoRA (the same declarations: B trained, A one-time, exact) gets in the suites, bar
    the offset inits' (test_inits.py), which it does not accept, and passes them all."""
    name = GradientFrozenA.name
    ffa = pytest_run("--collect-only", *CONFORMANCE_SUITES).stdout.splitlines()
    expected = sorted(renamed for test in ffa if not test.startswith("tests/test_inits.py")
                      and (renamed := with_method(test, "ffa", name)))
    result = pytest_run("--with-method", f"{Path(__file__).resolve()}::GradientFrozenA", "-k", name,
                        *CONFORMANCE_SUITES)
    assert result.returncode == 0, result.stdout[-5000:]
    passed = sorted(re.findall(r"^PASSED (\S+)", result.stdout, flags=re.MULTILINE))
    assert passed == expected
    assert {test.split("::")[0] for test in passed} == set(CONFORMANCE_SUITES) - {"tests/test_inits.py"}
