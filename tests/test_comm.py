"""Closed-form communication counts (fedsb.experiment.comm) and the `fedsb comm` command.

Expected numbers are written out by hand from the tiny models' shapes (see the comments), so
a change in a method's download/upload, or in the closed form, shows up here.
"""

from __future__ import annotations

import json

import pytest
import torch

import fedsb.experiment.comm as comm
from fedsb.cli import main, parse_ranks
from fedsb.core.adapters import component_of, target_specs
from fedsb.core.models import find_target_modules, load_model, meta_model
from fedsb.methods import get_method

# tiny-bert, rank r = 4, classification with 3 labels. Per layer (2 layers), the 6 default
# targets (m = out, n = in): query, key, value, attention.output.dense: 32 x 32 each;
# intermediate.dense: 48 x 32; output.dense: 32 x 48. 12 modules in all.
#   lora_A = r*n:   per layer 4*(32+32+32+32+32+48) = 4*208 = 832;  x2 layers = 1664
#   lora_B = m*r:   per layer 4*(32+32+32+32+48+32) = 4*208 = 832;  x2 layers = 1664
#   lora_R = r*r:   16 per module x 12 modules = 192
#   residual = m*n: per layer 4*32*32 + 48*32 + 32*48 = 4096 + 1536 + 1536 = 7168; x2 = 14336
#   head (classifier, Linear(32, 3) with bias): 32*3 + 3 = 99
BERT_A, BERT_B, BERT_R, BERT_RES, BERT_HEAD = 1664, 1664, 192, 14336, 99
TINY_BERT = {
    # method: (up every round, down every round, down once (init))
    "fedit": ({"lora_A": 1664, "lora_B": 1664, "head": 99},  # 3427 each way
              {"lora_A": 1664, "lora_B": 1664, "head": 99}, 0),
    "ffa": ({"lora_B": 1664, "head": 99},  # 1763
            {"lora_B": 1664, "head": 99}, 1664),  # A (frozen, shared) reaches a client once
    "fedex": ({"lora_A": 1664, "lora_B": 1664, "head": 99},  # 3427 up
              {"lora_A": 1664, "lora_B": 1664, "residual": 14336, "head": 99}, 0),  # 17763 down
    "fedsb": ({"lora_R": 192, "head": 99},  # 291
              {"lora_R": 192, "head": 99}, 3328),  # B and A (1664 + 1664) reach a client once
}
TINY_BERT_TOTALS = {  # (up per round, down per round, down in a client's first round)
    "fedit": (3427, 3427, 3427), "ffa": (1763, 1763, 3427),
    "fedex": (3427, 17763, 17763), "fedsb": (291, 291, 3619),
}

# tiny-gpt2, rank r = 2, causal LM (no trained head: lm_head is not a task head). Per layer
# (2 layers), Conv1D targets (m = out, n = in): c_attn 96 x 32, attn.c_proj 32 x 32,
# c_fc 128 x 32, mlp.c_proj 32 x 128. 8 modules in all.
#   lora_A = r*n: per layer 2*(32+32+32+128) = 448;  x2 = 896
#   lora_B = m*r: per layer 2*(96+32+128+32) = 576; x2 = 1152
#   lora_R = r*r: 4 x 8 modules = 32
#   residual = m*n (stored in x out, same count): 3072 + 1024 + 4096 + 4096 = 12288; x2 = 24576
TINY_GPT2 = {
    "fedit": ({"lora_A": 896, "lora_B": 1152}, {"lora_A": 896, "lora_B": 1152}, 0),
    "ffa": ({"lora_B": 1152}, {"lora_B": 1152}, 896),
    "fedex": ({"lora_A": 896, "lora_B": 1152}, {"lora_A": 896, "lora_B": 1152, "residual": 24576}, 0),
    "fedsb": ({"lora_R": 32}, {"lora_R": 32}, 2048),  # init = A + B = 896 + 1152
}

GEMMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def tiny_bert():
    return load_model("tiny-bert", "classification", num_labels=3)


@pytest.fixture(scope="module")
def gemma():
    return meta_model("gemma-2-9b", "causal_lm")


@pytest.mark.parametrize("name", list(TINY_BERT))
def test_tiny_bert_closed_form_by_hand(tiny_bert, name):
    up, down, init = TINY_BERT[name]
    counts = comm.count(tiny_bert, name, rank=4, num_clients=3)
    assert counts.components("up") == up
    assert counts.components("down") == down
    assert counts.init_params("down") == init
    assert counts.init_params("up") == 0  # the init gradient comes from the server by default
    first_down = dict(down, **({"init": init} if init else {}))
    assert counts.components("down", first_time=True) == first_down
    assert counts.components("up", first_time=True) == up  # nothing one-time goes up
    up_total, down_total, first_total = TINY_BERT_TOTALS[name]
    assert (counts.up, counts.down) == (up_total, down_total)
    assert counts.params("down", first_time=True) == first_total
    # bytes = params x 4 (float32), per component and in total; all K = 3 clients = 3 x one client
    assert counts.component_bytes("up") == {c: 4 * n for c, n in up.items()}
    assert counts.component_bytes("down", first_time=True) == {c: 4 * n for c, n in first_down.items()}
    assert counts.bytes("up") == 4 * up_total and counts.bytes("down") == 4 * down_total
    assert counts.bytes("down", first_time=True) == 4 * first_total
    assert counts.init_bytes() == 4 * init
    assert counts.params("up", all_clients=True) == 3 * up_total
    assert counts.bytes("down", all_clients=True) == 3 * 4 * down_total


@pytest.mark.parametrize("name", list(TINY_GPT2))
def test_tiny_gpt2_conv1d_closed_form_by_hand(name):
    target = comm.accounting_model("tiny-gpt2", "causal_lm")
    assert next(target.model.parameters()).is_meta
    up, down, init = TINY_GPT2[name]
    counts = comm.count(target.model, name, rank=2)
    assert counts.components("up") == up
    assert counts.components("down") == down
    assert counts.init_params() == init
    assert comm.head_shapes(target.model) == {}


def test_bytes_per_element_and_clients_scale():
    model = comm.accounting_model("tiny-bert", "classification", num_labels=3).model
    half = comm.count(model, "fedsb", rank=4, num_clients=5, bytes_per_element=2)
    assert half.bytes("up") == 2 * 291 and half.bytes("up", all_clients=True) == 5 * 2 * 291
    assert half.init_bytes() == 2 * 3328


def test_init_gradients_from_clients_are_a_one_time_upload():
    # Dense m x n gradient per module, once: tiny-bert 14336 (= the residual's count); tiny-gpt2 24576.
    bert = comm.accounting_model("tiny-bert", "classification", num_labels=3).model
    gpt2 = comm.accounting_model("tiny-gpt2", "causal_lm").model
    sb = comm.count(bert, "fedsb", rank=4, init_gradients=True)
    assert sb.components("up", first_time=True) == {"lora_R": 192, "head": 99, "init": 14336}
    assert sb.up == 291  # later rounds unchanged
    assert comm.count(gpt2, "fedsb", rank=2, init_gradients=True).init_params("up") == 24576
    # Methods with a random init never upload a gradient.
    assert comm.count(bert, "ffa", rank=4, init_gradients=True).init_params("up") == 0


def test_closed_form_matches_the_methods_real_states(tiny_bert):
    """What the methods really put in download/upload, counted like a meter, equals the closed form."""
    targets = find_target_modules(tiny_bert)
    specs = target_specs(tiny_bert, targets)
    gradients = {name: torch.randn(s.out_features, s.in_features, generator=torch.Generator().manual_seed(1))
                 for name, s in specs.items()}
    for name in TINY_BERT:
        method = get_method(name)(specs, 4, 8.0)
        state = method.initial_state(tiny_bert, torch.Generator().manual_seed(0), gradients, lr_eff=1e-3)
        counts = comm.count(tiny_bert, name, rank=4)

        def measured(part):
            out: dict[str, int] = {}
            for k, t in part.items():
                out[component_of(k)] = out.get(component_of(k), 0) + t.numel()
            return out

        assert measured(method.upload(state)) == counts.components("up")
        assert measured(method.download(state, first_time=False)) == counts.components("down")
        first = measured(method.download(state, first_time=True))
        assert sum(first.values()) == counts.params("down", first_time=True)
        # The existing helper agrees on the adapter part of the upload.
        assert method.parameters_per_round() == counts.up - BERT_HEAD


def test_factored_residual_is_k_times_the_lora_upload(tiny_bert):
    fedex = comm.method_for_model(tiny_bert, "fedex", 4)
    assert comm.factored_residual_params(fedex, 3) == 3 * (BERT_A + BERT_B)  # K r (m + n) summed
    with pytest.raises(ValueError):
        comm.factored_residual_params(comm.method_for_model(tiny_bert, "fedsb", 4), 3)


@pytest.mark.parametrize("name", ["llama-3.2-3b", "mistral-7b-v0.1", "gemma-2-9b"])
def test_shipped_configs_build_on_meta(name):
    # Published parameter counts: 3.21B, 7.24B, 9.24B (causal LM, tied embeddings for Llama/Gemma).
    expected = {"llama-3.2-3b": 3_212_749_824, "mistral-7b-v0.1": 7_241_732_096, "gemma-2-9b": 9_241_705_984}
    model = meta_model(name, "causal_lm")
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) == expected[name]
    assert name in comm.shipped_configs()


def test_gemma_2_9b_matches_the_fed_sb_paper(gemma):
    targets = GEMMA_TARGETS.split(",")
    fedsb = comm.count(gemma, "fedsb", 200, targets, num_clients=25)
    fedex = comm.count(gemma, "fedex", 32, targets, num_clients=25)
    # Fed-SB: 7 modules x 42 layers x 200^2 = 11,760,000 per client per round, each way.
    assert fedsb.up == fedsb.down == 7 * 42 * 200**2 == 11_760_000
    # FedEx-LoRA r=32, per layer r(m+n): q 32*(4096+3584) = 245,760; k, v 32*(2048+3584) = 180,224;
    # o 245,760; gate, up, down 32*(14336+3584) = 573,440 -> 2,572,288 per layer, x42 = 108,036,096.
    assert fedex.up == 108_036_096
    assert fedex.params("up", all_clients=True) == 2_700_902_400
    assert abs(fedex.params("up", all_clients=True) / 2_701e6 - 1) < 0.01
    method = comm.method_for_model(gemma, "fedex", 32, targets)
    assert abs(comm.factored_residual_params(method, 25) / 2_701e6 - 1) < 0.01
    assert abs(fedsb.up / 11.76e6 - 1) < 0.01
    # Dense residual m*n per layer: q, o 4096*3584 each; k, v 2048*3584 each; MLP 3 x 14336*3584
    # = 198,180,864; x42 = 8,323,596,288 per client per round.
    assert fedex.components("down")["residual"] == 8_323_596_288
    assert fedsb.init_params() == 675_225_600  # B and A at r=200: 200/32 x 108,036,096


def test_cli_prints_the_table(capsys):
    assert main(["comm", "--model", "tiny-bert", "--method", "all", "--rank", "4", "--clients", "3",
                 "--num-labels", "3"]) == 0
    out = capsys.readouterr().out
    for text in ("fedit", "ffa", "fedex", "fedsb", "lora_R", "residual", "init", "all K=3",
                 "3,427 (3.427k)", "13.71 kB", "17,763", "14,336", "3,328", "11.78x"):
        assert text in out, text


def test_cli_gemma_paper_check(capsys):
    assert main(["comm", "--model", "gemma-2-9b", "--method", "fedsb", "--method", "fedex",
                 "--rank", "fedsb=200", "--rank", "fedex=32", "--targets", GEMMA_TARGETS,
                 "--clients", "25"]) == 0
    out = capsys.readouterr().out
    for text in ("11,760,000 (11.76M)", "108,036,096 (108.0M)", "2,700,902,400 (2.701B)",
                 "8,323,596,288", "229.67x", "task causal_lm", "294 modules"):
        assert text in out, text


def test_cli_json_and_errors(capsys):
    assert main(["comm", "--model", "tiny-gpt2", "--method", "ffa", "--rank", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # Classification by default for tiny models: head = score, Linear(32, 2, bias=False) = 64.
    assert data["task"] == "classification"
    assert data["counts"]["ffa"]["up"]["per_round_components"] == {"lora_B": 1152, "head": 64}
    assert data["counts"]["ffa"]["down"]["first_round_params"] == 1152 + 64 + 896
    assert data["counts"]["ffa"]["down"]["first_round_bytes"] == 4 * (1152 + 64 + 896)
    assert main(["comm", "--model", "tiny-gpt2", "--method", "nope"]) == 2
    assert main(["comm", "--model", "no-such-model-anywhere"]) == 2
    assert "error" in capsys.readouterr().err


def test_parse_ranks():
    assert parse_ranks(["fedsb=200", "fedex=32"], ["fedsb", "fedex"]) == {"fedsb": 200, "fedex": 32}
    assert parse_ranks(["16", "fedsb=64"], ["fedit", "fedsb"]) == {"fedit": 16, "fedsb": 64}
    for bad in (["x=3"], ["fedsb=0"], ["fedsb=two"]):
        with pytest.raises(ValueError):
            parse_ranks(bad, ["fedsb"])


def test_human_units():
    assert comm.human_count(11_760_000) == "11.76M"
    assert comm.human_count(2_700_902_400) == "2.701B"
    assert comm.human_count(999_960) == "1.000M"
    assert comm.human_bytes(47_040_000) == "47.04 MB"
    assert comm.human_bytes(12) == "12 B"
