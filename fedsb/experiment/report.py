"""What a run says about itself: its log label, the setting and privacy parts of its summary, and
each round's privacy metrics. The ServerApp calls these; it computes none of them itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsb.experiment.config import ExperimentConfig
from fedsb.experiment.summary import PrivacySummary
from fedsb.experiment.worker import Worker


def _privacy_status(config: ExperimentConfig) -> str:
    from fedsb.experiment.privacy import privacy_status

    return privacy_status(config)


def run_label(config: ExperimentConfig, worker: Worker) -> str:
    """The prefix of every log line, e.g. 'fedsb r=16' or 'fedit r=8 init=pissa' (an init other than the
    method's default), flagged when the run is not a federated result."""
    label = f"{config.method.name} r={config.method.rank}"
    if worker.method.init.name != worker.method.default_init:
        label += f" init={worker.method.init.name}"
    if worker.init_source == "pooled":
        label += " ORACLE init (pooled data)"  # the paper's setting, not a federated result
    f = config.federation
    if f.client_ranks is not None:
        label += f" ranks={'/'.join(str(r) for r in sorted(set(f.client_ranks)))} {f.rank_aggregation}"
    elif f.rank_aggregation != "pad":
        label += f" {f.rank_aggregation}"
    if config.train.nested_ranks:
        label += " nested"
    if config.federation.centralised:
        label += " CENTRALISED reference (not federated)"
    if config.privacy.enabled:
        status = _privacy_status(config)
        label += f" DP eps<={config.privacy.epsilon:g}" + (" NOT PRIVATE" if status.startswith("not private")
                                                           else "")
    return label


def run_setting(config: ExperimentConfig, worker: Worker, connected: int, run_dir: Path,
                client_ranks: dict[int, int] | None = None) -> dict[str, Any]:
    """The RunSummary fields that describe the run's setting."""
    mixed = config.federation.client_ranks is not None and client_ranks
    return {
        "client_ranks": {str(pid): r for pid, r in sorted(client_ranks.items())} if mixed else None,
        "rank_aggregation": (config.federation.rank_aggregation if mixed or config.train.nested_ranks
                             or config.federation.rank_aggregation != "pad" else None),
        "nested_ranks": config.train.nested_ranks,
        "method": config.method.name,
        # the centralised reference is named for its centralised adapter (Fed-SB's is LoRA-SB)
        "method_label": (worker.method.centralised_label if config.federation.centralised
                         else worker.method.label),
        "rank": config.method.rank, "alpha": config.lora_alpha,
        "seed": config.seed, "model": config.model.name, "data": config.data.source,
        "num_clients": config.federation.num_clients, "connected_clients": connected,
        "clients_per_round": config.clients_per_round(), "rounds": config.federation.rounds,
        "local_steps": config.train.local_steps, "lr": config.train.lr, "init_lr": config.init_lr,
        "weighting": config.federation.weighting, "centralised": config.federation.centralised,
        "init": worker.method.init.name,
        "init_source": worker.init_source,
        "oracle": worker.init_source == "pooled",  # the paper's pooled-data init: not a federated result
        "partition": {"scheme": config.partition.scheme, "alpha": config.partition.alpha,
                      "label_counts": worker.data.stats(), "label_names": worker.data.label_names},
        "run_dir": str(run_dir),
        "accuracy_metric": (f"exact match (greedy generation, {config.eval.answer_style} answers)"
                            if worker.generates else "accuracy"),
    }


def truncated_ranks(config: ExperimentConfig, client_ranks: dict[int, int] | None = None) -> list[int]:
    """The ranks the chosen adapter is also tested at (eval.truncated_ranks; by default, with mixed or
    nested ranks, r/4, r/2 and the clients' ranks below r)."""
    r = config.method.rank
    if config.eval.truncated_ranks is not None:
        return sorted(set(config.eval.truncated_ranks))
    if config.federation.client_ranks is None and not config.train.nested_ranks:
        return []
    return sorted({max(1, r // 4), max(1, r // 2), *(client_ranks or {}).values()} - {r})


def epsilon_metrics(trained: dict[int, float], ledgers: dict[int, dict[str, float]]) -> dict[str, float]:
    """A round's privacy metrics: epsilon of the clients that trained, and the max over all so far."""
    spent = [ledger["epsilon"] for ledger in ledgers.values()]
    return {"epsilon_max": max(trained.values(), default=0.0),
            "epsilon_mean": sum(trained.values()) / len(trained) if trained else 0.0,
            "epsilon_max_all": max(spent, default=0.0)}


def privacy_summary(config: ExperimentConfig, ledgers: dict[int, dict[str, float]]) -> PrivacySummary:
    if not config.privacy.enabled:
        return PrivacySummary(enabled=False)
    per_client = {str(pid): ledgers[pid] for pid in sorted(ledgers)}
    noise = [c["noise_multiplier"] for c in per_client.values()]
    return PrivacySummary(
        enabled=True, status=_privacy_status(config),
        guarantee="sample-level (epsilon, delta)-DP per client with respect to its own data, "
                  "composed over every round (DP-SGD, Opacus)",
        target_epsilon=config.privacy.epsilon, accountant=config.privacy.accountant,
        epsilon_max=max((c["epsilon"] for c in per_client.values()), default=0.0),
        released_outside_dp=released_outside_dp(config),
        delta_max=max((c["delta"] for c in per_client.values()), default=None),
        max_grad_norm=config.privacy.max_grad_norm,
        noise_multiplier_range=[min(noise, default=None), max(noise, default=None)],
        per_client=per_client,
    )


def released_outside_dp(config: ExperimentConfig) -> str:
    """What a private client sends beside its DP-trained tensors, which the epsilon does not cover."""
    if config.federation.weighting == "examples":
        return ("each client's number of training examples (its aggregation weight, "
                "federation.weighting=examples) is sent in the clear; federation.weighting=uniform avoids it")
    return "nothing: every client reports the weight 1 (federation.weighting=uniform)"
