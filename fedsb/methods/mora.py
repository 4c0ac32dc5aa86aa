"""MoRA: a trained square matrix M between fixed compression and decompression maps.

Jiang et al. 2024, "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning" (arXiv:2405.12130;
the authors' code kongds/MoRA, `_apply_mora` and `get_delta_weight`). The config's method.rank is a
LoRA rank r; each target gets M of side r^ ~ sqrt((m + n) r), so that r^2 matches LoRA's r (m + n)
parameters, and M starts at zero. Compression and decompression are the authors' type 6 (RoPE-based,
their choice for small ranks and their README's example): x is cut into ceil(n / r^) chunks, chunk j
rotated as RoPE at position j, M applied to every chunk, the outputs concatenated and repeated or cut
to m. Layer: `fedsb.core.block_adapters.MoRALayer` (which also implements type 1, sharing).

Averaging M is exact: the maps around M are fixed and the same on every client, so
dW(sum_i w_i M_i) = sum_i w_i dW(M_i); the base class's FedAvg of the uploaded M is the method.

Where fedsb differs from the authors: r^ = round(sqrt((m + n) r)) as theirs, but rounded down to an
even number, which type 6 needs (their code fails on an odd r^); the brief's floor would give r^ one
smaller for some shapes. No scale (MoRA has none; method.alpha is ignored). Type 1 is not a config
option. PEFT has no MoRA: the export is the exact merged model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fedsb.core.adapters import State
from fedsb.core.block_adapters import save_merged_model
from fedsb.methods.base import FederatedMethod


class MoRA(FederatedMethod):
    name = "mora"
    label = "MoRA"
    centralised_label = "MoRA"
    adapter_kind = "mora"
    default_init = "mora_zeros"
    trainable = ("mora_M",)

    def write_export(self, run_dir: Path, base_model: nn.Module, state: State, task: str) -> Path:
        return save_merged_model(base_model, self.adapter_kind, list(self.specs), self.rank, state,
                                 run_dir / "merged")

    def export_note(self) -> str:
        return ("PEFT has no MoRA: this directory is the exact merged model, every M folded into its "
                "frozen weight (save_pretrained; load with AutoModel*.from_pretrained).\n")
