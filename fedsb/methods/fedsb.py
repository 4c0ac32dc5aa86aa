"""Fed-SB: LoRA-SB adapters W0 + s B R A; clients train only the r x r matrix R.

B and A come from the LoRA-SB init (`fedsb.init.lora_sb_init`), are frozen, and reach each
client once (component `init` on the meter). Averaging R is exact, because the map
R -> B R A is linear: B (sum_i w_i R_i) A = sum_i w_i B R_i A. Upload per round: r^2 per module.
"""

from collections.abc import Mapping

import torch

from fedsb.adapters import ModuleSpec, State
from fedsb.init import lora_sb_init
from fedsb.methods.base import FederatedMethod


class FedSB(FederatedMethod):
    name = "fedsb"
    adapter_kind = "lora_sb"
    trainable = ("lora_R",)
    one_time = ("lora_A", "lora_B")

    def __init__(self, specs: Mapping[str, ModuleSpec], rank: int, alpha: float, init_lr: float = 1e-3):
        super().__init__(specs, rank, alpha)
        self.init_lr = init_lr  # lr_eff of the first-update estimate -lr_eff * sign(G)

    def initial_adapter_state(self, generator: torch.Generator,
                              gradients: Mapping[str, torch.Tensor] | None = None) -> State:
        if gradients is None:
            raise ValueError("Fed-SB needs the init gradients (see fedsb.init.accumulate_gradients)")
        return lora_sb_init(gradients, self.rank, self.scale, self.init_lr, generator)
