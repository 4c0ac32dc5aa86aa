"""The experiment config: defaults, YAML + dotted overrides, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsb.experiment.config import ConfigError, load_config, parse_override
from fedsb.experiment.run_config import from_run_config


def test_defaults_and_derived_values():
    c = load_config()
    assert (c.method.name, c.method.rank, c.lora_alpha) == ("fedsb", 8, 8.0)
    assert c.clients_per_round() == c.federation.num_clients  # fraction 1.0
    assert c.federation.weighting == "examples" and c.federation.centralised is False


def test_the_lora_sb_init_lr_is_the_training_lr_over_a_clients_steps_in_the_run():
    """The authors' rule (lr / total steps); method.init.lr stays an explicit override."""
    c = load_config(None, {"train.lr": 0.005, "federation.rounds": 4, "train.local_steps": 8})
    assert c.init_lr == pytest.approx(0.005 / 32)
    assert load_config(None, {"method.init.lr": 1e-6}).init_lr == 1e-6


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("5E-4", 0.0005), (".5", 0.5), ("1_000", 1000),
                                         ("-2e+3", -2000.0), ("0.01", 0.01), ("3", 3)])
def test_numbers_in_overrides_parse_as_numbers(text, value):
    key, parsed = parse_override(f"train.lr={text}")
    assert key == "train.lr" and parsed == value and type(parsed) is type(value)
    assert parse_override('model.name="1e-3"')[1] == "1e-3"  # quoted: still a string


def test_learning_rates_as_ml_users_write_them(tmp_path):
    assert load_config(None, dict([parse_override("train.lr=1e-3")])).train.lr == 0.001
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  lr: 5E-4\ndata:\n  num_examples: 1_000\n")
    c = load_config(path)
    assert (c.train.lr, c.data.num_examples) == (0.0005, 1000)
    app_dir = Path(__file__).resolve().parents[1]
    run_config = {"config": "configs/default.yaml", "overrides": "train.lr=1e-3; method.init.lr=2.5e-6"}
    c = from_run_config(run_config, app_dir)
    assert (c.train.lr, c.method.init.lr) == (0.001, 2.5e-6)


def test_a_device_this_machine_lacks_is_one_line_before_anything_starts():
    import torch

    assert load_config(None, {"model.device": "cpu"}).model.device == "cpu"
    with pytest.raises(ConfigError, match=r"^model.device: got 'tpu'; accepted: 'auto', 'cpu', 'cuda' or"):
        load_config(None, {"model.device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            load_config(None, {"model.device": "cuda"})
        assert str(err.value) == ("model.device: got 'cuda'; accepted: 'auto' or 'cpu' "
                                  "(this machine has no CUDA device)")
    else:  # pragma: no cover - GPU machines
        with pytest.raises(ConfigError, match="this machine has"):
            load_config(None, {"model.device": f"cuda:{torch.cuda.device_count()}"})


def test_the_centralised_reference_pools_every_client_and_keeps_the_total_steps():
    c = load_config(None, {"federation.num_clients": 8, "federation.clients_per_round": 0.5,
                           "train.local_steps": 10, "federation.centralised": True})
    assert (c.federation.num_clients, c.clients_per_round(), c.train.local_steps) == (1, 1, 40)
    assert c.partition.scheme == "iid" and c.federation.centralised
    # Idempotent: the resolved config reloads to itself.
    import dataclasses

    again = load_config(None, {f"{section}.{k}": v for section in ("federation", "train", "partition")
                               for k, v in dataclasses.asdict(getattr(c, section)).items()})
    assert again == c


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("method:\n  name: ffa\n  rank: 4\nfederation:\n  num_clients: 10\n")
    c = load_config(path, {"federation.clients_per_round": 0.3, "method.alpha": 16})
    assert (c.method.name, c.method.rank, c.lora_alpha) == ("ffa", 4, 16.0)
    assert c.clients_per_round() == 3
    assert load_config(path, {"federation.clients_per_round": 4}).clients_per_round() == 4
    assert parse_override("model.target_modules=q,v") == ("model.target_modules", "q,v")
    assert load_config(None, dict([parse_override("model.target_modules=q,v")])).model.target_modules == [
        "q", "v"]


@pytest.mark.parametrize("overrides, message", [
    ({"bogus": 1}, "bogus: unknown key; accepted keys: data, eval, federation"),
    ({"method.bogus": 1}, "method.bogus: unknown key; accepted keys: alpha, init, name, rank"),
    ({"method.name": "fedavg"}, "method.name: got 'fedavg'; accepted: one of 'fedit', 'ffa'"),
    ({"method.rank": 0}, "method.rank: got 0; accepted: a positive integer"),
    ({"method.rank": "x"}, "method.rank: got 'x'; accepted: an integer"),
    ({"federation.clients_per_round": 1.5}, "federation.clients_per_round: got 1.5; accepted: a fraction"),
    ({"federation.clients_per_round": 20}, "federation.clients_per_round: got 20"),
    ({"data.source": "/no/such/file.csv"}, "data.source: got '/no/such/file.csv'; accepted: 'synthetic'"),
    ({"partition.scheme": "zipf"}, "partition.scheme: got 'zipf'; accepted: one of 'iid', 'dirichlet'"),
    ({"eval.client_eval": "yes"}, "eval.client_eval: got 'yes'; accepted: true or false"),
    ({"federation.weighting": "size"},
     "federation.weighting: got 'size'; accepted: one of 'examples', 'uniform'"),
    ({"data.val_fraction": 1.5}, "data.val_fraction: got 1.5; accepted: a number in (0, 1)"),
    ({"data.val_file": "/no/such/val.tsv"},
     "data.val_file: got '/no/such/val.tsv'; accepted: an existing file"),
    ({"train.lr": "1e-3x"}, "train.lr: got '1e-3x'; accepted: a number"),
])
def test_bad_values_give_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config: file .* does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_every_shipped_config_starts_with_its_command_and_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    configs = sorted((root / "configs").glob("*.yaml")) + sorted((root / "tests" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert path.read_text().startswith("# Run: fedsb run "), path
        try:
            load_config(path)
        except ConfigError as err:  # local data that is not on this machine (e.g. SST-2)
            assert str(err).startswith("data.source: got"), (path, err)
