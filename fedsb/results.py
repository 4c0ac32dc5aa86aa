"""The run directory: config snapshot, per-round metrics, comm log, summary, exported adapter.

    <output_dir>/<run name>/
        config.yaml     the resolved config
        metrics.jsonl   one row per round (the global state on the validation split)
        comm.csv        one row per (round, client, direction, component) from the meter
        summary.json    test accuracy at the round chosen on validation and at the last round,
                        validation accuracy per choice, bytes by direction and component, ...
        partition.png   label distribution per client
        adapter/        the final global adapter in PEFT LoRA format (merged/ too for FedEx-LoRA)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from fedsb.adapters import HEAD, State, component_of, key
from fedsb.comm import CSV_FIELDS, Meter
from fedsb.methods.base import FederatedMethod
from fedsb.models import find_head_modules


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """A fresh, absolute run directory under output_dir (suffixed if the name is taken)."""
    root = Path(output_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{stamp}-{name}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{stamp}-{name}-{suffix}"
    path.mkdir()
    return path


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: the files stay strict JSON (e.g. DP runs release no loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(json_safe(row)) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")


class RunRecorder:
    """Writes a run's per-round outputs as they happen: metrics.jsonl, comm.csv and one log line.

    `end_round` is called once per round (round 0 = before training: the initial evaluation
    and any init traffic), after the round's messages have been metered, with the evaluation of
    the global state on the validation split.
    """

    def __init__(self, run_dir: Path, meter: Meter, label: str, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.meter = meter
        self.label = label  # e.g. "fedsb r=16": the prefix of every log line
        self.log = log
        self.start = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        with open(self.run_dir / "comm.csv", "w", newline="") as f:
            csv.writer(f).writerow(CSV_FIELDS)

    def end_round(self, server_round: int, evaluation: dict[str, float], **extra: Any) -> dict[str, Any]:
        up = self.meter.total("bytes", round=server_round, direction="up")
        down = self.meter.total("bytes", round=server_round, direction="down")
        previous = self.rows[-1] if self.rows else {"cum_bytes_up": 0, "cum_bytes_down": 0}
        row = {
            "round": server_round, "val_accuracy": evaluation.get("accuracy"),
            "val_loss": evaluation.get("loss"),
            "bytes_up": up, "bytes_down": down,
            "cum_bytes_up": previous["cum_bytes_up"] + up,
            "cum_bytes_down": previous["cum_bytes_down"] + down,
            "wire_bytes_up": self.meter.total("wire_bytes", round=server_round, direction="up"),
            "wire_bytes_down": self.meter.total("wire_bytes", round=server_round, direction="down"),
            "wall_s": round(time.monotonic() - self.start, 2), **extra,
        }
        self.rows.append(row)
        append_metrics(self.run_dir, row)
        with open(self.run_dir / "comm.csv", "a", newline="") as f:
            writer = csv.writer(f)
            for entry in self.meter.select(round=server_round):
                writer.writerow(dataclasses.astuple(entry))
        line = (f"[{self.label}] round {server_round}: val accuracy {row['val_accuracy']:.3f} "
                f"val loss {row['val_loss']:.3f} | "
                f"up {up:,} B, down {down:,} B (total up {row['cum_bytes_up']:,} B, "
                f"down {row['cum_bytes_down']:,} B) | {row['wall_s']:.1f} s")
        if "epsilon_max_all" in row:
            line += f" | epsilon max {row['epsilon_max_all']:.2f}"
        rejected = extra.get("rejected") or {}
        if rejected:
            reasons = "; ".join(f"client {c}: {r}" for c, r in rejected.items())
            line += f" | rejected {len(rejected)}: {reasons}"
        self.log(line)
        return row

    def best_row(self) -> dict[str, Any] | None:
        """The trained round with the best validation accuracy (the first of equals): the chosen point."""
        trained = [r for r in self.rows if r["round"] > 0]
        return max(trained, key=lambda r: r["val_accuracy"], default=None)

    def summary(self, chosen_test: dict[str, float] | None = None, final_test: dict[str, float] | None = None,
                **fields: Any) -> dict[str, Any]:
        """summary.json: the test accuracy at the round chosen on validation (`test_accuracy`, the
        number to report) and at the last round, the validation accuracies, bytes, wall time, ..."""
        trained = [r for r in self.rows if r["round"] > 0]
        best = self.best_row()
        chosen_test, final_test = chosen_test or {}, final_test or {}
        summary = {
            **fields,
            "rounds_completed": len(trained),
            "selection": "validation",
            "initial_val_accuracy": self.rows[0]["val_accuracy"] if self.rows else None,
            "final_val_accuracy": trained[-1]["val_accuracy"] if trained else None,
            "final_val_loss": trained[-1]["val_loss"] if trained else None,
            "best_val_accuracy": best["val_accuracy"] if best else None,
            "best_round": best["round"] if best else None,
            "test_accuracy": chosen_test.get("accuracy"),
            "test_loss": chosen_test.get("loss"),
            "final_test_accuracy": final_test.get("accuracy"),
            "final_test_loss": final_test.get("loss"),
            "communication": self.meter.summary(),
            "wall_s": round(time.monotonic() - self.start, 2),
        }
        write_summary(self.run_dir, summary)
        return summary


def plot_partition(run_dir: Path, counts: list[list[int]], label_names: list[str]) -> Path:
    """Stacked bars of label counts per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = range(len(counts))
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(counts) + 2), 3.2))
    bottom = [0] * len(counts)
    colors = plt.get_cmap("tab10").colors
    for label, name in enumerate(label_names):
        heights = [c[label] for c in counts]
        ax.bar(clients, heights, bottom=bottom, label=name, color=colors[label % len(colors)])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("training examples")
    ax.set_xticks(list(clients))
    ax.legend(fontsize=7, ncols=min(len(label_names), 4), loc="upper right")
    ax.set_title("Label distribution per client")
    fig.tight_layout()
    path = run_dir / "partition.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def peft_lora_tensors(method: FederatedMethod, state: State) -> dict[str, dict[str, torch.Tensor]]:
    """Per module, the (lora_A, lora_B) pair that PEFT's LoRA holds for this state.

    LoRA methods export A and B as they are. Fed-SB exports lora_B = B R and lora_A = A with the
    same scale, so PEFT's s * lora_B lora_A equals s * B R A. FedEx-LoRA's dense residual is not
    low-rank and is exported separately (see `export_adapter`).
    """
    pairs = {}
    for name in method.specs:
        b = state[key(name, "lora_B")]
        if method.adapter_kind == "lora_sb":
            b = b @ state[key(name, "lora_R")]
        pairs[name] = {"lora_A": state[key(name, "lora_A")], "lora_B": b}
    return pairs


@torch.no_grad()
def export_adapter(run_dir: Path, base_model: nn.Module, method: FederatedMethod, state: State,
                   task: str) -> Path:
    """Write the global adapter in PEFT LoRA format to run_dir/adapter (loadable by PeftModel).

    `base_model` must be a freshly loaded base model without fedsb adapters; it is modified.
    For FedEx-LoRA, whose residual is not low-rank, the exact model (base + residual + BA,
    merged) is also saved to run_dir/merged with save_pretrained.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    heads = find_head_modules(base_model)
    conv1d = any(spec.conv1d for spec in method.specs.values())
    config = LoraConfig(
        r=method.rank, lora_alpha=method.alpha, target_modules=list(method.specs),
        modules_to_save=heads or None, fan_in_fan_out=conv1d, init_lora_weights=False,
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    peft_model = get_peft_model(base_model, config)
    params = dict(peft_model.named_parameters())
    for name, pair in peft_lora_tensors(method, state).items():
        for part, value in pair.items():
            params[f"base_model.model.{name}.{part}.default.weight"].copy_(value)
    for k, value in state.items():
        if component_of(k) == HEAD:
            head, _, pname = k.rpartition(".")
            params[f"base_model.model.{head}.modules_to_save.default.{pname}"].copy_(value)
    out = run_dir / "adapter"
    peft_model.save_pretrained(out)
    (out / "FEDSB_README.md").write_text(_export_note(method))
    if method.residual:
        merged = peft_model.merge_and_unload()
        for name in method.specs:
            merged.get_submodule(name).weight += state[key(name, "residual")]
        merged.save_pretrained(run_dir / "merged")
    return out


def _export_note(method: FederatedMethod) -> str:
    note = (f"# fedsb export: method {method.name}, rank {method.rank}, alpha {method.alpha}\n\n"
            "Load with `PeftModel.from_pretrained(base_model, this_dir)`.\n")
    if method.adapter_kind == "lora_sb":
        note += "Fed-SB's B R A is stored as PEFT lora_B = B R, lora_A = A (same scale): exact.\n"
    if method.residual:
        note += ("FedEx-LoRA's accumulated residual is dense (not low-rank), so this adapter alone is "
                 "NOT the trained model: ../merged/ holds the exact merged model (save_pretrained).\n")
    return note
