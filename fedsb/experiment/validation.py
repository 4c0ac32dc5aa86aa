"""Validation of an experiment config: range and cross-field checks, before anything starts.

Every error is a ConfigError whose message is one line naming the key and what is accepted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsb.experiment.config import ExperimentConfig


class ConfigError(ValueError):
    """A bad config value: the message names the key and what is accepted."""


def _require(condition: bool, key: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: got {value!r}; accepted: {accepted}")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


def _check_device(device: str) -> None:
    """model.device names a device this machine has (one line naming what it has otherwise)."""
    _require(bool(DEVICE_PATTERN.match(device)), "model.device", device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not device.startswith("cuda"):
        return
    import torch  # only here: the launcher validates configs without loading torch when it can

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    _require(index < count, "model.device", device,
             "'auto' or 'cpu' (this machine has no CUDA device)" if count == 0
             else f"'auto', 'cpu', or cuda:0..cuda:{count - 1} (this machine has {count} CUDA device(s))")


def uses_init_gradients(c: ExperimentConfig) -> bool:
    """Whether the config's init (method.init.name, or the method's default) is gradient-based (so
    method.init.source matters).

    Asks the method class, which imports torch: only called where the answer changes a check."""
    from fedsb.methods import get_method

    return get_method(c.method.name).needs_init_gradients(c.method.init.name)


def _check_init(c: ExperimentConfig) -> None:
    """method.init.name: a known init, and one the method accepts (the method's class is imported,
    and with it torch, only when an init is named)."""
    from fedsb.core.init_choices import get_init, init_names  # torch-free declarations

    name = c.method.init.name
    if name is None:
        return
    _require(name in init_names(), "method.init.name", name,
             "null (the method's default) or one of " + ", ".join(repr(n) for n in init_names()))
    from fedsb.methods import get_method

    method = get_method(c.method.name)
    accepted = method.accepted_inits()
    _require(name in accepted, "method.init.name", name,
             f"{' or '.join(repr(n) for n in accepted)} with method.name={c.method.name} (its adapter is "
             f"{method.adapter_kind}; {name} initialises {get_init(name).adapter_kind})")


def _check_ranks(c: ExperimentConfig) -> None:
    """Clients of different ranks, nested-rank training and truncated evaluation (fedsb.methods.ranks):
    ranks in 1..method.rank, and a method and init that can take them (the method class is imported,
    and with it torch, only when one of these keys is set)."""
    f, r = c.federation, c.method.rank
    for key, ranks in (("federation.client_ranks", f.client_ranks),
                       ("eval.truncated_ranks", c.eval.truncated_ranks)):
        _require(ranks is None or (len(ranks) > 0 and all(1 <= x <= r for x in ranks)), key, ranks,
                 f"null or a non-empty list of ranks in 1..method.rank ({r})")
    if f.client_ranks is not None and f.rank_assignment == "per_client" and f.num_clients != "auto":
        _require(len(f.client_ranks) == f.num_clients, "federation.client_ranks", f.client_ranks,
                 f"one rank per client ({f.num_clients}) with federation.rank_assignment=per_client")
    mixed = f.client_ranks is not None or c.train.nested_ranks
    if not mixed and f.rank_aggregation == "pad" and c.eval.truncated_ranks is None:
        return
    from fedsb.methods import get_method

    method = get_method(c.method.name)
    fixed_rank = f"with method.name={c.method.name} (its clients all hold the global rank)"
    _require(f.client_ranks is None or bool(method.rank_aggregations), "federation.client_ranks",
             f.client_ranks, f"null {fixed_rank}")
    _require(not c.train.nested_ranks or bool(method.rank_aggregations), "train.nested_ranks",
             c.train.nested_ranks, f"false {fixed_rank}")
    _require(c.eval.truncated_ranks is None or bool(method.rank_aggregations), "eval.truncated_ranks",
             c.eval.truncated_ranks, f"null {fixed_rank}: its adapter is not truncated to a rank prefix")
    accepted = ", ".join(repr(a) for a in method.rank_aggregations) or "'pad' (unused)"
    _require(f.rank_aggregation in method.rank_aggregations or f.rank_aggregation == "pad",
             "federation.rank_aggregation", f.rank_aggregation,
             f"one of {accepted} with method.name={c.method.name}")
    if mixed:
        init = method.init_for(c.method.init.name)
        _require(not init.offsets_base, "method.init.name", c.method.init.name,
                 "an init that leaves the base weight as it is (kaiming) with client_ranks or nested_ranks: "
                 f"{init.label} takes its full-rank product out of the base weight, which a truncated "
                 "adapter would not put back")


HEADERLESS_SUFFIXES = (".csv", ".tsv")  # the file kinds that data.header=false applies to


def _check_header(c: ExperimentConfig) -> None:
    """data.header=false: classification csv/tsv files, their columns given by position."""
    d = c.data
    if d.header:
        return
    _require(c.model.task == "classification", "data.header", d.header,
             "true with model.task=causal_lm (instruction files need a header row)")
    from fedsb.experiment.config import is_file_source

    for key in ("source", "test_file", "val_file"):
        value = getattr(d, key)
        if value is not None and is_file_source(value):
            _require(Path(value).suffix.lower() in HEADERLESS_SUFFIXES, "data.header", d.header,
                     f"true for data.{key}={value} (false: csv or tsv files without a header row)")
    for key in ("text_column", "label_column", "text_pair_column"):
        value = getattr(d, key)
        _require(value is None or str(value).isdigit(), f"data.{key}", value,
                 "a column position, an integer such as 0 or 1, with data.header=false")


def _check_tracking(names: list[str]) -> None:
    from fedsb.experiment.tracking import tracking_problem  # torch-free

    if (problem := tracking_problem(names)) is not None:
        raise ConfigError(f"tracking: {problem}")


def validate(c: ExperimentConfig) -> None:
    """Range checks and cross-field checks; file existence for local data."""
    _require(c.model.max_length >= 8, "model.max_length", c.model.max_length, "an integer >= 8")
    _check_tracking(c.tracking)
    _check_device(c.model.device)
    from fedsb.methods import method_names  # torch-free: the registry imports a method when it is built

    _require(c.method.name in method_names(), "method.name", c.method.name,
             "one of " + ", ".join(repr(n) for n in method_names()))
    _require(c.method.rank > 0, "method.rank", c.method.rank, "a positive integer")
    _require(c.method.alpha is None or c.method.alpha > 0, "method.alpha", c.method.alpha,
             "a positive number or null")
    _require(c.method.init.num_samples > 0, "method.init.num_samples", c.method.init.num_samples,
             "a positive integer")
    _check_init(c)
    _check_ranks(c)
    k = c.federation.num_clients
    auto = k == "auto"
    _require(auto or k >= 1, "federation.num_clients", k, "an integer >= 1 or 'auto'")
    _require(c.federation.rounds >= 1, "federation.rounds", c.federation.rounds, "an integer >= 1")
    cpr = c.federation.clients_per_round
    _require(0 < cpr <= 1 or (cpr > 1 and float(cpr).is_integer() and (auto or cpr <= k)),
             "federation.clients_per_round", cpr,
             f"a fraction in (0, 1] or a count <= federation.num_clients ({k})")
    f = c.federation
    _require(f.round_timeout_s > 0, "federation.round_timeout_s", f.round_timeout_s, "a positive number")
    _require(0 < f.min_clients <= 1 or float(f.min_clients).is_integer(), "federation.min_clients",
             f.min_clients, "a fraction in (0, 1] of the cohort, or a count >= 1")
    _require(f.max_failed_rounds >= 1, "federation.max_failed_rounds", f.max_failed_rounds, "an integer >= 1")
    _require(f.max_update_norm is None or f.max_update_norm > 0, "federation.max_update_norm",
             f.max_update_norm, "a positive number or null")
    _require(not (auto and c.federation.centralised), "federation.num_clients", k,
             "a number with federation.centralised=true (the reference pools that many clients' data)")
    _require(c.train.local_steps >= 1, "train.local_steps", c.train.local_steps, "an integer >= 1")
    _require(c.train.batch_size >= 1, "train.batch_size", c.train.batch_size, "an integer >= 1")
    _require(c.train.lr > 0, "train.lr", c.train.lr, "a positive number")
    _require(c.eval.batch_size >= 1, "eval.batch_size", c.eval.batch_size, "an integer >= 1")
    _require(c.partition.alpha > 0, "partition.alpha", c.partition.alpha, "a positive number")
    _require(c.partition.classes_per_client >= 1, "partition.classes_per_client",
             c.partition.classes_per_client, "an integer >= 1")
    _require(0 < c.data.test_fraction < 1, "data.test_fraction", c.data.test_fraction,
             "a number in (0, 1)")
    _require(c.data.num_examples >= 0, "data.num_examples", c.data.num_examples, "an integer >= 0")
    _require(c.data.num_classes >= 2, "data.num_classes", c.data.num_classes, "an integer >= 2")
    _require(0 < c.data.val_fraction < 1, "data.val_fraction", c.data.val_fraction, "a number in (0, 1)")
    _require(c.data.max_val_examples >= 0, "data.max_val_examples", c.data.max_val_examples,
             "an integer >= 0")
    pair = c.data.text_pair_column
    _require(pair is None or (bool(pair) and pair not in (c.data.text_column, c.data.label_column)),
             "data.text_pair_column", pair, "null or a column name other than data.text_column and "
             "data.label_column")
    _require(pair is None or c.data.source != "synthetic", "data.text_pair_column", pair,
             "null with data.source=synthetic (the generated task has one text)")
    _check_header(c)
    source = c.data.source
    from fedsb.experiment.config import GENERATED_SOURCES as generated
    from fedsb.experiment.config import is_file_source

    _require(source not in generated.values() or source == generated[c.model.task], "data.source", source,
             f"'{generated[c.model.task]}' (the generated {c.model.task} task), a file or 'hf:<name>' "
             f"with model.task={c.model.task}")
    if is_file_source(source):
        _require(Path(source).expanduser().is_file(), "data.source", source,
                 "'synthetic', 'arithmetic', 'hf:<dataset name>', or an existing csv/tsv/json/jsonl/parquet "
                 "file")
    _require(c.eval.max_new_tokens >= 1, "eval.max_new_tokens", c.eval.max_new_tokens, "an integer >= 1")
    for name in ("test_file", "val_file"):
        value = getattr(c.data, name)
        # a causal LM's test set may be another hub dataset (GSM8K after MetaMathQA)
        hub_ok = name == "test_file" and c.model.task == "causal_lm" and str(value).startswith("hf:")
        if value is not None and not hub_ok:
            _require(Path(value).expanduser().is_file(), f"data.{name}", value, "an existing file or null")
    # privacy (fedsb.experiment.privacy) -------------------------------------------------------
    pv = c.privacy
    _require(pv.epsilon > 0, "privacy.epsilon", pv.epsilon, "a positive number")
    _require(pv.delta is None or 0 < pv.delta < 1, "privacy.delta", pv.delta, "a number in (0, 1) or null")
    _require(pv.max_grad_norm > 0, "privacy.max_grad_norm", pv.max_grad_norm, "a positive number")
    _require(pv.init_noise_multiplier > 0, "privacy.init_noise_multiplier", pv.init_noise_multiplier,
             "a positive number")
    _require(pv.calibration_rounds is None or 1 <= pv.calibration_rounds <= c.federation.rounds,
             "privacy.calibration_rounds", pv.calibration_rounds,
             f"null or an integer in 1..federation.rounds ({c.federation.rounds})")
    # The pooled init sees every client's raw data in one place: no DP guarantee covers it.
    _require(not (pv.enabled and c.method.init.source == "pooled" and not pv.allow_pooled_init
                  and uses_init_gradients(c)), "method.init.source", c.method.init.source,
             "'server' or 'clients' with privacy.enabled (or set privacy.allow_pooled_init=true; "
             "the run is then not private)")
