"""One ClientApp task at a pinning site: Flower 1.42's `flwr-clientapp` flow
(flwr.supernode.runtime.run_clientapp) with the site's app check in front of it.

1. Pull the task's input from the SuperNode: the message, the context, the run and
   the app bundle (FAB) as bytes. Nothing of the bundle is extracted yet.
2. Hash the bundle's code (fedlora/app_hash.py) and check it against the site's
   approved hashes; log both sides and write the decision to the audit log.
3. Not approved: reply with an error whose reason is exactly REFUSED_APP, and stop.
   The bundle was never extracted, imported or run.
4. Approved: Flower installs the bundle; its extracted files must hash to the same
   approved value; the modules of the app's packages that this trusted process had
   imported (from the site's installed fedlora) are forgotten, so the ClientApp and
   everything it imports come from the approved bundle, whatever else is on
   sys.path; Flower loads and calls the ClientApp. Before the reply is sent, every
   loaded module of those packages must lie in the bundle's folder, else the reply
   is replaced by the refusal.

Any other failure replies with the fixed reason "internal error"; the details go to
the site's log only.

The process is a task server: it imports what a task needs from outside fedlora
(torch, transformers, peft, opacus, flwr: about 9 s of a 2-core CPU) once, after it has
forked its first task, and reads task tokens from stdin, one per line, forking a child per
token that runs steps 1-4. Each task still runs in a fresh process, copied from one that
never ran a task, and starts in milliseconds instead of re-importing those for every
message. fedlora's own modules are not warmed: a task loads them from the approved bundle.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.app_hash import RUNNING_APP_HASH_ENV
from fedlora.client.app_pinning import REFUSED_APP, AppDecision, decide, log_decision, site_log_handler

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

log = logging.getLogger("fedlora.site")

INTERNAL_ERROR = "internal error"
# What a task's handlers import from outside fedlora, warmed once by the task server.
WARM_MODULES = ("numpy", "torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
                "peft", "opacus", "opacus.accountants", "flwr.app", "flwr.clientapp")
# The installed fedlora's top-level packages: never served from outside the bundle.
FEDLORA_PACKAGES = frozenset({"fedlora"})


class ForeignCodeError(RuntimeError):
    """A module of the app's packages was loaded from outside the approved bundle."""


def record_decision(state_dir: Path, run: str, decision: AppDecision, approved: list[str], flower_run_id: int) -> None:
    """One "app" entry per run and decision in the site's audit log (each message of a
    run is its own process: the first one writes it)."""
    from fedlora.privacy.site_audit import append_audit, read_audit

    fields = {"app_hash": decision.app_hash, "approved": decision.approved, "approved_hashes": list(approved)}
    for entry in read_audit(state_dir):
        if entry.get("event") == "app" and entry.get("run") == run and all(entry.get(k) == v for k, v in fields.items()):
            return
    append_audit(state_dir, "app", run=run, flower_run_id=flower_run_id, **fields)


def app_packages(app_path: Path) -> set[str]:
    """Top-level package and module names of an installed bundle, and fedlora's own."""
    names = {p.name for p in app_path.iterdir() if p.is_dir() and p.name != "__pycache__"}
    names |= {p.stem for p in app_path.glob("*.py")}
    return names | FEDLORA_PACKAGES


def forget_modules(packages: set[str]) -> None:
    """Drop these packages' modules from sys.modules: their next import reads the bundle."""
    for name in [n for n in sys.modules if n.partition(".")[0] in packages]:
        del sys.modules[name]
    importlib.invalidate_caches()


def foreign_modules(packages: set[str], app_path: Path) -> list[str]:
    """Loaded modules of these packages whose files lie outside `app_path`."""
    root = app_path.resolve()
    foreign = []
    for name, module in list(sys.modules.items()):
        if module is None or name.partition(".")[0] not in packages:
            continue
        file = getattr(module, "__file__", None)
        locations = [file] if file else list(getattr(module, "__path__", None) or [])
        if not locations or not all(Path(p).resolve().is_relative_to(root) for p in locations):
            foreign.append(name)
    return sorted(foreign)


def load_approved_clientapp(app_path: Path, app_hash: str) -> tuple[ClientApp, set[str]]:
    """The ClientApp of an installed, approved bundle, imported from the bundle only,
    and the package names whose modules must all come from it."""
    from flwr.clientapp import ClientApp

    from fedlora.app_hash import FAB_CONFIG_FILE, clientapp_reference, installed_files_hash
    from fedlora.flower_internals import LoadClientAppError, load_app

    if installed_files_hash(app_path) != app_hash:
        # The folder Flower installed to (or found) differs from the bytes approved.
        raise ForeignCodeError(f"{app_path}: the installed files do not hash to {app_hash}")
    packages = app_packages(app_path)
    ref = clientapp_reference((app_path / FAB_CONFIG_FILE).read_bytes())
    forget_modules(packages)
    client_app = load_app(ref, LoadClientAppError, app_path)  # puts app_path first on sys.path
    if not isinstance(client_app, ClientApp):
        raise LoadClientAppError(f"{ref} is not a ClientApp")
    if foreign := foreign_modules(packages, app_path):
        raise ForeignCodeError(f"modules loaded from outside the approved bundle: {', '.join(foreign)}")
    return client_app, packages


def run_pinned_clientapp(runtime_api_address: str, token: str, state_dir: Path, approved: list[str]) -> int:
    """Run one task; returns the process exit code (0: a reply was sent)."""
    from flwr.app import Error, Message

    from fedlora.flower_internals import (
        ErrorCode, HeartbeatSender, RuntimeHttpClient, RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor, SubStatus,
        get_project_dir, install_from_fab, make_simple_http_retry_invoker, make_task_heartbeat_fn_http, pull_task_input,
        push_message, push_task_output,
    )

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, INTERNAL_ERROR
    try:
        message, context, run, fab = pull_task_input(client)
        run_name = str(context.run_config.get("run.output_dir") or f"flower run {run.run_id}")
        decision = decide(fab.content, approved)
        log_decision(decision, approved, run_name)
        record_decision(state_dir, run_name, decision, approved, run.run_id)  # before acting on it
        if not decision.approved:
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=REFUSED_APP), reply_to=message)
            details = REFUSED_APP
        else:
            assert decision.app_hash is not None
            install_from_fab(fab.content, skip_prompt=True)
            app_path = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
            client_app, packages = load_approved_clientapp(app_path, decision.app_hash)
            # The hash checked above, for the site's signed privacy statement (this process runs one task).
            os.environ[RUNNING_APP_HASH_ENV] = decision.app_hash
            reply = client_app(message=message, context=context)
            if foreign := foreign_modules(packages, app_path):  # imported while handling the message
                raise ForeignCodeError(f"modules loaded from outside the approved bundle: {', '.join(foreign)}")
            sub_status, details = SubStatus.COMPLETED, ""
    except ForeignCodeError as exc:
        log.error("app refused: %s", exc)
        reply, details = (Message(Error(code=ErrorCode.INVALID_FAB, reason=REFUSED_APP), reply_to=message) if message else None,
                          REFUSED_APP)
    except Exception:  # details stay in the site's log; the coordinator gets the category only
        log.exception("ClientApp task failed")
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=INTERNAL_ERROR), reply_to=message) \
            if message else None
    exit_code = 0 if reply is not None else 1
    try:
        if reply is not None and context is not None:
            push_message(client, reply, context)
    except Exception:
        log.exception("the reply could not be pushed to the SuperNode")
        exit_code = 1
    finally:
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        heartbeat.stop()
        client.close()
    return exit_code


def warm_imports() -> None:
    """Import WARM_MODULES, so that every forked task starts with them loaded. No thread
    may start here: a forked child would lack it (checked at start)."""
    import threading

    for name in WARM_MODULES:
        importlib.import_module(name)
    if threading.active_count() != 1:
        raise RuntimeError(f"warming the task server started threads: {threading.enumerate()}")


def run_forked_task(runtime_api_address: str, token: str, state_dir: Path, approved: list[str],
                    parent_pid: int | None) -> None:
    """In the forked child: run one task, then leave without returning to the server's loop."""
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the next tokens are the server's, not this task's
        if parent_pid is not None:
            from fedlora.flower_internals import start_parent_process_monitor

            start_parent_process_monitor(parent_pid)  # the site's executor: gone, this task stops
        code = run_pinned_clientapp(runtime_api_address, token, state_dir, approved)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        log.exception("ClientApp task process failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def reap_children(block: bool = False) -> None:
    """Collect finished tasks, so that none is left a zombie (block: wait for all)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve_tasks(runtime_api_address: str, state_dir: Path, approved: list[str], parent_pid: int | None) -> None:
    """Fork a task per token line on stdin, until stdin closes (the executor is gone) and
    the running tasks have ended. The server warms up (warm_imports) once it has forked its
    first task: a site that is never sent a task (refused, or idle between runs) spends
    nothing on it, and a run's first task, the rank query, needs none of those modules."""
    pending, warm = b"", False
    while True:
        ready, _, _ = select.select([0], [], [], 1.0)
        reap_children()
        if not ready:
            continue
        chunk = os.read(0, 4096)  # not sys.stdin: its buffer could hide a second token from select
        if not chunk:
            reap_children(block=True)
            return
        *tokens, pending = (pending + chunk).split(b"\n")
        forked = False
        for token in filter(None, (t.strip().decode() for t in tokens)):
            if os.fork() == 0:
                run_forked_task(runtime_api_address, token, state_dir, approved, parent_pid)
            forked = True
        if forked and not warm:
            warm_imports()
            warm = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlora.client.pinned_clientapp",
                                     description="The site's ClientApp task server: reads task tokens from stdin, one "
                                                 "per line, and runs each in a forked process, only if its app bundle "
                                                 "is approved. Exits when stdin closes.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--approved", action="append", required=True)
    parser.add_argument("--parent-pid", type=int, help="the site's executor: a task stops when it exits")
    args = parser.parse_args(argv)
    site_log_handler()
    try:
        serve_tasks(args.runtime_api_address, args.state_dir, args.approved, args.parent_pid)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
