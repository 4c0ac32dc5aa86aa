"""FedEx-LoRA: FedIT plus the exact residual folded into a dense, frozen weight.

After averaging A and B, the server adds s * (sum_i w_i B_i A_i - B A) to each module's
accumulated residual, kept in the base weight's own layout (out x in; in x out for Conv1D).
The effective weight W0 + residual + s B A then equals the weighted mean of the clients'.
The download carries the dense accumulated residual every round.
"""

from collections.abc import Sequence

import torch

from fedsb.core.adapters import State, key
from fedsb.methods.base import FederatedMethod, normalize_weights, weighted_mean
from fedsb.methods.ranks import RANK_AGGREGATIONS


class FedExLoRA(FederatedMethod):
    name = "fedex"
    label = "FedEx-LoRA"
    centralised_label = "LoRA"
    trainable = ("lora_A", "lora_B")
    # Every rule, each exact in the effective weight: the residual takes up whatever the rule leaves out.
    rank_aggregations = RANK_AGGREGATIONS
    residual = True

    def aggregate(self, global_state: State, uploads: Sequence[State], weights: Sequence[float]) -> State:
        new_state = super().aggregate(global_state, uploads, weights)
        w = normalize_weights(weights)
        for name, spec in self.specs.items():
            a, b = key(name, "lora_A"), key(name, "lora_B")
            # In float64 throughout: the gap is small beside the products it is the difference of.
            mean_of_products = weighted_mean([u[b].double() @ u[a].double() for u in uploads], w)
            gap = self.scale * (mean_of_products - new_state[b].double() @ new_state[a].double())
            gap = gap.T if spec.conv1d else gap
            r = key(name, "residual")
            new_state[r] = (global_state[r].double() + gap).to(torch.float32)
        return new_state
