"""Progress output while a round runs, and the resources a virtual client asks Flower for."""

from __future__ import annotations

import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsb.cli import main as fedsb_main
from fedsb.experiment.config import load_config
from fedsb.federation.progress import ProgressGrid, progress_line
from fedsb.ops.launch import _federation


class SlowGrid:
    """Stands in for a SuperLink in this unit test of ProgressGrid: one reply per pull."""

    def __init__(self) -> None:
        self.queue: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            self.queue.append(m)
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        if not self.queue:
            return []
        message = self.queue.pop(0)
        return [Message(RecordDict(), reply_to=message)]

    def get_node_ids(self):
        return [1, 2, 3]


def _messages(n: int) -> list[Message]:
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # as a ServerApp process has
    return [Message(RecordDict(), dst_node_id=i + 1, message_type="train", group_id="3") for i in range(n)]


def test_progress_lines_count_the_replies_and_estimate_the_time_left():
    lines: list[str] = []
    grid = ProgressGrid(SlowGrid(), lines.append, interval_s=0.0)
    replies = grid.send_and_receive(_messages(3), timeout=60)
    assert len(replies) == 3
    assert [line.split(" clients")[0] for line in lines] == ["round 3 train: 1 of 3", "round 3 train: 2 of 3"]
    assert "s left" in lines[0]
    assert grid.get_node_ids() == [1, 2, 3]  # everything else is the wrapped grid's
    assert progress_line("round 1 train", 2, 8, 120.0) == \
        "round 1 train: 2 of 8 clients replied in 120 s; about 360 s left"
    assert progress_line("round 1 train", 0, 8, 5.0) == "round 1 train: 0 of 8 clients replied in 5 s"


def test_a_timeout_returns_the_replies_so_far():
    class NeverReplies(SlowGrid):
        def pull_messages(self, ids):
            return []

    assert ProgressGrid(NeverReplies(), lambda _: None).send_and_receive(_messages(2), timeout=0.6) == []


def test_pulls_back_off_while_nothing_arrives_and_speed_up_after_a_reply(monkeypatch):
    """The pause between empty pulls grows from POLL_MIN_S by POLL_GROWTH up to POLL_MAX_S, and is
    POLL_MIN_S again after a pull that brought a reply (time.sleep is recorded, not slept)."""
    from fedsb.federation import progress

    class RepliesOnPulls(SlowGrid):  # a reply on the 12th and the 15th pull
        pulls = 0

        def pull_messages(self, ids):
            self.pulls += 1
            return super().pull_messages(ids) if self.pulls in (12, 15) else []

    pauses: list[float] = []
    monkeypatch.setattr(progress.time, "sleep", pauses.append)
    replies = ProgressGrid(RepliesOnPulls(), lambda _: None).send_and_receive(_messages(2), timeout=60)
    assert len(replies) == 2
    growing = [min(0.01 * 1.5 ** i, 0.5) for i in range(11)]
    assert pauses == pytest.approx(growing + [0.01, 0.015])  # 11 empty pulls, a reply, 2 empty, the last
    assert max(pauses) == progress.POLL_MAX_S and pauses[0] == progress.POLL_MIN_S


def test_gpus_per_client_reaches_flower_and_is_refused_without_a_gpu(tmp_path, capsys):
    config = load_config("tests/configs/tiny.yaml")
    assert _federation(config, 2) == "num-supernodes=4 client-resources-num-cpus=2"
    assert _federation(config, 1, 0.25) == ("num-supernodes=4 client-resources-num-cpus=1 "
                                            "client-resources-num-gpus=0.25")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    status = fedsb_main(["run", "tests/configs/tiny.yaml", "--gpus-per-client", "0.5",
                         "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["fedsb run: error: --gpus-per-client 0.5: this machine has no CUDA device"]
    assert not any(tmp_path.iterdir())  # nothing was started or written
