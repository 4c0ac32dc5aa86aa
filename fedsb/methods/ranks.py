"""Clients of different LoRA ranks: which rank each client holds, and how the server combines them.

In a real federation clients differ in memory and bandwidth, so they hold adapters of different
ranks r_i <= r (the global adapter's rank, `method.rank`). A client of rank r_i holds the rank-r_i
*prefix* of the global factors: the first r_i rows of A (r x n) and the first r_i columns of B
(m x r). It downloads and uploads only those (`truncate`), and its model holds the rest at zero
(`pad`, with the adapter layers' `active_rank` masking them, fedsb.core.adapters).

Every client uses the global scale s = alpha / r (not alpha / r_i): the same slice is held by clients
of different ranks, and one scale makes a prefix literally the first r_i terms of the same sum
s * sum_j B[:, j] A[j, :], so padding and truncating never rescale anything. (DyLoRA scales a rank-b
prefix by alpha / b; HetLoRA and FlexLoRA keep each client's own LoRA scale. This is where fedsb
deliberately differs, for the reason above; docs/architecture.md says so too.)

The server combines uploads of different ranks by one of three rules (`federation.rank_aggregation`):
- `pad` (HetLoRA, Cho et al. 2024, arXiv:2401.06432): zero-pad every client's A and B to rank r and
  take the weighted mean over all clients; a slice held by few clients is shrunk towards zero (the
  "rank collapse" of naive padding).
- `rank_aware` (raFLoRA, 2026): each rank slice j is the weighted mean over the clients that hold it
  (r_i > j) only; a slice nobody uploaded keeps its global value.
- `svd` (FlexLoRA, Bai et al. 2024, arXiv:2402.11505): the weighted mean of the clients' full products
  B_i A_i, exact in the product, then factored by SVD into rank-r factors B = U sqrt(S), A = sqrt(S) V^T;
  a client of rank r_i then downloads the prefix, which is the best rank-r_i approximation of the
  averaged product (Eckart-Young).
With every client at rank r, `pad` and `rank_aware` are FedAvg itself.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from fedsb.core.adapters import State, component_of, key

RANK_AGGREGATIONS = ("pad", "rank_aware", "svd")
RANK_ASSIGNMENTS = ("random", "per_client", "by_size")
# The dimension of each rank-sliced component that is the rank (A: r x n, B: m x r).
RANK_DIM = {"lora_A": 0, "lora_B": 1}


def state_rank(state: Mapping[str, torch.Tensor]) -> int | None:
    """The rank of the LoRA factors in a (partial) state, from their shapes; None if it holds none.
    Raises ValueError if they disagree."""
    ranks = {int(v.shape[RANK_DIM[component_of(k)]]) for k, v in state.items() if component_of(k) in RANK_DIM}
    if len(ranks) > 1:
        raise ValueError(f"the LoRA factors have different ranks {sorted(ranks)}")
    return ranks.pop() if ranks else None


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """The rank-`rank` prefix of every LoRA factor (the first rows of A, columns of B); other tensors
    as they are. Works on meta tensors (the closed-form byte counts)."""
    out = {}
    for k, v in state.items():
        dim = RANK_DIM.get(component_of(k))
        out[k] = v if dim is None else v.narrow(dim, 0, min(rank, v.shape[dim]))
    return out


def pad(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """Every LoRA factor zero-padded to rank `rank` (a client's prefix inside the full-rank layout)."""
    out = {}
    for k, v in state.items():
        dim = RANK_DIM.get(component_of(k))
        out[k] = v if dim is None else pad_dim(v, dim, rank)
    return out


def pad_dim(tensor: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """`tensor` zero-padded along `dim` to size `rank` (itself if it has that size)."""
    if tensor.shape[dim] == rank:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = rank
    full = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    full.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return full


def mean_padded(tensors: Sequence[torch.Tensor], weights: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """`pad`: the weighted mean of the factors zero-padded to `rank` along `dim` (float64 sums)."""
    total = sum(float(w) * pad_dim(t.double(), dim, rank) for t, w in zip(tensors, weights, strict=True))
    return total.to(tensors[0].dtype)


def mean_over_holders(tensors: Sequence[torch.Tensor], weights: torch.Tensor, dim: int,
                      current: torch.Tensor) -> torch.Tensor:
    """`rank_aware`: slice j along `dim` is the weighted mean over the tensors that have slice j
    (weights renormalised among them); a slice that none has keeps `current`'s."""
    out = current.double().clone()
    rank = current.shape[dim]
    for j in range(rank):
        holders = [(t, w) for t, w in zip(tensors, weights, strict=True) if t.shape[dim] > j]
        if not holders:
            continue
        total_weight = sum(float(w) for _, w in holders)
        if total_weight <= 0:
            continue
        mean = sum((float(w) / total_weight) * t.double().select(dim, j) for t, w in holders)
        out.select(dim, j).copy_(mean)
    return out.to(current.dtype)


def svd_factors(mean_product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA's redistribution: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T from the SVD of the averaged
    product (float64), so that the rank-k prefix B[:, :k] A[:k] is its best rank-k approximation for
    every k <= rank. Signs are fixed (each column of U has a positive largest entry) so the result
    does not depend on the LAPACK build."""
    u, s, vh = torch.linalg.svd(mean_product.double(), full_matrices=False)
    return _balanced_factors(u, s, vh, rank)


def svd_factors_of_sum(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float],
                       rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`svd_factors` of sum_i w_i B_i A_i without forming it (m x n): that sum is B_s A_s with
    B_s = [w_1 B_1 | ... | w_k B_k] (m x R) and A_s = [A_1; ...; A_k] (R x n), R the sum of the
    ranks. With B_s = Q_b R_b and A_s^T = Q_a R_a (QR), B_s A_s = Q_b (R_b R_a^T) Q_a^T, so the
    SVD of the small R x R core C = U_c S V_c^T gives the product's: U = Q_b U_c, V = Q_a V_c, the
    same singular values. O((m + n) R^2) instead of the full SVD's O(m n min(m, n)): at a 1.1B
    Llama's shapes the full SVDs took 119 s a round. Where R >= min(m, n) the core is no smaller
    than the product, which is then decomposed directly."""
    b_s = torch.cat([float(w) * b.double() for b, w in zip(bs, weights, strict=True)], dim=1)
    a_s = torch.cat([a.double() for a in as_], dim=0)
    if b_s.shape[1] >= min(b_s.shape[0], a_s.shape[1]):
        return svd_factors(b_s @ a_s, rank)
    q_b, r_b = torch.linalg.qr(b_s)
    q_a, r_a = torch.linalg.qr(a_s.T)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T)
    return _balanced_factors(q_b @ u_c, s, vh_c @ q_a.T, rank)


def _balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, signs fixed, zero-padded to `rank` columns/rows."""
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True))).squeeze(0)
    signs[signs == 0] = 1
    u, vh = u * signs, vh * signs[:, None]
    root = s.sqrt()
    b, a = u * root, root[:, None] * vh
    if b.shape[1] < rank:  # a product of rank below r (a tiny module): the rest is zero
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)
    return b, a


def aggregate_factors(rule: str, global_state: State, uploads: Sequence[State], weights: torch.Tensor,
                      modules: Sequence[str], trained: Sequence[str]) -> State:
    """The new global LoRA factors (the trained ones among A and B) under `rule`, for uploads of any
    ranks <= the global's; `weights` sum to 1. Only the factors are returned."""
    new: State = {}
    for name in modules:
        if rule == "svd":
            a, b = key(name, "lora_A"), key(name, "lora_B")
            rank = global_state[b].shape[1]
            new_b, new_a = svd_factors_of_sum([u[b] for u in uploads], [u[a] for u in uploads],
                                              [float(w) for w in weights], rank)
            new[b], new[a] = new_b.to(global_state[b].dtype), new_a.to(global_state[a].dtype)
            continue
        for component in trained:
            k = key(name, component)
            dim = RANK_DIM[component]
            tensors = [u[k] for u in uploads]
            if rule == "pad":
                new[k] = mean_padded(tensors, weights, dim, global_state[k].shape[dim])
            elif rule == "rank_aware":
                new[k] = mean_over_holders(tensors, weights, dim, global_state[k])
            else:
                raise ValueError(f"unknown rank aggregation {rule!r}; accepted: "
                                 + ", ".join(RANK_AGGREGATIONS))
    return new


def assign_client_ranks(ranks: Sequence[int] | None, assignment: str, num_clients: int, seed: int,
                        sizes: Sequence[int] | None = None, default: int | None = None) -> dict[int, int]:
    """Each client's (partition id's) rank, from `federation.client_ranks`:
    - None: every client `default` (the global rank);
    - `per_client`: `ranks[i]` for client i (one per client);
    - `random`: each client draws one of `ranks` uniformly, seeded by the run's seed;
    - `by_size`: clients sorted by data size (`sizes`) get the sorted ranks in equal shares, the
      largest data the largest rank (more data, more capacity; ties broken by partition id)."""
    if not ranks:
        return dict.fromkeys(range(num_clients), default)
    if assignment == "per_client":
        if len(ranks) != num_clients:
            raise ValueError(f"federation.client_ranks has {len(ranks)} ranks for {num_clients} clients "
                             "(rank_assignment=per_client needs one per client)")
        return {i: int(r) for i, r in enumerate(ranks)}
    if assignment == "random":
        rng = random.Random(f"client-ranks-{seed}")
        return {i: int(rng.choice(list(ranks))) for i in range(num_clients)}
    if assignment == "by_size":
        if sizes is None or len(sizes) != num_clients:
            raise ValueError("rank_assignment=by_size needs every client's data size")
        order = sorted(range(num_clients), key=lambda i: (sizes[i], i))
        choices = sorted(ranks)
        return {pid: int(choices[position * len(choices) // num_clients])
                for position, pid in enumerate(order)}
    raise ValueError(f"unknown rank assignment {assignment!r}; accepted: {', '.join(RANK_ASSIGNMENTS)}")
