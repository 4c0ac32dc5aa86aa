"""The final global adapter in PEFT format (`run_dir/adapter`), loadable by `PeftModel`: LoRA, or the
method's own (Bone: MiSS), or, where PEFT has no such adapter (MoRA), the exact merged model
(`run_dir/merged`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedsb.core.adapters import State, copy_head, key
from fedsb.core.models import find_head_modules
from fedsb.methods.base import FederatedMethod


def peft_lora_tensors(method: FederatedMethod, state: State) -> dict[str, dict[str, torch.Tensor]]:
    """Per module, the (lora_A, lora_B) pair that PEFT's LoRA holds for this state (the method says
    how its adapter maps to one). A dense residual is not low-rank and is exported separately."""
    return {name: method.peft_lora_pair(state, name) for name in method.specs}


@torch.no_grad()
def export_adapter(run_dir: Path, base_model: nn.Module, method: FederatedMethod, state: State,
                   task: str) -> Path:
    """Write the global adapter in PEFT LoRA format to run_dir/adapter (loadable by PeftModel), unless
    the method writes its own export (`write_export`: another PEFT adapter type, or the merged model).

    `base_model` must be a freshly loaded base model without fedsb adapters; it is modified.
    The adapter is relative to the original base weights, also after an init that took its product
    out of the frozen weight (PiSSA, OLoRA, LoRA-GA). For FedEx-LoRA, whose residual is not
    low-rank, the exact model (base + residual + BA, merged) is also saved to run_dir/merged with
    save_pretrained.
    """
    own = method.write_export(run_dir, base_model, state, task)
    if own is not None:  # its note says how to load it
        (own / "FEDSB_README.md").write_text(_export_note(method, loads_as_peft=False))
        return own
    from peft import LoraConfig, TaskType, get_peft_model

    heads = find_head_modules(base_model)
    conv1d = any(spec.conv1d for spec in method.specs.values())
    # With a base offset the adapter is exported at rank 2r (see FederatedMethod.peft_lora_pair): alpha
    # grows with it, so that PEFT's scale alpha / r is the simulator's.
    config = LoraConfig(
        r=method.export_rank, lora_alpha=method.alpha * method.export_rank / method.rank,
        target_modules=list(method.specs),
        modules_to_save=heads or None, fan_in_fan_out=conv1d, init_lora_weights=False,
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    peft_model = get_peft_model(base_model, config)
    params = dict(peft_model.named_parameters())
    for name, pair in peft_lora_tensors(method, state).items():
        for part, value in pair.items():
            params[f"base_model.model.{name}.{part}.default.weight"].copy_(value)
    copy_head(params, state)
    out = run_dir / "adapter"
    peft_model.save_pretrained(out)
    (out / "FEDSB_README.md").write_text(_export_note(method))
    if method.residual:
        merged = peft_model.merge_and_unload()
        for name in method.specs:
            merged.get_submodule(name).weight += state[key(name, "residual")]
        merged.save_pretrained(run_dir / "merged")
    return out


def _export_note(method: FederatedMethod, loads_as_peft: bool = True) -> str:
    return (f"# fedsb export: method {method.name}, init {method.init.name}, rank {method.rank}, "
            f"alpha {method.alpha}\n\n"
            + ("Load with `PeftModel.from_pretrained(base_model, this_dir)`.\n" if loads_as_peft else "")
            + method.export_note())
