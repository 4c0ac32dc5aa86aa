"""Tests of partitioning (flwr-datasets partitioners, fedsb's guarantees) and label counts."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from fedsb.data.partition import format_partition_stats, partition_dataset, partition_stats, plot_partition
from fedsb.data.sources import DataError
from fedsb.data.synthetic import synthetic_dataset


def with_index(ds: Dataset) -> Dataset:
    return ds.add_column("idx", list(range(len(ds))))


def label_shares(stats: list[list[int]]) -> np.ndarray:
    counts = np.array(stats, dtype=float)
    return counts / counts.sum(1, keepdims=True)


def test_iid_partitions_are_disjoint_equal_and_seeded():
    ds = with_index(synthetic_dataset(1000, seed=0))
    parts = partition_dataset(ds, 7, "iid", seed=3)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1000 and max(sizes) - min(sizes) <= 1
    ids = [i for p in parts for i in p["idx"]]
    assert sorted(ids) == list(range(1000))
    assert parts[0]["idx"] != list(range(143))  # shuffled, not the first rows
    assert [p["idx"] for p in partition_dataset(ds, 7, "iid", seed=3)] == [p["idx"] for p in parts]
    assert partition_dataset(ds, 7, "iid", seed=4)[0]["idx"] != parts[0]["idx"]
    shares = label_shares(partition_stats(parts, 4))
    assert shares.max(1).mean() < 0.35  # each client close to 1/4 per class


def test_dirichlet_partitions_are_seeded_skewed_and_non_empty():
    ds = with_index(synthetic_dataset(2000, seed=0))
    parts = partition_dataset(ds, 10, "dirichlet", alpha=0.1, seed=0)
    assert [p["idx"] for p in partition_dataset(ds, 10, "dirichlet", alpha=0.1, seed=0)] == \
        [p["idx"] for p in parts]
    assert partition_dataset(ds, 10, "dirichlet", alpha=0.1, seed=1)[0]["idx"] != parts[0]["idx"]
    assert sorted(i for p in parts for i in p["idx"]) == list(range(2000))
    assert min(len(p) for p in parts) >= 1

    skewed = label_shares(partition_stats(parts, 4))
    mild = label_shares(partition_stats(partition_dataset(ds, 10, "dirichlet", alpha=0.5, seed=0), 4))
    iid = label_shares(partition_stats(partition_dataset(ds, 10, "iid", seed=0), 4))
    # The largest class share per client: ~1/4 when iid, most of the client at alpha 0.1.
    assert skewed.max(1).mean() > 0.7 > mild.max(1).mean() > 0.4 > iid.max(1).mean()

    # Clients disagree: mean total-variation distance between their label distributions.
    def mean_tv(shares: np.ndarray) -> float:
        pairs = [(a, b) for i, a in enumerate(shares) for b in shares[i + 1:]]
        return float(np.mean([0.5 * np.abs(a - b).sum() for a, b in pairs]))
    assert mean_tv(skewed) > 0.6 and mean_tv(iid) < 0.1


def test_dirichlet_min_partition_size_and_impossible_cases():
    ds = synthetic_dataset(400, seed=0)
    parts = partition_dataset(ds, 8, "dirichlet", alpha=0.3, min_partition_size=20, seed=0)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(DataError, match=r"min_partition_size must be in 1\.\.50"):
        partition_dataset(ds, 8, "dirichlet", min_partition_size=51)
    tiny = synthetic_dataset(40, seed=0)
    with pytest.raises(DataError, match="could not give each of 10 clients at least 4 of 40 examples"):
        partition_dataset(tiny, 10, "dirichlet", alpha=0.01, min_partition_size=4, seed=0)


def test_impossible_dirichlet_draws_stop_after_the_time_budget(monkeypatch):
    """Redraws stop once DIRICHLET_RETRY_S has passed (at 10,000 clients a draw takes seconds): here a
    zero budget stops after the first 10 draws instead of 100."""
    import fedsb.data.partition as partition

    tiny = synthetic_dataset(40, seed=0)
    with pytest.raises(DataError, match=r"in 100 draws"):
        partition_dataset(tiny, 10, "dirichlet", alpha=0.01, min_partition_size=4, seed=0)
    monkeypatch.setattr(partition, "DIRICHLET_RETRY_S", 0.0)
    with pytest.raises(DataError, match=r"in 10 draws \(0 s\)"):
        partition_dataset(tiny, 10, "dirichlet", alpha=0.01, min_partition_size=4, seed=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_classes_partitions_have_exactly_k_labels(k):
    ds = with_index(synthetic_dataset(1200, seed=0))
    parts = partition_dataset(ds, 10, "classes", classes_per_client=k, seed=0)
    stats = partition_stats(parts, 4)
    assert [sum(c > 0 for c in row) for row in stats] == [k] * 10
    assert all(sum(row) > 0 for row in stats)
    assert all(any(row[c] for row in stats) for c in range(4))  # every class used
    ids = [i for p in parts for i in p["idx"]]
    assert len(ids) == len(set(ids))
    assert [p["idx"] for p in partition_dataset(ds, 10, "classes", classes_per_client=k, seed=0)] == \
        [p["idx"] for p in parts]


def test_partition_errors():
    ds = synthetic_dataset(20, seed=0)
    with pytest.raises(DataError, match="unknown partition scheme 'shards'; "
                                        "accepted: iid, dirichlet, classes"):
        partition_dataset(ds, 2, "shards")
    with pytest.raises(DataError, match="cannot split 20 examples into 21 non-empty partitions"):
        partition_dataset(ds, 21)
    with pytest.raises(DataError, match=r"classes_per_client must be in 1\.\.4"):
        partition_dataset(ds, 2, "classes", classes_per_client=5)
    with pytest.raises(DataError, match="'classes' partitioning of 20 examples .* is impossible"):
        partition_dataset(ds, 20, "classes", classes_per_client=4)  # 20 clients per class, 5 examples
    with pytest.raises(DataError, match="alpha must be > 0"):
        partition_dataset(ds, 2, "dirichlet", alpha=0)


def test_partition_stats_counts_and_table():
    names = ["a", "b", "c", "d"]
    parts = [Dataset.from_dict({"text": ["x"] * 4, "label": [0, 0, 1, 2]}), Dataset.from_dict(
        {"text": ["y"], "label": [3]})]
    stats = partition_stats(parts, 4)
    assert stats == [[2, 1, 1, 0], [0, 0, 0, 1]]
    table = format_partition_stats(stats, names).splitlines()
    assert len(table) == 3 and table[1].split() == ["0", "2", "1", "1", "0", "4"]


def test_partition_stats_through_flwr_datasets_match_a_plain_count(tmp_path):
    """flwr-datasets' compute_counts gives every class a column, also one that no client holds."""
    ds = synthetic_dataset(600, num_classes=4, seed=0)
    parts = partition_dataset(ds, 6, "classes", classes_per_client=1, seed=0)
    stats = partition_stats(parts, 5)  # a fifth class that no partition holds
    assert stats == [np.bincount(p["label"], minlength=5).tolist() for p in parts]
    assert all(row[4] == 0 for row in stats) and all(type(c) is int for row in stats for c in row)
    assert partition_stats([], 3) == []
    with pytest.raises(DataError, match=r"labels \[3\] outside 0\.\.2"):
        partition_stats([Dataset.from_dict({"label": [0, 3]})], 3)
    path = plot_partition(tmp_path, parts, ["sports", "science", "business", "food"])
    assert path == tmp_path / "partition.png" and path.read_bytes()[:4] == b"\x89PNG"



def test_the_partition_figure_grows_with_the_clients_up_to_a_width(tmp_path, monkeypatch):
    """Half an inch a client, at most PLOT_MAX_WIDTH_IN (110 dpi): 1000 clients drew a 55,000-pixel
    canvas before the cap. Beyond PLOT_MAX_CLIENTS the first ones are drawn and the title says so.
    tight_layout may trim a few pixels, so widths are compared loosely."""
    import struct

    import matplotlib.axes

    from fedsb.data import partition
    from fedsb.data.partition import PLOT_MAX_WIDTH_IN

    titles, set_title = [], matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda ax, label, *a, **k: titles.append(label) or set_title(ax, label, *a, **k))
    monkeypatch.setattr(partition, "PLOT_MAX_CLIENTS", 40)
    ds = synthetic_dataset(1200, num_classes=4, seed=0)
    widths = {}
    for clients in (8, 60, 300):
        out = tmp_path / str(clients)
        out.mkdir()
        path = plot_partition(out, partition_dataset(ds, clients, "iid", seed=0), ["a", "b", "c", "d"])
        widths[clients] = struct.unpack(">I", path.read_bytes()[16:20])[0]  # the PNG header's width
    assert abs(widths[8] - (0.5 * 8 + 2) * 110) <= 2
    assert abs(widths[60] - (0.5 * 40 + 2) * 110) <= 2  # 40 clients drawn
    assert titles == ["Label distribution per client", "Label distribution per client (clients 0-39 of 60)",
                      "Label distribution per client (clients 0-39 of 300)"]
    monkeypatch.setattr(partition, "PLOT_MAX_CLIENTS", 1000)
    path = plot_partition(tmp_path, partition_dataset(ds, 300, "iid", seed=0), ["a", "b", "c", "d"])
    assert abs(struct.unpack(">I", path.read_bytes()[16:20])[0] - PLOT_MAX_WIDTH_IN * 110) <= 2
