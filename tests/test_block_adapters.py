"""Bone and MoRA (fedsb/core/block_adapters.py, fedsb/methods/bone.py, fedsb/methods/mora.py).

The conformance suites also run both methods (tests/conftest.py METHOD_NAMES): exact aggregation
on every tiny architecture and over a bfloat16 base (test_methods), local steps that change every
trained tensor and no frozen one, the merge, DP per-sample gradients equal to one-at-a-time ones and
private training (test_privacy), meter = closed form and the export through the real apps
(test_flower_app). Here: what is particular to the two adapters.
"""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from conftest import NUM_LABELS, random_batch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.core.adapters import ModuleSpec, extract_state, key, load_state
from fedsb.core.block_adapters import BoneLayer, MoRALayer, mora_rank
from fedsb.core.models import find_target_modules, load_model
from fedsb.experiment.comm import count, head_shapes
from fedsb.experiment.config import load_config
from fedsb.federation.inprocess import run_in_process
from fedsb.methods import build_method

TINY = "tests/configs/tiny.yaml"


class MoRASharing(MoRALayer):
    """The authors' type 1: chunks summed (shared) before M; fedsb's config uses type 6."""

    mora_type = 1


def randomised(layer: nn.Module, seed: int) -> nn.Module:
    with torch.no_grad():
        for c in layer.held():
            w = layer.component(c)
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) / w.shape[-1] ** 0.5)
    return layer


BASES = {
    "linear": lambda: nn.Linear(24, 40),
    "linear-wide-in": lambda: nn.Linear(40, 24),
    "conv1d": lambda: Conv1D(40, 24),  # in 24, out 40, weight stored (in, out)
    "bfloat16": lambda: nn.Linear(24, 40).to(torch.bfloat16),
}


@pytest.mark.parametrize("layer_class", [BoneLayer, MoRALayer, MoRASharing])
@pytest.mark.parametrize("base", list(BASES))
def test_forward_equals_the_merged_weights(layer_class, base):
    torch.manual_seed(0)
    module = BASES[base]()
    layer = randomised(layer_class(module, 4, 1.0), seed=1)
    in_features = layer.in_features
    x = torch.randn(3, 5, in_features).to(module.weight.dtype)
    merged = (layer.base_weight() + layer.delta_weight()).to(module.weight.dtype)
    expected = x @ merged.T + module.bias
    out = layer(x)
    assert out.dtype == module.weight.dtype
    # bfloat16: the merged weight is rounded once to bfloat16, the adapter's output once (to ~0.4%).
    tol = 5e-6 if module.weight.dtype == torch.float32 else 2e-2
    assert ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item() < tol


@pytest.mark.parametrize("base", list(BASES))
def test_bone_per_sample_path_equals_its_weight_path(base):
    """Bone forms dW unless a hook (Opacus's, for per-sample gradients) is on its blocks' module; then it
    applies the blocks to the activations. Both give the same outputs and parameter gradients."""
    torch.manual_seed(0)
    layer = randomised(BoneLayer(BASES[base](), 4, 1.0), seed=1)
    layer.bone_block.weight.requires_grad_(True)
    x = torch.randn(3, 5, layer.base_weight().shape[1]).to(layer.base.weight.dtype)
    results = []
    for hooked in (False, True):
        handle = layer.bone_block.register_forward_hook(lambda *args: None) if hooked else None
        layer.bone_block.weight.grad = None
        out = layer(x)
        out.float().square().sum().backward()
        results.append((out.detach().float(), layer.bone_block.weight.grad.clone()))
        if handle is not None:
            handle.remove()
    tolerance = 2e-2 if base == "bfloat16" else 1e-5
    assert torch.allclose(results[0][0], results[1][0], rtol=tolerance, atol=tolerance)
    assert torch.allclose(results[0][1], results[1][1], rtol=tolerance, atol=tolerance * 10)


def test_mora_side_is_the_authors_and_even_for_rope():
    # round(sqrt((m + n) r)): LoRA's r (m + n) parameters in a square r^ x r^ matrix.
    assert mora_rank(ModuleSpec("q", 32, 32, False), 4) == 16  # sqrt(256)
    assert mora_rank(ModuleSpec("up", 48, 32, False), 4) == 18  # sqrt(320) = 17.9
    assert mora_rank(ModuleSpec("q", 32, 32, False), 2, mora_type=1) == 11  # sqrt(128) = 11.3
    assert mora_rank(ModuleSpec("q", 32, 32, False), 2, mora_type=6) == 10  # RoPE halves need even r^
    layer = MoRALayer(nn.Linear(40, 24), 4, 1.0)  # r^ = round(sqrt(256)) = 16, 40 = 3 chunks less 8
    assert (layer.side, layer.chunks) == (16, 3)


def test_mora_delta_is_of_high_rank():
    """MoRA's point: r^2 = LoRA's parameters (r = 4), at a far higher rank: r^ = 16 when the chunks
    share M (type 1), 2 x 16 = 32, full, when each chunk is rotated differently first (type 6)."""
    rope = randomised(MoRALayer(nn.Linear(32, 32), 4, 1.0), seed=2)
    sharing = randomised(MoRASharing(nn.Linear(32, 32), 4, 1.0), seed=2)
    assert torch.linalg.matrix_rank(rope.delta_weight().double()).item() == 32
    assert torch.linalg.matrix_rank(sharing.delta_weight().double()).item() == 16


def test_bone_layer_agrees_with_peft_miss_bat():
    """PEFT's MiSS with init_weights='bat' (its Bone) as an independent oracle, on the same blocks."""
    from peft import MissConfig, get_peft_model

    model = load_model("tiny-bert", num_labels=NUM_LABELS, seed=0)
    with torch.no_grad():
        pretrained = model(**random_batch(0)).logits
    peft_model = get_peft_model(copy.deepcopy(model), MissConfig(
        r=4, init_weights="bat", target_modules=find_target_modules(model), modules_to_save=["classifier"]))
    method = build_method("bone", model, find_target_modules(model), 4, 4.0)
    g = torch.Generator().manual_seed(3)
    state = {k: 0.1 * torch.randn(v.shape, generator=g)
             for k, v in extract_state(model, ("bone_block",)).items()}
    load_state(model, state)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name in method.specs:
            params[f"base_model.model.{name}.miss_block.default"].copy_(state[key(name, "bone_block")])
        batch = random_batch(0)
        ours, theirs = model(**batch).logits, peft_model(**batch).logits
    assert (ours - pretrained).abs().max() > 1e-3  # the blocks change the model
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # And dW itself, against PEFT's get_delta_weight.
    name = next(iter(method.specs))
    peft_layer = peft_model.get_submodule(f"base_model.model.{name}")
    ours_delta = model.get_submodule(name).delta_weight()
    theirs_delta = peft_layer.get_delta_weight("default", peft_layer.get_base_layer().weight.detach())
    torch.testing.assert_close(ours_delta, theirs_delta, atol=1e-6, rtol=1e-5)


def test_closed_form_upload_by_hand():
    """tiny-bert, 2 layers, per layer: query, key, value, attention.output.dense (32 x 32),
    intermediate.dense (48 x 32), output.dense (32 x 48). Rank 4; float32 (4 bytes)."""
    model = load_model("tiny-bert", num_labels=NUM_LABELS, seed=0)
    head = sum(torch.Size(s).numel() for s in head_shapes(model).values())
    bone = count(model, "bone", 4)
    # Bone: (m / b) blocks of b x b = m b per module.
    assert bone.components("up") == {"bone_block": 2 * (4 * 32 + 48 + 32) * 4, "head": head}
    assert bone.bytes("up") == (1664 + head) * 4 and bone.init_bytes("down") == 0
    mora = count(model, "mora", 4)
    # MoRA: r^ = 16 for 32 x 32, 18 for 48 x 32 and 32 x 48.
    assert mora.components("up") == {"mora_M": 2 * (4 * 16 ** 2 + 2 * 18 ** 2), "head": head}
    assert mora.bytes("up") == (3344 + head) * 4 and mora.components("down") == mora.components("up")


@pytest.mark.parametrize(("method", "rank", "message"), [
    ("bone", 5, r"method.rank: got 5; accepted: Bone's block size, a common divisor of every target's "
                r"dimensions \(bert.encoder.layer.0.attention.self.query is 32 x 32\)"),
    # round(sqrt(64 * 16)) = 32 fits the 32 x 32 modules; round(sqrt(80 * 16)) = 36 > 32 inputs does not.
    ("mora", 16, r"method.rank: got 16; accepted: a LoRA rank whose MoRA side .* lies in 2..n for every "
                 r"target \(bert.encoder.layer.0.intermediate.dense is 48 x 32: r\^ = 36\)"),
])
def test_a_rank_the_shapes_rule_out_is_a_one_line_check_error(method, rank, message):
    from fedsb.experiment.plan import CheckError, check_plan

    config = load_config(TINY, {"method.name": method, "method.rank": rank})
    with pytest.raises(CheckError, match=message) as err:
        check_plan(config)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["bone", "mora"])
def test_in_process_run_meters_the_closed_form(tmp_path, method):
    _, run = run_in_process({"config": TINY, "run-dir": str(tmp_path), "method": method})
    strategy = run.strategy
    counts = count(load_model("tiny-bert", num_labels=4, seed=0), method, 4)
    meter = strategy.meter
    assert counts.init_bytes("down") == 0  # nothing fixed: the trained tensor goes down every round
    for server_round in (1, 2):
        for client in strategy.rounds[server_round].cohort:
            assert meter.client_components(server_round, client, "up") == counts.component_bytes("up")
            assert meter.client_components(server_round, client, "down") == counts.component_bytes("down")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == method and summary["rounds_completed"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bone", "mora"])
def test_real_flwr_run_is_the_in_process_run(tmp_path, method):
    """Through `flwr run` (a SuperLink, client processes): the same meter entries, summary and export."""
    from fedsb.ops.launch import run_simulation
    from server.app import APP_DIR

    lines: list[str] = []
    outcome = run_simulation(APP_DIR / TINY, {"output_dir": str(tmp_path / "flwr"), "method.name": method},
                             echo=lines.append)
    assert outcome.ok, (outcome.status, outcome.details, lines[-20:])
    _, run = run_in_process({"config": str(APP_DIR / TINY), "run-dir": str(tmp_path / "inprocess"),
                             "method": method}, client_threads=1)
    real, local = outcome.run_dir, run.run_dir
    assert sorted((local / "comm.csv").read_text().splitlines()) == \
        sorted((real / "comm.csv").read_text().splitlines())
    real_summary, local_summary = (json.loads((d / "summary.json").read_text()) for d in (real, local))
    for name in ("run_dir", "wall_s"):
        real_summary.pop(name), local_summary.pop(name)
    assert real_summary == local_summary
    # Every client's upload in every round, as metered through Flower, is the closed form to the byte.
    expected = count(load_model("tiny-bert", num_labels=4, seed=0), method, 4).component_bytes("up")
    metered: dict[tuple[str, str], dict[str, int]] = {}
    for row in csv.DictReader((real / "comm.csv").read_text().splitlines()):
        if row["phase"] == "train" and row["direction"] == "up":
            per = metered.setdefault((row["round"], row["client"]), {})
            per[row["component"]] = per.get(row["component"], 0) + int(row["bytes"])
    assert len(metered) == 2 * 4 and all(m == expected for m in metered.values())
