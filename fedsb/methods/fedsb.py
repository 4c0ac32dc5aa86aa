"""Fed-SB: LoRA-SB adapters W0 + s B R A; clients train only the r x r matrix R.

B and A come from the LoRA-SB init (`fedsb.core.init.lora_sb_init`, the only init of its adapter
kind), are frozen, and reach each client once (component `init` on the meter). Averaging R is
exact, because the map R -> B R A is linear: B (sum_i w_i R_i) A = sum_i w_i B R_i A. Upload per
round: r^2 per module.
"""

import torch

from fedsb.core.adapters import State, key
from fedsb.methods.base import FederatedMethod


class FedSB(FederatedMethod):
    name = "fedsb"
    label = "Fed-SB"
    centralised_label = "LoRA-SB"
    adapter_kind = "lora_sb"
    default_init = "lora_sb"
    trainable = ("lora_R",)
    one_time = ("lora_A", "lora_B")

    def peft_lora_pair(self, state: State, module: str) -> dict[str, torch.Tensor]:
        """PEFT's lora_B = B R and lora_A = A, with the same scale: s B R A exactly."""
        b, r, a = (state[key(module, c)] for c in ("lora_B", "lora_R", "lora_A"))
        return {"lora_A": a, "lora_B": b @ r}

    def export_note(self) -> str:
        return "Fed-SB's B R A is stored as PEFT lora_B = B R, lora_A = A (same scale): exact.\n"
