"""The adapter inits a config can choose (`method.init.name`), and what each one needs and costs.

Torch-free declarations, so that the config can be validated without loading torch; the functions
that compute each init are in `fedsb.core.init`. A method accepts the inits of its adapter kind
(`FederatedMethod.accepted_inits`): the LoRA-based methods the four LoRA inits, Fed-SB LoRA-SB, Bone
and MoRA their papers' zeros (the model starts as the pretrained one).

What an init is computed from decides what it costs in a federation (docs/architecture.md section 3):
- `seed`: random, from the run's seed (LoRA's Kaiming-uniform A); no data, nothing private.
- `weights`: the pretrained weights alone, which every client already holds, so each client
  computes it itself, deterministically: no bytes, no privacy cost.
- `gradients`: the loss gradient of each target weight, from `method.init.source` (the server's
  split, the clients' uploads metered as `init` and privatised under DP, or the pooled oracle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ComputedFrom = Literal["seed", "weights", "gradients"]


@dataclass(frozen=True)
class InitChoice:
    """One adapter init's declarations; the rest of the code asks these, never the init's name."""

    name: str  # the config's method.init.name
    label: str  # how tables and figures name it
    adapter_kind: str  # the adapter it initialises: 'lora' (B A), 'lora_sb' (B R A), 'bone' or 'mora'
    computed_from: ComputedFrom
    # Whether the init's product is taken out of the frozen weight, W_res = W0 - s B0 A0, so that the
    # model is unchanged at step 0 (the adapter layer keeps B0 and A0: fedsb.core.adapters).
    offsets_base: bool
    paper: str  # the source paper
    # The init needs this many times the rank in every target's smaller dimension (LoRA-GA uses
    # the gradient's top 2r singular vectors).
    dims_per_rank: int = 1

    @property
    def needs_gradients(self) -> bool:
        return self.computed_from == "gradients"

    @property
    def local(self) -> bool:
        """Computed by every client itself from the pretrained weights it holds: nothing is sent."""
        return self.computed_from == "weights"


INITS: dict[str, InitChoice] = {c.name: c for c in (
    InitChoice("kaiming", "Kaiming", "lora", "seed", offsets_base=False,
               paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"),
    InitChoice("olora", "OLoRA", "lora", "weights", offsets_base=True,
               paper="Buyukakyuz 2024, OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models "
                     "(arXiv:2406.01775)"),
    InitChoice("pissa", "PiSSA", "lora", "weights", offsets_base=True,
               paper="Meng, Wang and Zhang 2024, PiSSA: Principal Singular Values and Singular Vectors "
                     "Adaptation of Large Language Models (arXiv:2404.02948)"),
    InitChoice("lora_ga", "LoRA-GA", "lora", "gradients", offsets_base=True, dims_per_rank=2,
               paper="Wang, Yu and Li 2024, LoRA-GA: Low-Rank Adaptation with Gradient Approximation "
                     "(arXiv:2407.05000)"),
    InitChoice("lora_sb", "LoRA-SB", "lora_sb", "gradients", offsets_base=False,
               paper="Ponkshe et al. 2024, Initialization using Update Approximation is a Silver Bullet "
                     "for Extreme Efficient Low-Rank Fine-Tuning (arXiv:2411.19557)"),
    InitChoice("bone_zeros", "zeros", "bone", "seed", offsets_base=False,
               paper="Kang 2024, Bone: Block-Affine Adaptation of Large Language Models (arXiv:2409.15371)"),
    InitChoice("mora_zeros", "zeros", "mora", "seed", offsets_base=False,
               paper="Jiang et al. 2024, MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning "
                     "(arXiv:2405.12130)"),
)}


def init_names() -> list[str]:
    """Every init's name (the values method.init.name may take, depending on the method)."""
    return list(INITS)


def get_init(name: str) -> InitChoice:
    if name not in INITS:
        raise ValueError(f"unknown init {name!r}; accepted: {', '.join(INITS)}")
    return INITS[name]
