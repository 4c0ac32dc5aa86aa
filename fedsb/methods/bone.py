"""Bone: block-affine adaptation; clients train one b x b block per block row of each target weight.

Kang 2024, "Bone: Block-Affine Adaptation of Large Language Models" (arXiv:2409.15371; the authors'
code JL-er/Bone, "Bone-col"; PEFT's MiSS with init_weights="bat"). The frozen weight W0 (m x n) is
cut into b x b blocks W_{a,j}; the update of block (a, j) is W_{a,j} B_a + B_a, with B_a (b x b) trained
and starting at zero. The config's method.rank is the block size b, which must divide every target's
dimensions; upload per round: (m / b) b^2 = m b per module (LoRA's at rank m b / (m + n)). Layer:
`fedsb.core.block_adapters.BoneLayer`.

Averaging the blocks is exact: B -> dW is linear and reads only W0, the same on every client, so
dW(sum_i w_i B_i) = sum_i w_i dW(B_i); the base class's FedAvg of the uploaded blocks is the method.

Where fedsb differs from the paper: no scale (the paper has none; method.alpha is ignored); the
update is computed as sum_j (W_{a,j} + I)(B_a x_j) without forming dW (the same map). PEFT's current
default MiSS (one shared r x m shard, no W0 term) is a later variant by the same author, not this one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedsb.core.adapters import State, key
from fedsb.core.block_adapters import save_merged_model
from fedsb.core.models import find_head_modules
from fedsb.methods.base import FederatedMethod


class Bone(FederatedMethod):
    name = "bone"
    label = "Bone"
    centralised_label = "Bone"
    adapter_kind = "bone"
    default_init = "bone_zeros"
    trainable = ("bone_block",)

    @property
    def exports_peft(self) -> bool:
        """PEFT's MiSS ("bat") holds exactly this adapter, but over nn.Linear only (not Conv1D)."""
        return not any(spec.conv1d for spec in self.specs.values())

    @torch.no_grad()
    def write_export(self, run_dir: Path, base_model: nn.Module, state: State, task: str) -> Path:
        if not self.exports_peft:
            return save_merged_model(base_model, self.adapter_kind, list(self.specs), self.rank, state,
                                     run_dir / "merged")
        from peft import MissConfig, TaskType, get_peft_model

        from fedsb.core.adapters import copy_head

        heads = find_head_modules(base_model)
        config = MissConfig(r=self.rank, init_weights="bat", target_modules=list(self.specs),
                            modules_to_save=heads or None,
                            task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM)
        peft_model = get_peft_model(base_model, config)
        params = dict(peft_model.named_parameters())
        for name in self.specs:
            params[f"base_model.model.{name}.miss_block.default"].copy_(state[key(name, "bone_block")])
        copy_head(params, state)
        out = run_dir / "adapter"
        peft_model.save_pretrained(out)
        return out

    def export_note(self) -> str:
        if self.exports_peft:
            return ("Bone is PEFT's MiSS with init_weights='bat' (miss_block = Bone's b x b blocks, r = b): "
                    "load with PeftModel.from_pretrained(base_model, this_dir); exact.\n")
        return ("PEFT's MiSS adapts nn.Linear only, and this model's targets are Conv1D: this directory "
                "is the exact merged model (save_pretrained; load with AutoModel*.from_pretrained).\n")
