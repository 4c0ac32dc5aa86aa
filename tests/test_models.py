"""Base model loading: packaged MiniLM (offline), local directories, hub ids, tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.core.adapters import AdapterLayer, effective_weights, inject_adapters
from fedsb.core.models import (
    DEFAULT_TARGETS,
    find_head_modules,
    find_target_modules,
    load_model,
    load_tokenizer,
    resolve_model_source,
)


def test_packaged_minilm_loads_offline_and_classifies_a_batch():
    model = load_model("default", num_labels=3)
    tokenizer = load_tokenizer("default")
    batch = tokenizer(["the match ended in a draw", "shares fell sharply today"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    # Pretrained, not random: the first layer's query weight has the checkpoint's statistics.
    q = model.bert.encoder.layer[0].attention.self.query.weight
    assert abs(q.std().item() - 0.02) > 0.005
    assert len(find_target_modules(model)) == 6 * 6
    assert find_head_modules(model) == ["classifier"]
    assert not any(p.requires_grad for p in model.parameters())


def test_local_directory_loads_like_the_original(tmp_path):
    model = load_model("tiny-llama", num_labels=3, seed=4)
    model.save_pretrained(tmp_path / "m")
    again = load_model(str(tmp_path / "m"), num_labels=3)
    batch = {"input_ids": torch.arange(1000, 1010).view(1, 10)}
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, again(**batch).logits)


def test_a_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_source(str(tmp_path))


def test_a_hub_id_goes_to_from_pretrained_and_fails_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_source("bert-base-cased") == "bert-base-cased"
    with pytest.raises(OSError):
        load_model("no-such-org/no-such-model-xyz")


def test_tiny_models_are_seeded():
    a, b = load_model("tiny-bert", seed=1), load_model("tiny-bert", seed=1)
    c = load_model("tiny-bert", seed=2)
    wa, wb, wc = (m.bert.encoder.layer[0].intermediate.dense.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_causal_lm_loads():
    model = load_model("tiny-llama", task="causal_lm")
    ids = torch.arange(1000, 1008).view(1, 8)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 8, model.config.vocab_size) and torch.isfinite(out.loss)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="accepted: classification, causal_lm"):
        load_model("tiny-bert", task="regression")


def test_target_patterns_and_defaults():
    model = load_model("tiny-gpt2")
    assert DEFAULT_TARGETS["gpt2"]
    names = find_target_modules(model, ["c_attn"])
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in names)
    assert find_target_modules(model, ["h.1.*"]) == [
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(ValueError, match="match no linear layer"):
        find_target_modules(model, ["nope"])


@pytest.mark.parametrize("base", [nn.Linear(6, 10), Conv1D(10, 6)])
@pytest.mark.parametrize("kind", ["lora", "lora_sb"])
def test_adapter_forward_is_the_effective_weight(base, kind):
    """y = W0 x + b + s B (R) A x + residual x, for nn.Linear and Conv1D (weight stored (in, out))."""
    torch.manual_seed(0)
    holder = nn.Sequential(base)
    inject_adapters(holder, ["0"], rank=3, alpha=6.0, kind=kind, residual=True)
    layer: AdapterLayer = holder[0]
    with torch.no_grad():
        for part in (layer.lora_A, layer.lora_B, layer.lora_R):
            if part is not None:
                part.weight.normal_()
        layer.residual.normal_()
    x = torch.randn(5, 6)
    weight = effective_weights(holder)["0"]
    assert weight.shape == (10, 6)
    expected = x @ weight.T + layer.base.bias
    assert torch.allclose(holder(x), expected, atol=1e-5)


def test_the_gpu_check_says_there_is_no_gpu_and_its_loop_runs_on_a_tiny_model(capsys):
    """benchmarks/gpu_check.py exits 0 without CUDA; --tiny runs its federated and bare loops."""
    import importlib.util
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 0
        assert "no CUDA device" in capsys.readouterr().out
    assert gpu_check.main(["--tiny", "--clients", "2", "--rounds", "1", "--steps", "1", "--batch", "2",
                           "--seq", "8", "--methods", "fedex,fedsb"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("fedex", "fedsb"))]
    assert len(rows) == 2
