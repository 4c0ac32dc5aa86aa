"""FedIT: naive LoRA FedAvg. Clients train A and B; the server averages each separately.

Inexact: s * mean(B_i) mean(A_i) != mean(s * B_i A_i). The gap is what FedEx-LoRA folds
into a residual.
"""

from fedsb.methods.base import FederatedMethod
from fedsb.methods.ranks import RANK_AGGREGATIONS


class FedIT(FederatedMethod):
    name = "fedit"
    exact = False  # mean(B_i) mean(A_i) is not mean(B_i A_i)
    label = "FedIT"
    centralised_label = "LoRA"
    trainable = ("lora_A", "lora_B")
    rank_aggregations = RANK_AGGREGATIONS  # every rule: A and B are both trained
