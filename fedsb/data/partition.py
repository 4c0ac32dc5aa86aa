"""Partitioning a task's training pool into client datasets, and the partitions' label counts.

The partitions come from flwr-datasets' partitioners (IID, Dirichlet, pathological "classes")
applied to an in-memory dataset; fedsb adds seeded retries, one-line errors and a guarantee that
no client is empty. Label counts (`partition_stats`) and the label-distribution figure
(`plot_partition`) go through flwr-datasets' own metrics and visualisation, which expect a
partitioner: `_Prebuilt` hands them the partitions already built.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fedsb.core.memory import release_free_memory
from fedsb.data.schema import LABEL, DataError, check_columns, column

SCHEMES = ("iid", "dirichlet", "classes")
DIRICHLET_RETRY_S = 30.0  # seeded Dirichlet redraws stop after this long (each draws 10 times)
PLOT_MAX_WIDTH_IN = 24.0  # partition.png's widest figure (inches, at 110 dpi)
PLOT_MAX_CLIENTS = 100  # partition.png draws the first this many clients (5.6 s for 1000 bars)


def partition_dataset(
    ds: Dataset,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 1,
    seed: int = 0,
    label_column: str = LABEL,
) -> list[Dataset]:
    """Split `ds` into `num_partitions` non-empty client datasets, deterministically from `seed`.

    Schemes: 'iid' (seeded shuffle, then equal contiguous shards), 'dirichlet' (per-class
    Dirichlet(alpha) proportions; smaller alpha = more label skew), 'classes' (each client
    holds exactly `classes_per_client` classes, the first one round-robin so every class is
    used when there are at least as many clients as classes). 'dirichlet' uses flwr-datasets'
    self-balancing (a client above the average size gets no more classes), and every client
    gets at least `min_partition_size` examples (default 1: non-empty; flwr-datasets' own
    default is 10): the Dirichlet draw is repeated (about 100 times at most, seeded), then a
    DataError says it is impossible. Redrawing favours less extreme draws, so a large
    minimum makes small alphas less skewed than they look.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; accepted: {', '.join(SCHEMES)}")
    if not 1 <= num_partitions <= len(ds):
        raise DataError(f"cannot split {len(ds)} examples into {num_partitions} non-empty partitions")
    check_columns(ds.column_names, [label_column], "the dataset")
    labels = np.asarray(column(ds, label_column), dtype=np.int64)
    num_classes = len(np.unique(labels))

    if scheme == "iid":
        partitioner: Any = IidPartitioner(num_partitions)
        partitioner.dataset = ds.shuffle(seed=seed)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        if not 1 <= min_partition_size <= len(ds) // num_partitions:
            raise DataError(f"min_partition_size must be in 1..{len(ds) // num_partitions} "
                            f"({len(ds)} examples, {num_partitions} clients), got {min_partition_size}")
        partitioner = _dirichlet_partitioner(ds, num_partitions, alpha, min_partition_size, seed,
                                             label_column)
    else:
        if not 1 <= classes_per_client <= num_classes:
            raise DataError(f"classes_per_client must be in 1..{num_classes} (the dataset's "
                            f"classes), got {classes_per_client}")
        counts = np.bincount(labels)
        partitioner = PathologicalPartitioner(
            num_partitions, partition_by=label_column, num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic", shuffle=True, seed=seed,
        )
        partitioner.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "classes will NOT be used" when P < C
                partitioner.load_partition(0)
        except ValueError as err:
            raise DataError(f"'classes' partitioning of {len(ds)} examples (class counts "
                            f"{counts.tolist()}) into {num_partitions} clients with "
                            f"{classes_per_client} classes each is impossible: {err}") from err

    parts = [partitioner.load_partition(i) for i in range(num_partitions)]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:  # defensive: every scheme above should prevent this
        raise DataError(f"partitions {empty} are empty; use fewer clients or more data")
    return parts


def _dirichlet_partitioner(ds: Dataset, num_partitions: int, alpha: float, min_partition_size: int, seed: int,
                           label_column: str) -> DirichletPartitioner:
    """A Dirichlet draw that gives every client at least `min_partition_size` examples, or DataError.

    Retries with derived seeds (still deterministic): flwr-datasets gives up after 10 draws, which
    strongly skewed settings (alpha 0.1, many clients) can exhaust. A draw over thousands of clients
    takes seconds, so the retries stop after DIRICHLET_RETRY_S (10,000 clients at alpha 0.5 used to be
    refused only after 6 minutes of redraws)."""
    start = time.monotonic()
    for attempt in range(10):
        partitioner = DirichletPartitioner(
            num_partitions, partition_by=label_column, alpha=alpha,
            min_partition_size=min_partition_size, self_balancing=True, shuffle=True,
            seed=seed if attempt == 0 else int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0]),
        )
        partitioner.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flwr warns on every failed draw
                partitioner.load_partition(0)
            return partitioner
        except ValueError:
            if time.monotonic() - start > DIRICHLET_RETRY_S:
                break
    num_classes = len(set(column(ds, label_column)))
    raise DataError(
        f"dirichlet partitioning (alpha={alpha}) could not give each of {num_partitions} clients at least "
        f"{min_partition_size} of {len(ds)} examples ({num_classes} classes) in {10 * (attempt + 1)} draws "
        f"({time.monotonic() - start:.0f} s); use fewer clients, a larger alpha, more data or a smaller "
        "min_partition_size")


class _Prebuilt(Partitioner):
    """A partitioner over partitions that already exist, for flwr-datasets' metrics and plots.

    Its `dataset` holds one row per class (a ClassLabel of `label_names`): flwr-datasets reads
    the label values and verbose names from it, so a class no client holds still gets a column.
    """

    def __init__(self, partitions: Sequence[Dataset], label_names: Sequence[str],
                 label_column: str = LABEL) -> None:
        super().__init__()
        self.partitions = list(partitions)
        self.dataset = Dataset.from_dict(
            {label_column: list(range(len(label_names)))},
            features=Features({label_column: ClassLabel(names=list(label_names))}))

    @property
    def num_partitions(self) -> int:
        return len(self.partitions)

    def load_partition(self, partition_id: int) -> Dataset:
        return self.partitions[partition_id]


def partition_stats(partitions: Sequence[Dataset], num_classes: int, label_column: str = LABEL
                    ) -> list[list[int]]:
    """Label counts per partition: stats[client][class] (flwr_datasets.metrics.compute_counts)."""
    from flwr_datasets.metrics import compute_counts

    if not partitions:
        return []
    for i, p in enumerate(partitions):
        check_columns(p.column_names, [label_column], f"partition {i}")
    names = [str(c) for c in range(num_classes)]
    counts = compute_counts(_Prebuilt(partitions, names, label_column), label_column)
    outside = [c for c in counts.columns if c not in range(num_classes)]
    if outside:  # compute_counts would add a column for them; fedsb's rows are exactly C long
        raise DataError(f"partitions hold labels {outside[:10]} outside 0..{num_classes - 1}")
    return counts.reindex(columns=range(num_classes), fill_value=0).to_numpy(dtype=np.int64).tolist()


def format_partition_stats(stats: Sequence[Sequence[int]], label_names: Sequence[str]) -> str:
    """A small text table of `partition_stats` for logs and reports."""
    width = max([len(n) for n in label_names] + [6])
    head = "client " + " ".join(f"{n:>{width}}" for n in label_names) + f" {'total':>{width}}"
    rows = [f"{i:>6} " + " ".join(f"{c:>{width}}" for c in row) + f" {sum(row):>{width}}"
            for i, row in enumerate(stats)]
    return "\n".join([head, *rows])


def plot_partition(run_dir: Path, partitions: Sequence[Dataset], label_names: Sequence[str],
                   label_column: str = LABEL) -> Path:
    """Stacked bars of label counts per client (the first PLOT_MAX_CLIENTS, the title says so), written
    to run_dir/partition.png.

    Drawn by flwr_datasets.visualization.plot_label_distributions. Like the rest of Flower it
    reports a telemetry event unless FLWR_TELEMETRY_ENABLED=0 (fedsb's launchers set it).
    """
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported (by flwr-datasets' visualisation): no display
    import matplotlib.pyplot as plt
    from flwr_datasets.visualization import plot_label_distributions
    from matplotlib.colors import ListedColormap

    # Half an inch a client up to PLOT_MAX_WIDTH_IN: at 1000 clients an uncapped figure was 55,000
    # pixels wide (a 78 MB canvas in the server process) and no more readable than a capped one.
    title = "Label distribution per client"
    if len(partitions) > PLOT_MAX_CLIENTS:  # more bars are slow to draw and no easier to read
        title += f" (clients 0-{PLOT_MAX_CLIENTS - 1} of {len(partitions)})"
        partitions = partitions[:PLOT_MAX_CLIENTS]
    fig, ax = plt.subplots(figsize=(min(max(4, 0.5 * len(partitions) + 2), PLOT_MAX_WIDTH_IN), 3.2))
    # A colormap of exactly one tab10 colour per class: pandas samples a colormap evenly, so
    # "tab10" itself would skip colours for fewer than ten classes.
    tab10 = plt.get_cmap("tab10").colors
    colors = ListedColormap([tab10[i % len(tab10)] for i in range(max(len(label_names), 1))])
    _, _, counts = plot_label_distributions(
        _Prebuilt(partitions, label_names, label_column), label_column, plot_type="bar",
        size_unit="absolute", axis=ax, title=title, cmap=colors,
        legend=False, verbose_labels=True,
        plot_kwargs={"xlabel": "client (partition id)", "ylabel": "training examples", "width": 0.8})
    # The library's legend is a figure legend outside the axes; inside, as before, fits the figure
    # once the top of the axes leaves it room.
    ax.set_ylim(0, 1.25 * max(1, int(counts.sum(axis=1).max())))
    ax.legend(fontsize=7, ncols=min(len(label_names), 4), loc="upper right")
    fig.tight_layout()
    path = Path(run_dir) / "partition.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    release_free_memory()  # the canvas: the server holds what it uses for the rest of the run
    return path
