"""The adapter inits beside the aggregation (docs/architecture.md section 3): OLoRA, PiSSA and LoRA-GA,
each cross-checked against PEFT (>= 0.22, the project's floor) on the same tiny model (same weights,
same gradient); the model unchanged at step 0; exactness under every LoRA-based method; the meter
against the closed form; the PEFT export; and the config's one-line errors.

Where fedsb deliberately differs from PEFT, the test says so and bounds the difference:
- SVDs and QRs in float64 (PEFT: float32), and a fixed sign for each singular pair or QR column (an
  SVD's signs are arbitrary): factors are compared after aligning signs, to 1e-3 (PiSSA's float32 SVD
  in PEFT) or 1e-5 (OLoRA's QR).
- OLoRA on GPT-2's Conv1D: PEFT's olora_init factors the stored weight, which Conv1D keeps as (in, out),
  without transposing (so it factors W0^T, and on a non-square Conv1D its factors do not fit the
  layer). fedsb factors W0 (out x in), and is compared with PEFT on Linear copies of those modules.
- LoRA-GA's scale: fedsb follows the authors' code (A = V_{1..r}^T f, B = U_{r+1..2r} f, with
  f = m^(1/4) / sqrt(gamma), m the out features); PEFT scales A by 1 and B by S_{r+1..2r} f. So
  fedsb's A is PEFT's times f, and fedsb's B is PEFT's divided by the gradient's singular values
  S_{r+1..2r}. (PEFT before 0.22 took m from a Conv1D's stored weight, its in features; 0.22 takes the
  out features, as the authors do, and is the floor in pyproject.toml.)
- Randomized SVD on large modules (min(m, n) >= 1024) for PiSSA and LoRA-GA: bounded by
  test_pissa_on_a_large_module_is_within_the_randomized_svd_bound (the base offset compensates exactly
  whatever the SVD).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import NUM_LABELS, random_batch
from torch import nn

from fedsb.core.adapters import effective_weights, extract_state, key, load_state, merge_adapters
from fedsb.core.init import LORA_GA_GAMMA, accumulate_gradients, pissa_init
from fedsb.core.init_choices import INITS, get_init
from fedsb.core.models import find_target_modules, load_model
from fedsb.experiment.comm import closed_form, count, head_shapes
from fedsb.experiment.config import ConfigError, load_config
from fedsb.experiment.summary import read_metrics
from fedsb.federation.inprocess import run_in_process
from fedsb.methods import build_method, get_method, method_names
from fedsb.training.local import train_local

RANK, ALPHA = 8, 16.0  # r = 8: PEFT's LoRA-GA sketch, q = min(4r, min(m, n)), spans every tiny module
OFFSET_INITS = ("olora", "pissa", "lora_ga")  # the inits that take their product out of the frozen weight
LORA_INITS = ("kaiming", *OFFSET_INITS)
# The methods that accept the offset inits (each declares its inits): the LoRA-based ones.
LORA_METHODS = tuple(name for name in method_names()
                     if set(OFFSET_INITS) <= set(get_method(name).accepted_inits()))
GRADIENT_EXAMPLES = 32  # enough for every tiny module's gradient to have rank >= 2r
TINY = "tests/configs/tiny.yaml"
CLIENT_WEIGHTS = (10.0, 30.0, 60.0)


def setup(arch: str, init: str, method_name: str = "fedit"):
    """A tiny model with the method's adapters and the init's global state loaded; also the pristine
    base model (a copy taken before injection) and the init gradient (None for a weights-only init)."""
    model = load_model(arch, num_labels=NUM_LABELS, seed=0)
    base = copy.deepcopy(model)
    targets = find_target_modules(model)
    method = build_method(method_name, model, targets, RANK, ALPHA, init=init)
    gradients = None
    if method.init_gradients:
        gradients = accumulate_gradients(model, targets, [gradient_batch()], GRADIENT_EXAMPLES)
    state = method.initial_state(model, torch.Generator().manual_seed(0), gradients, lr_eff=1e-3)
    load_state(model, state)
    return model, method, state, base, gradients


def gradient_batch() -> dict:
    return random_batch(7, size=GRADIENT_EXAMPLES)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def align_rows(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The signs (+-1 per row) that best align x's rows with the reference's."""
    signs = torch.sign((x.double() * reference.double()).sum(dim=1))
    signs[signs == 0] = 1
    return signs.to(x.dtype)


# --- each init against PEFT's -------------------------------------------------------------------------

def peft_adapters(base: nn.Module, targets: list[str], init: str, conv1d: bool) -> dict[str, dict]:
    """PEFT's own init on a copy of the base model: per module lora_A, lora_B, the modified base weight
    (out x in) and, for LoRA-GA, the gradient PEFT estimated."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    model = copy.deepcopy(base)
    options = {"lora_ga_config": LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16)} \
        if init == "lora_ga" else {}
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=init,
                        fan_in_fan_out=conv1d, **options)
    gradients = {}
    if init == "lora_ga":
        batch = gradient_batch()

        def train_step() -> None:
            # PEFT's estimate_gradients puts the model in train mode; fedsb's gradient is taken without
            # dropout (deterministic), so dropout goes off here too. One backward of the summed loss:
            # PEFT divides by the number of backward calls (1), so its gradient is fedsb's per-sample sum.
            model.eval()
            (model(**batch).loss * GRADIENT_EXAMPLES).backward()

        preprocess_loraga(model, config, train_step)
        for name in targets:
            grad = model.get_submodule(name)._peft_loraga_grad
            gradients[name] = (grad.T if conv1d else grad).clone()
    peft_model = get_peft_model(model, config)
    out = {}
    for name in targets:
        layer = peft_model.base_model.model.get_submodule(name)
        weight = layer.get_base_layer().weight.detach()
        out[name] = {"A": layer.lora_A["default"].weight.detach(),
                     "B": layer.lora_B["default"].weight.detach(),
                     "W_res": weight.T if conv1d else weight, "gradient": gradients.get(name)}
    return out


class LinearCopies(nn.Module):
    """nn.Linear copies (out x in) of a model's target modules, for PEFT's OLoRA on GPT-2's Conv1D."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {name: f"m{i}" for i, name in enumerate(weights)}
        for name, weight in weights.items():
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            layer.weight.data = weight.clone()
            setattr(self, self.names[name], layer)


def fedsb_offset_base(model: nn.Module, method, state: dict, name: str) -> torch.Tensor:
    """fedsb's modified base weight W0 - s B0 A0 (out x in), from the pretrained W0 it keeps untouched."""
    w0 = model.get_submodule(name).base_weight()
    return w0 - method.scale * state[key(name, "lora_B0")] @ state[key(name, "lora_A0")]


@pytest.mark.parametrize("init", OFFSET_INITS)
def test_each_init_equals_peft_on_the_same_model(arch, init):
    model, method, state, base, gradients = setup(arch, init)
    targets = list(method.specs)
    conv1d = any(spec.conv1d for spec in method.specs.values())
    assert any(s.out_features != s.in_features for s in method.specs.values())  # non-square modules too
    if init == "olora" and conv1d:  # PEFT's OLoRA ignores fan_in_fan_out: compare on Linear copies
        weights = {name: model.get_submodule(name).base_weight() for name in targets}
        copies = LinearCopies(weights)
        peft = {name: value for name, value in zip(
            targets, peft_adapters(copies, list(copies.names.values()), init, False).values(), strict=True)}
    else:
        peft = peft_adapters(base, targets, init, conv1d)
    worst = {"A": 0.0, "B": 0.0, "W_res": 0.0}
    for name in targets:
        a, b = state[key(name, "lora_A")], state[key(name, "lora_B")]
        p = peft[name]
        assert a.shape == p["A"].shape and b.shape == p["B"].shape
        if init == "lora_ga":
            # The same gradient: PEFT's estimate is fedsb's accumulated one.
            assert rel_err(gradients[name], p["gradient"]) < 1e-5, name
            # The stated scale difference (module docstring): undo it on PEFT's factors.
            spec = method.specs[name]
            singular = torch.linalg.svdvals(gradients[name].double())[RANK:2 * RANK].float()
            factor = spec.out_features ** 0.25 / math.sqrt(LORA_GA_GAMMA)
            peft_a, peft_b = p["A"] * factor, p["B"] / singular
            a_signs, b_signs = align_rows(a, peft_a), align_rows(b.T, peft_b.T)  # two singular index sets
        else:
            peft_a, peft_b = p["A"], p["B"]
            a_signs = b_signs = align_rows(a, peft_a)  # B's column i and A's row i form one pair
        peft_a, peft_b = a_signs[:, None] * peft_a, peft_b * b_signs
        expected_w_res = p["W_res"]
        if init == "lora_ga":  # PEFT's W_res with the authors' factors (W0 is the same model's)
            expected_w_res = p["W_res"] + method.scale * (p["B"] @ p["A"] - peft_b @ peft_a)
        errors = {"A": rel_err(a, peft_a), "B": rel_err(b, peft_b),
                  "W_res": rel_err(fedsb_offset_base(model, method, state, name), expected_w_res)}
        worst = {k: max(v, errors[k]) for k, v in worst.items()}
    tolerance = {"olora": 1e-5, "pissa": 1e-3, "lora_ga": 1e-3}[init]
    print(f"{arch} {init}: largest relative error against PEFT: " + ", ".join(
        f"{k} {v:.1e}" for k, v in worst.items()))
    assert max(worst.values()) < tolerance, worst


def test_pissa_on_a_large_module_is_within_the_randomized_svd_bound():
    """min(m, n) >= 1024: PiSSA's SVD is randomized (Halko et al., 4 power iterations; PEFT's exact
    'pissa' takes a full SVD). On a slowly decaying spectrum (sigma_i ~ i^-1/2, as pretrained weights
    have) its product is within 0.01% of the optimal rank-r error (measured: 2e-6), and the base offset
    compensates exactly whatever the SVD."""
    g = torch.Generator().manual_seed(0)
    m, n = 1100, 1030
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    weight = ((u * torch.arange(1, n + 1, dtype=torch.float64) ** -0.5) @ v.T).float()
    rank, scale = 8, 2.0
    state = pissa_init({"m": weight}, rank, scale, torch.Generator().manual_seed(1))
    product = scale * state["m.lora_B"].double() @ state["m.lora_A"].double()
    singular = torch.linalg.svdvals(weight.double())
    assert (weight.double() - product).norm() <= 1.0001 * singular[rank:].norm()


@pytest.mark.parametrize("init", OFFSET_INITS)
def test_inits_are_deterministic_and_leave_the_global_random_state_alone(init):
    model, method, state, _, gradients = setup("tiny-llama", init)  # loading a model seeds torch
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = method.initial_state(model, torch.Generator().manual_seed(0), gradients)
    assert torch.equal(torch.rand(3), expected)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)


# --- step 0: the base offset compensates --------------------------------------------------------------

@pytest.mark.parametrize("method_name", LORA_METHODS)
@pytest.mark.parametrize("init", OFFSET_INITS)
def test_the_model_is_unchanged_at_step_0(arch, init, method_name):
    model, method, state, base, _ = setup(arch, init, method_name)
    batch = random_batch(11)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = base(**inputs).logits
        logits = model(**inputs).logits
    assert torch.allclose(logits, expected, rtol=0, atol=1e-6)
    # The init is not trivial: B0 A0 is large, and the effective weight W0 - s B0 A0 + s B A is W0.
    for name, weight in effective_weights(model).items():
        w0 = model.get_submodule(name).base_weight()
        offset = method.scale * state[key(name, "lora_B0")] @ state[key(name, "lora_A0")]
        assert offset.norm() > 1e-3 * w0.norm()
        assert rel_err(weight, w0) < 1e-6, name
    with torch.no_grad():  # and merging folds it back to W0
        merged = merge_adapters(model)(**inputs).logits
    assert torch.allclose(merged, expected, rtol=0, atol=1e-5)


# --- exactness with each init ---------------------------------------------------------------------------

def train_clients(model, method, global_state, steps: int = 3):
    uploads, weights = [], []
    for client in range(len(CLIENT_WEIGHTS)):
        load_state(model, global_state)
        train_local(model, method, [random_batch(client)], steps=steps, lr=1e-2)
        uploads.append(method.upload(extract_state(model)))
        weights.append(effective_weights(model))
    return uploads, weights


def weighted_mean(per_client: list[dict]) -> dict:
    w = torch.tensor(CLIENT_WEIGHTS, dtype=torch.float64)
    w = w / w.sum()
    return {name: sum(wi * c[name].double() for wi, c in zip(w, per_client, strict=True)).float()
            for name in per_client[0]}


@pytest.mark.parametrize("method_name", ["ffa", "fedex"])
@pytest.mark.parametrize("init", LORA_INITS)
def test_exact_methods_stay_exact_with_every_init(arch, init, method_name):
    """FFA-LoRA with a non-zero B0 (averaging B under a shared frozen A is exact whatever B0) and
    FedEx-LoRA: the aggregated effective weight is the weighted mean of the clients'."""
    model, method, state, _, _ = setup(arch, init, method_name)
    uploads, client_weights = train_clients(model, method, state)
    load_state(model, method.aggregate(state, uploads, CLIENT_WEIGHTS))
    aggregated, expected = effective_weights(model), weighted_mean(client_weights)
    for name in method.specs:
        assert rel_err(aggregated[name], expected[name]) < 1e-5, name
    some = next(iter(method.specs))
    assert rel_err(client_weights[0][some], client_weights[2][some]) > 1e-7  # the clients diverged


@pytest.mark.parametrize("init", LORA_INITS)
def test_fedit_gap_still_equals_the_fedex_residual(arch, init):
    model, fedit, state, _, _ = setup(arch, init, "fedit")
    uploads, client_weights = train_clients(model, fedit, state)
    load_state(model, fedit.aggregate(state, uploads, CLIENT_WEIGHTS))
    aggregated, expected = effective_weights(model), weighted_mean(client_weights)
    fedex = get_method("fedex")(fedit.specs, RANK, ALPHA, init=init)
    fedex_state = fedex.aggregate(
        {**state, **{key(n, "residual"): torch.zeros(s.weight_layout) for n, s in fedit.specs.items()}},
        uploads, CLIENT_WEIGHTS)
    for name, spec in fedit.specs.items():
        residual = fedex_state[key(name, "residual")]
        residual = residual.T if spec.conv1d else residual
        gap = expected[name] - aggregated[name]
        assert gap.norm() > 0
        assert rel_err(residual, gap) < 1e-4, name


# --- what a client holds, and what it costs -------------------------------------------------------------

@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_every_client_computes_the_same_local_init_as_the_server(init):
    """A local init is computed by each process from the pretrained weights: two fresh Workers (two
    client processes' worth, with different thread counts) hold exactly the server's fixed tensors."""
    from fedsb.experiment.worker import Worker

    config = load_config(TINY, {"method.name": "ffa", "method.init.name": init})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        server = Worker(config)
        initial = server.initial_state()
        torch.set_num_threads(2)
        clients = [Worker(config).computed_fixed_state for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    method = server.method
    assert set(method.fixed) == {"lora_A", "lora_A0", "lora_B0"} and method.sent_once == ()
    assert method.download(initial, first_time=True) == method.download(initial, first_time=False)
    for computed in clients:
        assert computed and set(computed) == {k for k in initial if k.rsplit(".", 1)[-1] in method.fixed}
        for k, value in computed.items():
            assert torch.equal(value, initial[k]), k


def test_the_closed_form_init_bytes_of_each_init():
    """OLoRA and PiSSA: no init bytes under any method (each client computes them). LoRA-GA: B0 and A0
    down once (FFA-LoRA's A0 is its frozen A, not sent twice), and with init.source=clients each client's
    dense gradient up once, as Fed-SB's LoRA-SB."""
    model = load_model("tiny-gpt2", num_labels=NUM_LABELS)
    targets = find_target_modules(model)
    specs = build_method("fedit", copy.deepcopy(model), targets, RANK, ALPHA).specs
    r, mn = RANK, sum(s.out_features * s.in_features for s in specs.values())
    a_params = sum(r * s.in_features for s in specs.values())
    b_params = sum(s.out_features * r for s in specs.values())
    for method_name in LORA_METHODS:
        for init in ("olora", "pissa"):
            counts = count(model, method_name, RANK, init=init, init_gradients=True)
            assert counts.init == init
            assert counts.init_params("down") == 0 and counts.init_params("up") == 0, (method_name, init)
        ga = count(model, method_name, RANK, init="lora_ga", init_gradients=True)
        assert ga.init_params("up") == mn
        assert ga.init_params("down") == a_params + b_params  # FedIT, FedEx: A0, B0; FFA-LoRA: A, B0
        assert count(model, method_name, RANK, init="lora_ga").init_params("up") == 0  # source=server
    assert count(model, "ffa", RANK).init_params("down") == a_params  # kaiming: FFA-LoRA's A, as before
    assert count(model, "fedsb", RANK, init_gradients=True).init_params("up") == mn


def test_fedsb_comm_names_the_init_and_shows_no_init_bytes_for_a_local_init(capsys):
    from fedsb.cli import main as fedsb_main

    assert fedsb_main(["comm", "--model", "tiny-bert", "--init", "pissa", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["counts"]
    assert report["fedit"]["init"] == "pissa" and report["ffa"]["init"] == "pissa"
    assert report["fedsb"]["init"] == "lora_sb"  # Fed-SB keeps its LoRA-SB
    assert report["ffa"]["down"]["init_params"] == 0 and report["ffa"]["up"]["init_params"] == 0
    assert fedsb_main(["comm", "--model", "tiny-bert", "--init", "lora_ga", "--init-source", "clients"]) == 0
    text = capsys.readouterr().out
    assert "lora_ga" in text and "init" in text.splitlines()[5]


# --- through the real ServerApp and ClientApp: the meter and the export ------------------------------

# (method, init, init.source): every init with a base offset under every LoRA-based method (kaiming's
# runs are tests/test_flower_app.py's); LoRA-GA's gradient from the clients, and once from the server.
RUNS = {f"{method}-{init}": (method, init, "server" if (method, init) == ("fedex", "lora_ga") else "clients")
        for method in LORA_METHODS for init in OFFSET_INITS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for label, (method, init, source) in RUNS.items():
        run_dir = tmp_path_factory.mktemp(label)
        overrides = (f"method.init.name={init}; method.init.source={source}; federation.rounds=3; "
                     "federation.clients_per_round=0.5; method.rank=4")
        grid, run = run_in_process({"config": TINY, "run-dir": str(run_dir), "overrides": overrides,
                                    "method": method}, 4)
        out[label] = (run, run_dir)
    return out


@pytest.mark.parametrize("label", RUNS)
def test_meter_equals_the_closed_form_for_each_init(runs, label):
    from fedsb.experiment.worker import get_worker

    run, _ = runs[label]
    strategy = run.strategy
    method = strategy.method
    assert method.init.name == RUNS[label][1]
    worker = get_worker(load_config(TINY, {"method.name": method.name, "method.init.name": method.init.name}))
    gradients_up = RUNS[label][2] == "clients"
    counts = closed_form(method, head=head_shapes(worker.model), init_gradients=gradients_up)
    meter, seen = strategy.meter, set()
    for server_round in (1, 2, 3):
        for client in strategy.rounds[server_round].cohort:
            first = client not in seen
            assert meter.client_components(server_round, client, "down") == \
                counts.component_bytes("down", first_time=first)
            assert meter.client_components(server_round, client, "up") == counts.component_bytes("up")
        seen.update(strategy.rounds[server_round].cohort)
    for client in strategy.rounds[1].cohort:  # round 0: the gradient upload, only with source=clients
        assert meter.total(round=0, client=client, direction="up") == counts.init_bytes("up")
    if method.init.local:
        assert counts.init_bytes("down") == 0 and meter.total(round=0) == 0
        assert all(e.component != "init" for e in meter.entries)  # the init sent nothing
    else:  # LoRA-GA: B0 and A0 down once; the gradient up only from the clients
        assert counts.init_bytes("down") > 0 and (counts.init_bytes("up") > 0) == gradients_up
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["init"] == method.init.name
    assert summary["init_source"] == (RUNS[label][2] if method.init_gradients else None)


@pytest.mark.parametrize("label", RUNS)
def test_the_peft_export_reproduces_the_final_evaluation(runs, label):
    """The adapter is relative to the ORIGINAL base weights (rank 2r: [B, -B0] [A; A0]), so PEFT loads it
    onto the pretrained model, as it does its own converted PiSSA, OLoRA and LoRA-GA adapters."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedsb.data.tokens import iterate_batches
    from fedsb.experiment.worker import get_worker
    from fedsb.training.local import evaluate

    run, run_dir = runs[label]
    final = read_metrics(run_dir)[-1]
    worker = get_worker(load_config(TINY))
    batches = list(iterate_batches(worker.validation_tokens, 32, shuffle=False))
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8  # rank 4, alpha 4: doubled, the same scale
    peft_model = PeftModel.from_pretrained(load_model("tiny-bert", num_labels=4, seed=0), run_dir / "adapter")
    exact = peft_model
    if run.strategy.method.residual:  # FedEx-LoRA: the dense residual is in the merged model
        exact = AutoModelForSequenceClassification.from_pretrained(run_dir / "merged")
    result = evaluate(exact, batches)
    assert result["accuracy"] == final.val_accuracy
    assert result["loss"] == pytest.approx(final.val_loss, rel=1e-5)
    assert "ORIGINAL base weights" in (run_dir / "adapter" / "FEDSB_README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "init", "source"), [("ffa", "pissa", "server"),
                                                       ("fedit", "lora_ga", "clients")])
def test_real_flwr_run_with_an_init_is_the_in_process_run(tmp_path, method, init, source):
    """Through `flwr run`, each client process computes PiSSA itself, or receives LoRA-GA's B0 and A0 once
    after uploading its gradient: the run equals the in-process one to the bit."""
    from safetensors.torch import load_file

    from fedsb.experiment.run_config import format_override_list
    from fedsb.ops.launch import run_simulation
    from server.app import APP_DIR

    overrides = {"method.name": method, "method.init.name": init, "method.init.source": source}
    lines: list[str] = []
    outcome = run_simulation(APP_DIR / TINY, {"output_dir": str(tmp_path / "flwr"), **overrides},
                             echo=lines.append)
    assert outcome.ok, (outcome.status, outcome.details, lines[-20:])
    _, run = run_in_process({"config": str(APP_DIR / TINY), "run-dir": str(tmp_path / "inprocess"),
                             "overrides": format_override_list(overrides)}, client_threads=1)
    real, local = outcome.run_dir, run.run_dir
    # The same meter entries; round 0's init uploads are recorded in the order the replies arrive.
    assert sorted((local / "comm.csv").read_text().splitlines()) == \
        sorted((real / "comm.csv").read_text().splitlines())
    real_summary, local_summary = (json.loads((d / "summary.json").read_text()) for d in (real, local))
    assert real_summary["init"] == init
    for name in ("run_dir", "wall_s"):
        real_summary.pop(name), local_summary.pop(name)
    assert real_summary == local_summary
    real_adapter = load_file(real / "adapter" / "adapter_model.safetensors")
    local_adapter = load_file(local / "adapter" / "adapter_model.safetensors")
    assert real_adapter.keys() == local_adapter.keys()
    assert all(torch.equal(real_adapter[k], local_adapter[k]) for k in real_adapter)


# --- the config ------------------------------------------------------------------------------------------

def test_each_method_accepts_the_inits_of_its_adapter_kind():
    for method_name in LORA_METHODS:
        assert get_method(method_name).accepted_inits() == list(LORA_INITS)
        assert get_method(method_name).init_for(None).name == "kaiming"
    assert get_method("fedsb").accepted_inits() == ["lora_sb"]
    assert get_method("bone").accepted_inits() == ["bone_zeros"]
    assert get_method("mora").accepted_inits() == ["mora_zeros"]
    assert set(INITS) == {*LORA_INITS, "lora_sb", "bone_zeros", "mora_zeros"}
    assert [n for n, c in INITS.items() if c.local] == ["olora", "pissa"]
    assert [n for n, c in INITS.items() if c.needs_gradients] == ["lora_ga", "lora_sb"]
    assert all(c.paper for c in INITS.values())


def test_existing_configs_keep_their_default_init():
    config = load_config(TINY)
    assert config.method.init.name is None
    for method_name in ("fedit", "ffa", "fedex", "fedsb"):
        method = get_method(method_name)
        assert method.init_for(config.method.init.name).name == method.default_init
    assert get_method("fedsb").needs_init_gradients() and not get_method("ffa").needs_init_gradients()
    assert get_method("ffa").needs_init_gradients("lora_ga")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"method.name": "fedsb", "method.init.name": "pissa"},
     "method.init.name: got 'pissa'; accepted: 'lora_sb' with method.name=fedsb"),
    ({"method.name": "fedit", "method.init.name": "lora_sb"},
     "method.init.name: got 'lora_sb'; accepted: 'kaiming' or 'olora' or 'pissa' or 'lora_ga' with "
     "method.name=fedit"),
    ({"method.name": "ffa", "method.init.name": "gaussian"},
     "method.init.name: got 'gaussian'; accepted: null (the method's default) or one of 'kaiming'"),
])
def test_a_bad_init_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_lora_ga_is_charged_and_checked_like_lora_sb_under_dp():
    from fedsb.experiment.privacy import charges_init, privacy_status

    private = {"privacy.enabled": True, "method.name": "ffa", "method.init.source": "clients"}
    assert charges_init(load_config(TINY, {**private, "method.init.name": "lora_ga"}))
    assert not charges_init(load_config(TINY, {**private, "method.init.name": "pissa"}))
    pooled = {**private, "method.init.source": "pooled"}
    with pytest.raises(ConfigError, match="method.init.source"):
        load_config(TINY, {**pooled, "method.init.name": "lora_ga"})
    assert privacy_status(load_config(TINY, {**pooled, "method.init.name": "olora"})) == "private"


@pytest.mark.parametrize(("method", "init"), [("ffa", "lora_ga"), ("fedex", "pissa")])
def test_private_runs_with_an_init_charge_what_they_release(tmp_path, method, init):
    """DP-SGD through the base offset; LoRA-GA's init gradient from the clients is privatised and charged
    to each ledger at round 0 (as LoRA-SB's), PiSSA's costs nothing."""
    overrides = f"method.init.name={init}; method.init.source=clients"
    _, run = run_in_process({"config": TINY, "run-dir": str(tmp_path), "method": method,
                             "privacy-epsilon": 3.0, "overrides": overrides}, 4)
    rows = [row.to_dict() for row in read_metrics(tmp_path)]
    spent_at_init = rows[0]["epsilon_max_all"]
    assert (spent_at_init > 0) == (init == "lora_ga")
    assert 0 < rows[-1]["epsilon_max_all"] <= 3.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["privacy"]["status"] == "private" and summary["init"] == init


def test_lora_ga_needs_twice_the_rank_in_every_module():
    from fedsb.experiment.plan import CheckError, check_plan

    assert get_init("lora_ga").dims_per_rank == 2
    with pytest.raises(CheckError, match=r"method.rank: got 9; accepted: an integer in 1..8, .* / 2 "):
        check_plan(load_config("tests/configs/tiny_causal.yaml", {
            "method.name": "fedit", "method.init.name": "lora_ga", "method.rank": 9}))
