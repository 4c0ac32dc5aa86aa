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
