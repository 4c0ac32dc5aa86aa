"""FFA-LoRA: A is frozen at a shared random init, clients train only B.

Exact: with A shared, mean(s * B_i A) = s * mean(B_i) A. A reaches each client once
(component `init` on the meter); a shared seed would do, but the simulator sends what a
client really needs and meters it.
"""

from fedsb.methods.base import FederatedMethod


class FFALoRA(FederatedMethod):
    name = "ffa"
    label = "FFA-LoRA"
    centralised_label = "LoRA (A frozen)"
    trainable = ("lora_B",)
    one_time = ("lora_A",)
    # Not svd: A is frozen, so the averaged product cannot be refactored. With A shared, pad is exact
    # in the product: sum_i w_i pad(B_i) A = sum_i w_i B_i A[:r_i].
    rank_aggregations = ("pad", "rank_aware")
