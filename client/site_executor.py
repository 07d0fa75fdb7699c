"""The site's own executor: what Flower's `flower-superexec` does for a SuperNode
started with `--isolation process`, with the site's app check in every ClientApp
process.

`fedlora client` starts the SuperNode with `--isolation process` (the SuperNode then
launches nothing itself) and a SuperExec auth secret, and starts this loop next to
it. The loop asks the SuperNode's Runtime API for ClientApp tasks (signed with the
secret, so no other local process can take them) and hands each task's token to the
site's task server (`fedlora.client.pinned_clientapp`), which forks a process per task
that checks the run's app bundle against the site's approved hashes before any of its
code is imported.

Both run as `python -I` (isolated mode): neither the working directory nor
PYTHONPATH is on sys.path, so the site's installed fedlora is what they import.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("fedlora.site")

ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"
POLL_SECONDS = 0.5


def pinned_clientapp_command(runtime_api_address: str, state_dir: Path, approved: list[str]) -> list[str]:
    command = [sys.executable, "-I", "-m", "fedlora.client.pinned_clientapp", "--runtime-api-address", runtime_api_address,
               "--state-dir", str(state_dir), "--parent-pid", str(os.getpid())]
    for app_hash in approved:
        command += ["--approved", app_hash]
    return command


class TaskServer:
    """The pinned ClientApp task server, fed task tokens over its stdin (never argv);
    started again if it has exited."""

    def __init__(self, command: list[str]):
        self.command = command
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(self.command, stdin=subprocess.PIPE)

    def hand_over(self, token: str) -> None:
        for _ in range(2):
            if self.proc.poll() is not None:
                log.error("site executor: the ClientApp task server exited (code %s); starting it again",
                          self.proc.returncode)
                self.proc = self._start()
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(token.encode() + b"\n")
                self.proc.stdin.flush()
                return
            except OSError:  # it died between the check and the write: once more with a new one
                self.proc.wait()
        log.error("site executor: no ClientApp task server took the task; the SuperNode expires it")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the server exits at the end of its stdin


def serve(runtime_api_address: str, secret: bytes, state_dir: Path, approved: list[str]) -> None:
    """Acquire ClientApp tasks from the SuperNode and hand each to the task server, forever."""
    from fedlora.flower_internals import (
        AcquireTaskRequest, RuntimeHttpClient, RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor, TaskType,
        make_simple_http_retry_invoker,
    )

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK})],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    tasks = TaskServer(pinned_clientapp_command(runtime_api_address, state_dir, approved))
    log.info("site executor: ClientApp tasks run only apps %s", ", ".join(approved))
    try:
        while True:
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # the SuperNode is starting or restarting: try again
                log.debug("site executor: AcquireTask failed (%s)", exc)
                time.sleep(2 * POLL_SECONDS)
                continue
            if res.HasField("task") and res.token:
                tasks.hand_over(res.token)
            time.sleep(POLL_SECONDS)
    finally:
        tasks.close()
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlora.client.site_executor",
                                     description="The site's executor for a SuperNode with --isolation process.")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--superexec-auth-secret-file", required=True, type=Path, help="the secret the SuperNode checks")
    parser.add_argument("--state-dir", required=True, type=Path, help="the site's state dir (audit log)")
    parser.add_argument("--approved", action="append", required=True, help="an approved app hash (repeatable)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    args = parser.parse_args(argv)

    from fedlora.client.app_pinning import site_log_handler
    from fedlora.flower_internals import load_superexec_auth_secret, start_parent_process_monitor

    site_log_handler()

    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # raises SIGINT here when the SuperNode is gone
    try:
        serve(args.runtime_api_address, load_superexec_auth_secret(str(args.superexec_auth_secret_file)),
              args.state_dir, args.approved)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
