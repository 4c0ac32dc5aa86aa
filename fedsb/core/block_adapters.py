"""Block adapters: Bone and MoRA, whose update is linear in the one tensor a client trains.

Over a frozen linear layer with weight W0 (out x in, m x n):

    Bone  block size b (the config's method.rank; b divides m and n), W0 in b x b blocks W_{a,j}:
          dW_{a,j} = W_{a,j} B_a + B_a, one trained b x b matrix B_a per block row a
          (Kang 2024, arXiv:2409.15371, the authors' "Bone-col"; PEFT's MiSS with init_weights="bat").
    MoRA  a trained square matrix M (r^ x r^) between a fixed compression of x (n -> r^-sized chunks)
          and a fixed decompression (chunks -> m): dW = Dec . core(M) . Enc
          (Jiang et al. 2024, arXiv:2405.12130, the authors' types 6 and 1; see MoRALayer).

Both maps from the trained tensor to dW are linear (Bone's also reads the frozen W0, which every
client holds identically), so the weighted mean of the clients' tensors gives exactly the weighted
mean of their dW. Neither has a scale: as in the papers and PEFT, the update is the trained tensor's
image itself (the config's method.alpha does not apply).

The layers subclass `fedsb.core.adapters.AdapterLayer` for its frozen-base handling (the base layer,
nn.Linear or transformers' Conv1D, any dtype; `base_weight`; discovery by `adapter_layers`; merge)
and replace its adapter. The trained tensor is the weight of a submodule that Opacus computes
per-sample gradients for: MoRA's M is an nn.Linear (Opacus's own rule); Bone's blocks are a
`BlockLinear`, whose rule is registered with Opacus in `fedsb.training.privacy.per_sample`.
Adapters compute in float32 whatever the base's precision (as AdapterLayer).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.core.adapters import (
    ADAPTER_DTYPE,
    AdapterLayer,
    ModuleSpec,
    State,
    inject_adapters,
    load_state,
    merge_adapters,
)
from fedsb.core.models import weight_shape

Shape = tuple[int, ...]


class BlockAdapterLayer(AdapterLayer):
    """What the block adapters share: a frozen base layer and one trained tensor (`components`).
    AdapterLayer's LoRA factors, residual and base offset do not exist here."""

    components: tuple[str, ...]

    def __init__(self, base: nn.Module, rank: int, scale: float, kind: str, residual: bool = False,
                 offset: bool = False):
        nn.Module.__init__(self)  # not AdapterLayer's: none of its LoRA parts
        if residual or offset:
            raise ValueError(f"a {kind} adapter has no residual and no base offset")
        self.base = base
        self.kind = kind
        self.conv1d = isinstance(base, Conv1D)
        self.out_features, self.in_features = weight_shape(base)
        problem = self.shape_problem(ModuleSpec("", self.out_features, self.in_features, self.conv1d), rank)
        if problem:
            raise ValueError(f"method.rank: got {rank}; accepted: {problem}")

    @classmethod
    def shapes(cls, spec: ModuleSpec, rank: int) -> dict[str, Shape]:
        """Each component's shape for a module of this spec, at the config's rank."""
        raise NotImplementedError

    @classmethod
    def shape_problem(cls, spec: ModuleSpec, rank: int) -> str | None:
        """What the rank must be for this module, if this one does not fit it (else None)."""
        return None

    def held(self) -> tuple[str, ...]:
        return self.components

    def component(self, name: str) -> torch.Tensor:
        return getattr(self, name).weight

    def delta_weight(self) -> torch.Tensor:
        """The adapter's contribution to the effective weight, out x in (float32)."""
        raise NotImplementedError


# --- Bone ----------------------------------------------------------------------------------------

class BlockLinear(nn.Module):
    """A separate b x b linear map per block row a, applied to every input chunk x_j:
    z[..., a, j, :] = B_a x_j. weight: (m/b, b, b), B_a = weight[a] (out x in, as nn.Linear's)."""

    def __init__(self, blocks: int, size: int, device: torch.device | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(blocks, size, size, dtype=ADAPTER_DTYPE, device=device))

    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks (..., J, b) -> (..., A, J, b)."""
        return torch.einsum("...jl,akl->...ajk", chunks, self.weight)


class BoneLayer(BlockAdapterLayer):
    """W0 x + dW x with dW_{a,j} = W_{a,j} B_a + B_a (b x b blocks).

    Two equal ways to compute it. Forming dW (m n b multiply-adds, once per forward) and applying it
    costs about what the base layer does. Per-sample gradients (Opacus's hooks on the blocks' module,
    DP-SGD) need the blocks applied to the activations instead: output block a gains
    sum_j (W_{a,j} + I) (B_a x_j), whose (..., m/b, n/b, b) intermediate is n/b times the layer's
    output, so it is used only while such a hook is registered (on MiniLM it made training about
    10 times slower)."""

    components = ("bone_block",)

    def __init__(self, base: nn.Module, rank: int, scale: float, kind: str = "bone", residual: bool = False,
                 offset: bool = False):
        super().__init__(base, rank, scale, kind, residual, offset)
        self.block = rank
        self.bone_block = BlockLinear(self.out_features // rank, rank, base.weight.device)

    @classmethod
    def shapes(cls, spec: ModuleSpec, rank: int) -> dict[str, Shape]:
        return {"bone_block": (spec.out_features // rank, rank, rank)}

    @classmethod
    def shape_problem(cls, spec: ModuleSpec, rank: int) -> str | None:
        m, n = spec.out_features, spec.in_features
        if m % rank or n % rank:
            return (f"Bone's block size, a common divisor of every target's dimensions "
                    f"({spec.name or 'a target'} is {m} x {n})")
        return None

    def _weight_blocks(self) -> torch.Tensor:
        """W0 as blocks (A, J, b, b): [a, j] = W_{a,j}, float32."""
        b = self.block
        return self.base_weight().unflatten(0, (-1, b)).unflatten(-1, (-1, b)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        x32 = x.to(ADAPTER_DTYPE)
        if not self.bone_block._forward_hooks:  # no per-sample gradients wanted: apply dW itself
            return out + F.linear(x32, self.delta_weight()).to(out.dtype)
        chunks = x32.unflatten(-1, (-1, self.block))  # (..., J, b): x_j
        z = self.bone_block(chunks)  # (..., A, J, b): B_a x_j
        update = torch.einsum("ajkl,...ajl->...ak", self._weight_blocks(), z) + z.sum(-2)
        return out + update.flatten(-2).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        blocks = self.bone_block.weight[:, None]  # (A, 1, b, b): B_a for every j
        delta = self._weight_blocks() @ blocks + blocks  # (A, J, b, b)
        return delta.transpose(1, 2).reshape(self.out_features, self.in_features)


# --- MoRA ----------------------------------------------------------------------------------------

# The authors' compression/decompression types that fedsb implements: 6, RoPE-based (their choice for
# small LoRA ranks, and their README's example), and 1, sharing (for large ranks).
MORA_TYPES = (6, 1)
MORA_DEFAULT_TYPE = 6


def mora_rank(spec: ModuleSpec, lora_rank: int, mora_type: int = MORA_DEFAULT_TYPE) -> int:
    """r^, the side of MoRA's square matrix, for LoRA rank r: as the authors, the nearest integer to
    sqrt((m + n) r), so that r^2 matches LoRA's r (m + n) parameters; for type 6 (RoPE) rounded down to
    an even number, which its rotation of half-chunks needs (the authors' code fails on an odd r^)."""
    side = int(math.sqrt((spec.in_features + spec.out_features) * lora_rank) + 0.5)
    return side - side % 2 if mora_type == 6 else side


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_tables(chunks: int, side: int, device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (chunks x side) of the rotation of chunk j by angles j / 10000^(2i/side), as RoPE and
    the authors' type 6. Computed on the fly: a buffer would make Opacus refuse the layer."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, side, 2, dtype=torch.float32, device=device) / side))
    angles = torch.outer(torch.arange(chunks, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class MoRALayer(BlockAdapterLayer):
    """W0 x + Dec(M . Enc(x)), M trained (r^ x r^); Enc and Dec are fixed:

    - Enc: x padded cyclically to k r^ entries (k = ceil(n / r^), the padding repeats x's first
      entries, as the authors) and cut into k chunks of r^;
      type 6: chunk j rotated by RoPE at position j, and M applied to every chunk;
      type 1: the chunks summed (shared), and M applied once;
    - Dec: M's outputs concatenated and repeated cyclically (or truncated) to m entries.
    """

    components = ("mora_M",)
    mora_type = MORA_DEFAULT_TYPE  # one of MORA_TYPES; a subclass may choose the other

    def __init__(self, base: nn.Module, rank: int, scale: float, kind: str = "mora", residual: bool = False,
                 offset: bool = False):
        super().__init__(base, rank, scale, kind, residual, offset)
        self.side = mora_rank(ModuleSpec("", self.out_features, self.in_features, self.conv1d), rank,
                              self.mora_type)
        self.chunks = -(-self.in_features // self.side)
        self.mora_M = nn.Linear(self.side, self.side, bias=False, dtype=ADAPTER_DTYPE,
                                device=base.weight.device)
        nn.init.zeros_(self.mora_M.weight)

    @classmethod
    def shapes(cls, spec: ModuleSpec, rank: int) -> dict[str, Shape]:
        side = mora_rank(spec, rank, cls.mora_type)
        return {"mora_M": (side, side)}

    @classmethod
    def shape_problem(cls, spec: ModuleSpec, rank: int) -> str | None:
        side = mora_rank(spec, rank, cls.mora_type)
        if not 2 <= side <= spec.in_features:
            return (f"a LoRA rank whose MoRA side r^ = round(sqrt((m + n) r)) lies in 2..n for every target "
                    f"({spec.name or 'a target'} is {spec.out_features} x {spec.in_features}: r^ = {side})")
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        x32 = x.to(ADAPTER_DTYPE)
        pad = self.chunks * self.side - self.in_features
        padded = torch.cat([x32, x32[..., :pad]], dim=-1) if pad else x32
        chunks = padded.unflatten(-1, (self.chunks, self.side))  # (..., k, r^)
        if self.mora_type == 6:
            cos, sin = rope_tables(self.chunks, self.side, x.device)
            chunks = chunks * cos + rotate_half(chunks) * sin
        else:
            chunks = chunks.sum(-2, keepdim=True)
        compressed_out = self.mora_M(chunks).flatten(-2)  # (..., k r^) or (..., r^)
        cyclic = torch.arange(self.out_features, device=x.device) % compressed_out.shape[-1]
        return out + compressed_out[..., cyclic].to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Dec . core . Enc as matrices (an independent route from the forward's reshapes)."""
        m, n, side, k = self.out_features, self.in_features, self.side, self.chunks
        M = self.mora_M.weight
        length = k * side
        encode = F.one_hot(torch.arange(length, device=M.device) % n, n).to(M.dtype)  # (k r^, n)
        if self.mora_type == 6:
            cos, sin = rope_tables(k, side, M.device)
            half = side // 2
            swap = torch.zeros(side, side, dtype=M.dtype, device=M.device)  # rotate_half as a matrix
            swap[:half, half:] = -torch.eye(half, device=M.device)
            swap[half:, :half] = torch.eye(half, device=M.device)
            core = torch.block_diag(*(M @ (torch.diag(cos[j]) + torch.diag(sin[j]) @ swap) for j in range(k)))
        else:
            core = M @ torch.cat([torch.eye(side, dtype=M.dtype, device=M.device)] * k, dim=1)  # (r^, k r^)
        decode = F.one_hot(torch.arange(m, device=M.device) % core.shape[0], core.shape[0]).to(M.dtype)
        return decode @ core @ encode


BLOCK_LAYERS: dict[str, type[BlockAdapterLayer]] = {"bone": BoneLayer, "mora": MoRALayer}


@torch.no_grad()
def save_merged_model(model: nn.Module, kind: str, targets: list[str], rank: int, state: State, out: Path
                      ) -> Path:
    """Fold a block adapter's state (and the task head) into a freshly loaded base `model` (modified)
    and save it with save_pretrained: the exact trained model, where no PEFT adapter type holds it."""
    inject_adapters(model, targets, rank, float(rank), kind)  # block adapters have no scale
    load_state(model, state)
    merge_adapters(model).save_pretrained(out)
    return out
