"""`fedsb run CONFIG --check` and the same checks before `fedsb run` starts anything.

Every bad input stops with exit status 2 and one stderr line naming the key and what is accepted,
before any Flower process starts (`local_superlink` is replaced by a function that fails the test)
and before any run directory is created. A good config prints its plan; `data.header: false`
reads a headerless file by column positions.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch

import fedsb.experiment.comm as comm
import fedsb.ops.launch as launch
from fedsb.cli import main
from fedsb.core.models import load_model
from fedsb.experiment.config import load_config
from fedsb.experiment.plan import check_plan, format_plan
from fedsb.experiment.worker import Worker

TINY = Path(__file__).parent / "configs" / "tiny.yaml"
NEWS_FIRST = "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers are seeing green"
TOPICS = ("Business", "Sci/Tech", "Sports")
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores file permissions


def news_rows(n: int = 60) -> list[tuple[str, str]]:
    """A headerless AG-News-like table: a sentence, then its topic."""
    rows = [(NEWS_FIRST, "Business")]
    rows += [(f"story number {i} about {TOPICS[i % 3].lower()} today", TOPICS[i % 3]) for i in range(1, n)]
    return rows


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Small local inputs: good and bad data files, a read-only directory, a plain file."""
    news = tmp_path / "news.tsv"
    news.write_text("".join(f"{t}\t{lab}\n" for t, lab in news_rows()))
    good = tmp_path / "good.csv"
    good.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in news_rows()[1:]))
    small = tmp_path / "small.csv"
    small.write_text("text,label\n" + "".join(f"sentence {i},{i % 2}\n" for i in range(20)))
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("text,label\n" + "".join(f"row {i},{'' if i == 3 else i % 2}\n" for i in range(30)))
    garbled = tmp_path / "garbled.parquet"
    garbled.write_bytes(b"\x00\xffnot parquet at all\x13\x37" * 8)
    notes = tmp_path / "notes.txt"
    notes.write_text("some notes\n")
    records = tmp_path / "records.jsonl"
    records.write_text("".join(f'{{"text": "r {i}", "label": {i % 2}}}\n' for i in range(40)))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
    plain = tmp_path / "plain-file"
    plain.write_text("not a directory\n")
    foreign = tmp_path / "foreign.csv"  # a test file with a topic the training file does not have
    foreign.write_text("text,label\nrain all week,Weather\nmarkets up,Business\n")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    yield dict(news=news, good=good, small=small, unlabelled=unlabelled, garbled=garbled, notes=notes,
               records=records, readonly=readonly, plain=plain, no_weights=no_weights, foreign=foreign,
               tmp=tmp_path)
    readonly.chmod(stat.S_IRWXU)


@pytest.fixture
def no_flower(monkeypatch):
    """Fail the test if anything tries to start a SuperLink or call the flwr CLI."""
    def refuse(*args, **kwargs):
        raise AssertionError("a Flower process was started")

    monkeypatch.setattr(launch, "local_superlink", refuse)
    monkeypatch.setattr(launch, "run_flwr", refuse)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# (case id, --set overrides ({name} is a path from `files`), extra CLI arguments, the stderr line after
# "fedsb run: error: " as a regex)
CASES = [
    ("unknown key", ["model.nme=x"], [],
     r"model\.nme: unknown key; accepted keys: device, dtype, max_length, name, target_modules, task"),
    ("bad value", ["method.rank=0"], [], r"method\.rank: got 0; accepted: a positive integer"),
    ("bad number", ["train.lr=fast"], [], r"train\.lr: got 'fast'; accepted: a number"),
    ("missing data file", ["data.source={tmp}/missing.csv"], [],
     r"data\.source: got '.*/missing\.csv'; accepted: 'synthetic', 'arithmetic', 'hf:<dataset name>', or an "
     r"existing csv/tsv/json/jsonl/parquet file"),
    ("garbled file", ["data.source={garbled}"], [], r"data: cannot read .*/garbled\.parquet: \w+: .*"),
    ("unsupported extension", ["data.source={notes}"], [],
     r"data: unsupported file extension '\.txt' for .*/notes\.txt; accepted: \.csv, \.json, \.jsonl, "
     r"\.parquet, \.tsv"),
    ("headerless file, text column", ["data.source={news}"], [],
     r"data\.text_column: column 'text' not found in .*/news\.tsv; available columns: Wall St\. Bears Claw…, "
     r"Business; the file seems to have no header row: add one, or set data\.header=false and name the "
     r"columns by position \(data\.text_column=0, data\.label_column=1\)"),
    ("missing label column", ["data.source={good}", "data.label_column=topic"], [],
     r"data\.label_column: column 'topic' not found in .*/good\.csv; available columns: text, label"),
    ("headerless, column out of range", ["data.source={news}", "data.header=false", "data.text_column=0",
                                         "data.label_column=2"], [],
     r"data\.label_column: column '2' not found in .*/news\.tsv; available columns: 0, 1; without a header "
     r"row \(data\.header=false\) the columns are named by position, 0\.\.1"),
    ("missing label value", ["data.source={unlabelled}"], [],
     r"data: column 'label' in .*/unlabelled\.csv has 1 missing, empty or '-' label\(s\), first at row 3; "
     r"set data\.drop_unlabelled=true to drop such rows"),
    ("too few examples per client", ["data.source={small}", "method.init.num_samples=1",
                                     "federation.num_clients=8"], [],
     r"federation\.num_clients: got 8; accepted: at most 6 \(at least 2 training examples per client: the "
     r"pool has 13 after the validation \(2\), test \(4\) and server \(1\) splits; or use more data\)"),
    ("no room for the server split", ["data.source={small}"], [],
     r"data: the training pool has 14 examples after the validation split, not enough to hold out the "
     r"server's 16 \(method\.init\.num_samples\) and leave examples for the clients; use more data or a "
     r"smaller method\.init\.num_samples"),
    ("unknown model name", ["model.name=no-such-model"], [],
     r"model\.name: got 'no-such-model'; accepted: 'default' \(the packaged MiniLM\), tiny-bert, tiny-llama, "
     r"tiny-gpt2, a local model directory or a hub id \(\w+: .*\)"),
    ("model directory without weights", ["model.name={no_weights}"], [],
     r"model\.name: got '.*/no-weights'; accepted: .* \(FileNotFoundError: .*no-weights has no weights.*"),
    ("target pattern matching nothing", ["model.target_modules=[query, qkv_proj]"], [],
     r"model\.target_modules: pattern 'qkv_proj' matches no linear layer of tiny-bert; accepted: patterns "
     r"such as dense, key, query, value"),
    ("rank above a module's dimension", ["method.rank=40"], [],
     r"method\.rank: got 40; accepted: an integer in 1\.\.32, the smaller dimension of target module "
     r"bert\.encoder\.layer\.0\.attention\.self\.query \(32 x 32\)"),
    ("output dir under a file", ["output_dir={plain}/runs"], [],
     r"output_dir: got '.*/plain-file/runs'; accepted: a directory that can be created and written "
     r"\(.*/plain-file is a file, not a directory\)"),
    ("test labels the training data lacks", ["data.source={good}", "data.test_file={foreign}"], [],
     r"data\.test_file: .*/foreign\.csv has labels \['Weather'\] that the training data does not have "
     r"\(its labels: \['Business', 'Sci/Tech', 'Sports'\]\)"),
    # A directory nobody can create, root included (the read-only case below is skipped as root).
    ("output dir that cannot be created", ["output_dir=/proc/fedsb-no-such-dir/runs"], [],
     r"output_dir: got '/proc/fedsb-no-such-dir/runs'; accepted: a directory that can be created and "
     r"written \(cannot create /proc/fedsb-no-such-dir: No such file or directory\)"),
    ("delta at or above 1/n", ["privacy.enabled=true", "privacy.delta=0.05"], [],
     r"privacy\.delta: got 0\.05; accepted: a number in \(0, 1/n\) = \(0, 0\.0435\) for the smallest client "
     r"\(client 3, n=23 examples\), or null"),
    ("bad partition scheme", ["partition.scheme=random"], [],
     r"partition\.scheme: got 'random'; accepted: one of 'iid', 'dirichlet', 'classes'"),
    ("impossible classes partition", ["partition.scheme=classes", "partition.classes_per_client=9"], [],
     r"partition\.scheme: classes_per_client must be in 1\.\.4 \(the dataset's classes\), got 9"),
    ("clients_per_round 0", ["federation.clients_per_round=0"], [],
     r"federation\.clients_per_round: got 0\.0; accepted: a fraction in \(0, 1\] or a count <= "
     r"federation\.num_clients \(4\)"),
    ("header false, named column", ["data.source={news}", "data.header=false", "data.label_column=1"], [],
     r"data\.text_column: got 'text'; accepted: a column position, an integer such as 0 or 1, with "
     r"data\.header=false"),
    ("header false, a json file", ["data.source={records}", "data.header=false", "data.text_column=0",
                                   "data.label_column=1"], [],
     r"data\.header: got False; accepted: true for data\.source=.*/records\.jsonl \(false: csv or tsv files "
     r"without a header row\)"),
    ("val_fraction 1.5", ["data.val_fraction=1.5"], [],
     r"data\.val_fraction: got 1\.5; accepted: a number in \(0, 1\)"),
    ("causal_lm on a classification-only source", ["model.task=causal_lm"], [],
     r"data\.source: got 'synthetic'; accepted: 'arithmetic' \(the generated causal_lm task\), a file or "
     r"'hf:<name>' with model\.task=causal_lm"),
    ("text pair column equals text column", ["data.source={good}", "data.text_pair_column=text"], [],
     r"data\.text_pair_column: got 'text'; accepted: null or a column name other than data\.text_column and "
     r"data\.label_column"),
    pytest.param("cuda on a CPU machine", ["model.device=cuda"], [],
                 r"model\.device: got 'cuda'; accepted: 'auto' or 'cpu' \(this machine has no CUDA device\)",
                 marks=NO_CUDA),
    pytest.param("gpus per client without a GPU", [], ["--gpus-per-client", "0.5"],
                 r"--gpus-per-client 0\.5: this machine has no CUDA device", marks=NO_CUDA),
]


def _ids(case) -> str:
    return (case.values if hasattr(case, "values") else case)[0]


def _args(overrides: list[str], extra: list[str], files: dict[str, Path], check: bool = True) -> list[str]:
    sets = [f"output_dir={files['tmp']}/runs"]
    sets += [o.format(**{k: str(v) for k, v in files.items()}) for o in overrides]
    return ["run", str(TINY), *(["--check"] if check else []), *extra,
            *[a for s in sets for a in ("--set", s)]]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedsb run: error: "), lines[0]
    return lines[0].removeprefix("fedsb run: error: ")


@pytest.mark.parametrize(("name", "overrides", "extra", "expected"), CASES, ids=[_ids(c) for c in CASES])
def test_a_bad_input_stops_check_with_one_line(name, overrides, extra, expected, files, no_flower, capsys):
    assert main(_args(overrides, extra, files)) == 2
    line = _one_error_line(capsys)
    assert re.fullmatch(expected, line), f"{name}: {line}"
    assert not (files["tmp"] / "runs").exists()  # no run directory


@pytest.mark.parametrize("name", ["headerless file, text column", "rank above a module's dimension",
                                  "too few examples per client", "unknown model name",
                                  "delta at or above 1/n", "test labels the training data lacks",
                                  "output dir that cannot be created"])
def test_fedsb_run_stops_before_any_flower_process(name, files, no_flower, capsys):
    """Without --check, the same checks run before the SuperLink would start."""
    _, overrides, extra, expected = next(c for c in CASES if _ids(c) == name)
    assert main(_args(overrides, extra, files, check=False)) == 2
    assert re.fullmatch(expected, _one_error_line(capsys))
    assert not (files["tmp"] / "runs").exists()


def test_check_prints_the_plan_of_a_good_config(files, no_flower, capsys):
    assert main(["run", str(TINY), "--check", "--set", f"output_dir={files['tmp']}/runs"]) == 0
    out = capsys.readouterr().out
    assert "targets: 12 modules (32x32, 32x48, 48x32): bert.encoder.layer.0.attention.self.query," in out
    assert "labels (4): sports, science, business, food" in out
    pool = int(re.search(r"train pool (\d+)", out).group(1))
    sizes = re.search(r"partition: dirichlet, 4 clients: ([\d, ]+) examples \(sum (\d+)\)", out)
    assert sum(int(s) for s in sizes.group(1).split(", ")) == int(sizes.group(2)) == pool
    # The closed form of fedsb at rank 4 on tiny-bert with 4 labels, for a cohort of the 4 clients.
    model = load_model("tiny-bert", num_labels=4)
    counts = comm.closed_form(comm.method_for_model(model, "fedsb", 4), 4, 4, comm.head_shapes(model))
    assert counts.bytes("up") == (192 + 132) * 4  # R: 16 x 12 modules; head: 32 x 4 + 4
    assert (f"bytes per round, per client: up {counts.bytes('up'):,} B, down {counts.bytes('down'):,} B "
            f"(a client's first round adds {counts.init_bytes('down'):,} B down, 0 B up); "
            f"all 4: up {counts.bytes('up', all_clients=True):,} B") in out
    assert "privacy: off" in out
    assert out.rstrip().endswith(f"fedsb run --check: {TINY} is ready to run")
    assert not (files["tmp"] / "runs").exists()


@pytest.mark.slow
def test_the_plan_is_the_workers_data_and_privacy_calibration(files):
    config = load_config(TINY, {"output_dir": str(files["tmp"] / "runs"), "privacy.enabled": True})
    plan = check_plan(config)
    worker = Worker(config)
    assert plan.partition_sizes == [len(p) for p in worker.data.partitions]
    assert (plan.train, plan.validation, plan.test, plan.server) == (
        len(worker.data.train), len(worker.data.validation), len(worker.data.test), len(worker.data.server))
    assert plan.label_names == worker.data.label_names
    assert len(plan.targets) == len(worker.method.specs) == 12
    # The calibration, checked by Opacus's own accountant from the config's numbers alone: the noise
    # multiplier spends at most the target epsilon over every local step, and within the bisection's
    # tolerance of it (a smaller one would overspend).
    from opacus.accountants import RDPAccountant

    steps = config.federation.rounds * config.train.local_steps
    for client in plan.privacy:
        n = client.num_examples
        delta = min(1e-5, 1 / (10 * n))  # privacy.delta null: the documented default
        rate = min(1.0, config.train.batch_size / n)
        accountant = RDPAccountant()
        accountant.history = [(client.noise_multiplier, rate, steps)]
        epsilon = accountant.get_epsilon(delta)
        assert config.privacy.epsilon - 0.02 <= epsilon <= config.privacy.epsilon, (client, epsilon)
        assert client.delta == pytest.approx(delta, rel=1e-12)
        line = (f"client {client.client}: n={n}, delta {delta:.3g}, "
                f"noise multiplier {client.noise_multiplier:.4g}")
        assert line in format_plan(plan)


def test_a_headerless_tsv_is_read_by_column_positions(files, no_flower, capsys):
    overrides = {"data.source": str(files["news"]), "data.header": False, "data.text_column": 0,
                 "data.label_column": "1", "data.test_fraction": 0.25, "method.init.num_samples": 4,
                 "output_dir": str(files["tmp"] / "runs")}
    config = load_config(TINY, overrides)
    assert (config.data.text_column, config.data.label_column) == ("0", "1")
    worker = Worker(config)
    data = worker.data
    assert data.label_names == sorted(TOPICS)
    seen = {}
    for split in (data.train, data.validation, data.test, data.server):
        for row in split:
            seen[row["text"]] = data.label_names[row["label"]]
    assert seen == dict(news_rows())  # every row, the first one too (no header row eaten), its own label
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={str(v).lower() if v is False else v}")]
    assert main(["run", str(TINY), "--check", *sets]) == 0
    out = capsys.readouterr().out
    assert f"data: {files['news']}: train pool {len(data.train)}," in out
    assert "labels (3): Business, Sci/Tech, Sports" in out


def test_an_unwritable_output_dir_stops_check_even_for_root(files, no_flower, capsys):
    """Root ignores permission bits, so its case is a directory the kernel refuses to anyone (/sys);
    any other user gets a directory without write permission. Both are refused before anything starts."""
    parent = Path("/sys") if ROOT else files["readonly"]
    assert main(["run", str(TINY), "--check", "--set", f"output_dir={parent}/fedsb-check/runs"]) == 2
    line = _one_error_line(capsys)
    assert line == (f"output_dir: got '{parent}/fedsb-check/runs'; accepted: a directory that can be created "
                    f"and written ({parent} is not writable)"), line
    assert not (parent / "fedsb-check").exists()
