"""Following a run on a SuperLink from this process: its status and its log, over Flower's Control API.

`flwr ls` and `flwr log --stream` each start a Python process that imports the whole of flwr (about
one CPU-second and 80 MB each); polling a run's status with `flwr ls` every second took 40% of a
core on a 2-core machine, beside the clients' work. `ControlClient` makes the same two calls
(`ListRuns`, `StreamLogs`, protobuf over HTTP, Flower's own `ControlHttpClient`) from the
launcher's process, over one HTTP connection. Runs are still submitted and stopped with the `flwr`
command line (fedsb.ops.flwr_cli), once per run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

# Imported only where fedsb follows a run (fedsb run, sweeps, the local deployment): about 70 MB.
from flwr.proto.control_pb2 import ListRunsRequest, StreamLogsRequest
from flwr.supercore.control.control_http_client import ControlHttpClient
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor


class ControlClient:
    """A SuperLink's Control API: `address` host:port, TLS when `root_certificates` is given."""

    def __init__(self, address: str, root_certificates: Path | None = None):
        self._client = ControlHttpClient.from_server_address(
            address, insecure=root_certificates is None,
            root_certificates=None if root_certificates is None else str(root_certificates),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="fedsb")])

    def run_status(self, run_id: int) -> tuple[str, str]:
        """('finished:completed', details) and the like, as `flwr ls --run-id` prints them."""
        runs = self._client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        if run_id not in runs:
            return "unknown", f"the SuperLink has no run {run_id}"
        status = runs[run_id].status
        text = f"{status.status}:{status.sub_status}" if status.sub_status else status.status
        return text, status.details

    def follow_log(self, run_id: int, write: Callable[[str], None]) -> LogFollower:
        """Stream the run's log to `write` (text as it comes, not split into lines) in a thread."""
        return LogFollower(self._client, run_id, write)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogFollower:
    """A thread that streams a run's log until the SuperLink ends the stream (the run finished) or
    `stop()`; a dropped stream is resumed after the last timestamp received."""

    def __init__(self, client: ControlHttpClient, run_id: int, write: Callable[[str], None]):
        self._client, self._run_id, self._write = client, run_id, write
        self._stopped = threading.Event()
        self.ended = threading.Event()  # the SuperLink ended the stream: the run has finished
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._stream, name=f"log-{run_id}", daemon=True)
        self._thread.start()

    def _stream(self) -> None:
        after = 0.0
        while not self._stopped.is_set():
            try:
                request = StreamLogsRequest(run_id=self._run_id, after_timestamp=after)
                for reply in self._client.StreamLogs(request):
                    if reply.log_output:
                        self._write(reply.log_output)
                    after = max(after, reply.latest_timestamp)
                    if self._stopped.is_set():
                        return
                self.ended.set()  # the stream ended: the run has finished
                return
            except Exception as err:  # noqa: BLE001 - the run's status, not its log, decides the outcome
                self.error = err
                if self._stopped.wait(1.0):
                    return

    def stop(self, drain_s: float = 3.0) -> None:
        """Let the stream deliver what is left (up to drain_s), then stop following."""
        self._thread.join(drain_s)
        self._stopped.set()
