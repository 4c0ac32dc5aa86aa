"""What keeps a simulation lean (issue: memory, start-up and sweeps at scale), checked on what it does,
not on timings (those are benchmarks/simulation_overhead.py's):

- the server's prepared partition tokens equal what each client computed from the data, and a client
  process serving them never imports the data libraries;
- partitions are assigned to a simulation's nodes by the server, and the clients serve exactly the
  partition the server meant, at 2000 nodes; discovery by message (deployments) is right at scale too;
- `fedsb run`'s launcher does not import torch; Ray's dashboard is off in the settings fedsb gives Flower.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType, RecordDict

from fedsb.experiment.config import load_config
from fedsb.experiment.prepared import read_prepared, write_assignment
from fedsb.experiment.worker import Worker
from fedsb.federation.inprocess import InProcessGrid, run_in_process
from fedsb.federation.protocol import NODE_RECORD, PARTITION_ID
from server.app import APP_DIR, assign_partitions, discover_clients

TINY = "tests/configs/tiny.yaml"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A tiny FedIT run in one process with its run directory: the server writes the prepared tokens."""
    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    run_in_process({"config": TINY, "run-dir": str(run_dir), "method": "fedit"})
    return run_dir


def test_prepared_tokens_are_every_clients_tokens_from_the_data(prepared_run):
    config = load_config(APP_DIR / TINY, {"method.name": "fedit"})
    prepared = read_prepared(prepared_run, config.with_clients(4))
    assert prepared is not None and prepared.num_partitions == 4
    from_data = Worker(config)  # no prepared tokens: loads, partitions and tokenises the data itself
    assert from_data.prepared is None
    for pid in range(4):
        expected = from_data.client_tokens(pid)
        served = prepared.tokens(pid)
        assert set(served) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(served[name], tensor), (pid, name)
        assert prepared.size(pid) == len(from_data.data.partitions[pid])
    assert prepared.label_names == from_data.data.label_names
    # Another config (another seed) does not get them.
    other = load_config(APP_DIR / TINY, {"method.name": "fedit", "seed": 1}).with_clients(4)
    assert read_prepared(prepared_run, other) is None


@pytest.mark.slow
def test_a_client_serving_prepared_tokens_never_imports_the_data_libraries(prepared_run):
    """In a fresh process, as a Ray client actor: a Worker given the run directory trains a client
    on the prepared tokens; datasets, flwr-datasets, pandas and matplotlib are never imported."""
    script = f"""
import sys, torch
from fedsb.experiment.config import load_config
from fedsb.experiment.worker import get_worker
config = load_config({str(ROOT / TINY)!r}, {{"method.name": "fedit"}}).with_clients(4)
worker = get_worker(config, run_dir={str(prepared_run)!r})
state = {{k: v for k, v in torch.load({str(prepared_run / "state.pt")!r}).items()}}
upload, result = worker.train_client(2, state, 1)
import json
print(json.dumps({{"loaded": [m for m in ("datasets", "flwr_datasets", "pandas", "matplotlib", "pyarrow")
                              if m in sys.modules],
                  "weight": worker.aggregation_weight(2), "loss": result.loss,
                  "total": float(sum(v.double().sum() for v in upload.values()))}}))
"""
    config = load_config(APP_DIR / TINY, {"method.name": "fedit"}).with_clients(4)
    worker = Worker(config)
    state = worker.initial_state()
    torch.save(state, prepared_run / "state.pt")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["loaded"] == []
    # The same client trained here, from the data: the same weight, loss and upload.
    upload, result = worker.train_client(2, state, 1)
    assert child["weight"] == worker.aggregation_weight(2)
    assert child["loss"] == pytest.approx(result.loss, rel=1e-6)
    assert child["total"] == pytest.approx(float(sum(v.double().sum() for v in upload.values())), rel=1e-6)


def _describe(grid: InProcessGrid, node_ids: list[int]) -> dict[int, int]:
    """node id -> the partition its ClientApp says it serves (the describe query, through the real app)."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    return {r.metadata.src_node_id: int(r.content[NODE_RECORD][PARTITION_ID])
            for r in grid.send_and_receive(messages)}


def test_assigned_partitions_at_2000_nodes_are_the_ones_the_clients_serve(tmp_path):
    run_config = {"config": TINY, "run-dir": str(tmp_path), "assign-partitions": True}
    grid = InProcessGrid(2000, run_config)
    nodes = assign_partitions(grid, 2000, wait_s=1)
    assert sorted(nodes) == list(range(2000)) and sorted(nodes.values()) == sorted(grid.get_node_ids())
    write_assignment(tmp_path, nodes)
    served = _describe(grid, grid.get_node_ids())
    assert {pid: node for node, pid in served.items()} == nodes
    with pytest.raises(RuntimeError, match="num_clients is 2001 but the simulation has 2000"):
        assign_partitions(grid, 2001, wait_s=0)


def test_discovery_by_message_at_2000_nodes_finds_every_nodes_own_partition():
    """A deployment's SuperNodes declare their partitions (--node-config): discovery asks all at once."""
    grid = InProcessGrid(2000, {"config": TINY})
    nodes = discover_clients(grid, 2000, wait_s=5)
    declared = {int(c.node_config["partition-id"]): node for node, c in grid.contexts.items()}
    assert nodes == declared
    assert len(grid.sent) == 2000  # one query per node, sent together


@pytest.mark.slow
def test_the_launcher_process_never_imports_torch(tmp_path):
    """`fedsb run`'s own process checks the config in a child (which imports torch and exits) and
    follows the run over the Control API: what it holds during the run is light."""
    script = f"""
import sys
from fedsb.ops.launch import prepare_run_isolated, LocalSimulation
import fedsb.ops.control, fedsb.cli
config = prepare_run_isolated({str(ROOT / TINY)!r}, {{"output_dir": {str(tmp_path)!r}}})
print(config.method.name, config.federation.num_clients,
      [m for m in ("torch", "transformers", "datasets", "matplotlib") if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "fedsb 4 []"


def test_rays_dashboard_is_off_in_the_settings_fedsb_gives_flower(monkeypatch):
    """fedsb's federation config sets no Ray init args; with none, Flower's Ray backend starts Ray
    with include_dashboard=False (ray.init is intercepted: the arguments are what is checked)."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from fedsb.ops.launch import _federation

    federation = _federation(load_config(APP_DIR / "configs/default.yaml").with_clients(8), 1)
    assert federation == "num-supernodes=8 client-resources-num-cpus=1"  # no init-args: Flower's defaults
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    RayBackend({"client_resources": {"num_cpus": 1}, "init_args": {}})
    assert len(calls) == 1 and calls[0]["include_dashboard"] is False


def test_a_run_directory_records_the_assignment_it_ran_with(tmp_path):
    """fedsb run's runs assign partitions: the file maps every node to a distinct partition."""
    run_config = {"config": TINY, "run-dir": str(tmp_path / "run"), "assign-partitions": True,
                  "method": "ffa"}
    grid, run = run_in_process(run_config)
    assignment = json.loads((run.run_dir / "prepared" / "nodes.json").read_text())
    assert sorted(assignment.values()) == [0, 1, 2, 3]
    assert {int(n) for n in assignment} == set(grid.get_node_ids())
    assert run.summary.rounds_completed == 2


def test_processes_share_one_mapped_copy_of_the_frozen_base_weights(prepared_run):
    """A Worker given the prepared files points every frozen base parameter at the mapped base.pt
    (the adapters and the head stay its own), and computes exactly what a Worker with its own copy does."""
    from fedsb.core.adapters import frozen_base_parameters, load_state
    from fedsb.data.tokens import iterate_batches

    config = load_config(APP_DIR / TINY, {"method.name": "fedit"}).with_clients(4)
    prepared = read_prepared(prepared_run, config)
    assert prepared is not None and prepared.base_weights
    shared, own = Worker(config, prepared), Worker(config)
    frozen = frozen_base_parameters(shared.model)
    assert frozen and set(frozen) == set(prepared.base_weights)
    for name, param in frozen.items():
        assert param.data_ptr() == prepared.base_weights[name].data_ptr(), name  # the mapping itself
    frozen_ids = {id(p) for p in frozen.values()}
    own_tensors = [p for n, p in shared.model.named_parameters() if "lora_" in n or "classifier" in n]
    assert own_tensors and not any(id(p) in frozen_ids for p in own_tensors)
    state = own.initial_state()
    batch = next(iterate_batches(own.client_tokens(1), 8, shuffle=False))
    outputs = []
    for worker in (shared, own):
        worker.model.eval()
        load_state(worker.model, state)
        with torch.no_grad():
            outputs.append(worker.model(**{k: v for k, v in batch.items() if k != "labels"}).logits)
    assert torch.equal(outputs[0], outputs[1])


FRAGMENTED_HEAP = """
from fedsb.core.memory import release_free_memory

def anon_mb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss_Anon:"):
            return int(line.split()[1]) // 1024

blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MB of heap blocks (below malloc's mmap threshold)
kept = blocks[::50]  # one block in 50 stays, so the heap's top cannot shrink on its own
del blocks
before = anon_mb()
released = release_free_memory()
print(released, before, anon_mb())
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc smaps_rollup")
def test_freed_heap_pages_go_back_to_the_os():
    """What a Worker does after each piece of work (fedsb.core.memory): a process that freed 196 MB of
    interleaved heap blocks holds them until they are released, then gives them back."""
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    released, before, after = out[0] == "True", int(out[1]), int(out[2])
    assert released
    assert before >= 190  # freed, yet held
    assert after <= before - 180, (before, after)
