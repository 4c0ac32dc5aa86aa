"""The experiment's data: loaded, split (train pool / validation / test / server) and partitioned."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from fedsb.data.instructions import load_instruction_file, load_instructions
from fedsb.data.partition import partition_dataset, partition_stats
from fedsb.data.schema import DataError
from fedsb.data.sources import load_file, load_task, split_train_test, subsample
from fedsb.experiment.config import ExperimentConfig

# The server-held split used for the LoRA-SB init (init.source = server) is carved out of the
# training pool before partitioning: clients never see it.
SERVER_SPLIT_FRACTION = 0.05


@dataclass
class TaskData:
    train: Dataset  # the clients' pool (partitioned)
    test: Dataset  # the server's test set: evaluated only at the points a run reports
    validation: Dataset  # the server's validation set: evaluated every round, the basis of every choice
    server: Dataset  # the server-held (public) split for the LoRA-SB init
    partitions: list[Dataset]
    label_names: list[str]

    def stats(self) -> list[list[int]]:
        return partition_stats(self.partitions, len(self.label_names))


def load_task_data(config: ExperimentConfig) -> TaskData:
    """Load, split and partition the experiment's data, deterministically from the seed."""
    pool, test, validation, server, names = load_splits(config)
    p = config.partition
    partitions = partition_dataset(pool, config.federation.num_clients, p.scheme, alpha=p.alpha,
                                   classes_per_client=p.classes_per_client, seed=config.seed)
    return TaskData(pool, test, validation, server, partitions, names)


def load_splits(config: ExperimentConfig) -> tuple[Dataset, Dataset, Dataset, Dataset, list[str]]:
    """The data before partitioning: (train pool, test, validation, server split, label names)."""
    d = config.data
    if config.model.task == "causal_lm":
        train, test, names = _load_instructions(config)
    else:
        train, test, names = _load_classification(config)
    if d.val_file is not None:
        validation = (_val_instructions(config, names) if config.model.task == "causal_lm"
                      else _val_classification(config, names))
    else:  # held out of the training pool before anything else: no client ever sees it
        train, validation = split_train_test(train, d.val_fraction, config.seed)
    validation = subsample(validation, d.max_val_examples or None, config.seed).flatten_indices()
    n_server = max(config.method.init.num_samples, int(SERVER_SPLIT_FRACTION * len(train)))
    if n_server >= len(train):
        raise DataError(f"the training pool has {len(train)} examples after the validation split, not "
                        f"enough to hold out the server's {n_server} (method.init.num_samples) and leave "
                        "examples for the clients; use more data or a smaller method.init.num_samples")
    parts = train.train_test_split(test_size=n_server, seed=config.seed)
    pool, server = parts["train"].flatten_indices(), parts["test"].flatten_indices()
    return pool, test, validation, server, names


def _load_classification(config: ExperimentConfig) -> tuple[Dataset, Dataset, list[str]]:
    d = config.data
    return load_task(
        d.source, text_column=d.text_column, label_column=d.label_column, test_file=d.test_file,
        num_examples=d.num_examples or None, num_test=d.max_test_examples or None,
        test_fraction=d.test_fraction, num_classes=d.num_classes, seed=config.seed,
        text_pair_column=d.text_pair_column, drop_unlabelled=d.drop_unlabelled, header=d.header,
    )


def _val_classification(config: ExperimentConfig, names: list[str]) -> Dataset:
    d = config.data
    return load_file(d.val_file, text_column=d.text_column, label_column=d.label_column, label_names=names,
                     text_pair_column=d.text_pair_column, drop_unlabelled=d.drop_unlabelled,
                     header=d.header)[0]


def _instruction_columns(config: ExperimentConfig) -> dict:
    d = config.data
    return dict(prompt_column=d.prompt_column, response_column=d.response_column,
                input_column=d.input_column, category_column=d.label_column)


def _load_instructions(config: ExperimentConfig) -> tuple[Dataset, Dataset, list[str]]:
    d = config.data
    return load_instructions(d.source, **_instruction_columns(config), test_file=d.test_file,
                             num_examples=d.num_examples or None, num_test=d.max_test_examples or None,
                             test_fraction=d.test_fraction, seed=config.seed,
                             test_prompt_column=d.test_prompt_column,
                             test_response_column=d.test_response_column)


def _val_instructions(config: ExperimentConfig, names: list[str]) -> Dataset:
    return load_instruction_file(config.data.val_file, names, **_instruction_columns(config))
