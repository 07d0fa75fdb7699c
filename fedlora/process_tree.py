"""Run commands as one process tree that stops as a whole.

`fedlora coordinator` and `fedlora client` start Flower processes that start their own:
the SuperLink starts a SuperExec in a session of its own (so a Ctrl-C at the terminal
never reaches it) that starts one ServerApp process per run, and a site's executor
starts one ClientApp process per task. Flower's processes do not all take their
children down when they stop, and a process whose parent is gone is adopted by init,
where nothing finds it again. So the fedlora command stays the parent of everything
it started: it becomes a child subreaper (orphaned descendants are re-parented to it,
not to init), waits, and on SIGTERM, SIGINT or SIGHUP, or when one of its commands
exits, terminates every descendant (SIGTERM, a grace period, then SIGKILL) and reaps
them.

Exit code of `supervise`: the code of the command that exited first (128+N if a
signal N killed it), or 128+N when signal N stopped the supervisor (130 for Ctrl-C,
143 for SIGTERM), as a shell reports a process killed by that signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import IO

import psutil

PR_SET_CHILD_SUBREAPER = 36
GRACE_SECONDS = 10.0
KILL_WAIT_SECONDS = 5.0
POLL_SECONDS = 0.2


def become_subreaper() -> bool:
    """Orphaned descendants re-parent to this process instead of init (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell reports it (killed by signal N: 128+N)."""
    return 128 - returncode if returncode < 0 else returncode


def _reap_adopted(own: set[int]) -> None:
    """Reap exited children that are not ours by Popen (descendants adopted as a
    subreaper); our own children are left for their Popen to wait for."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # look, do not reap
        except ChildProcessError:  # no children at all
            return
        if info is None or info.si_pid in own:
            return
        os.waitpid(info.si_pid, 0)


def _running_descendants() -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def stop_descendants(procs: Sequence[subprocess.Popen], grace: float = GRACE_SECONDS,
                     kill_now: Callable[[], bool] = lambda: False) -> None:
    """SIGTERM every descendant, SIGKILL those still running after `grace` seconds
    (or at once when kill_now() says so), and reap them. Descendants started while
    this runs are found and stopped too."""
    own = {p.pid for p in procs}
    signalled: dict[int, int] = {}
    deadline = time.monotonic() + grace
    while True:
        for p in procs:
            p.poll()
        _reap_adopted(own)
        alive = _running_descendants()
        if not alive or time.monotonic() > deadline + KILL_WAIT_SECONDS:
            break
        sig = signal.SIGKILL if time.monotonic() > deadline or kill_now() else signal.SIGTERM
        for proc in alive:
            if signalled.get(proc.pid) != sig:
                try:
                    proc.send_signal(sig)  # psutil checks the pid was not reused
                    signalled[proc.pid] = sig
                except psutil.NoSuchProcess:
                    pass
        time.sleep(POLL_SECONDS / 2)
    for p in procs:
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    _reap_adopted(own)


# Starts a command with SIGTERM ignored (an ignored disposition survives exec) until the
# program installs its own handler. A wrapper that execs, not a preexec_fn: Python code
# between fork and exec is unsafe in a process with other threads (the site's coordinator
# watch and output relays); while the watch used gRPC, the child died before its exec.
_IGNORING_SIGTERM = ("import os, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                     "os.execvp(sys.argv[1], sys.argv[1:])")


def _with_sigterm_ignored(command: Sequence[str]) -> list[str]:
    return [sys.executable, "-c", _IGNORING_SIGTERM, *command]


def _relay(stream: IO[bytes], to: IO[str], on_line: Callable[[str], None]) -> None:
    """Copy a child's output to ours line by line, showing each line to `on_line`."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        to.write(line)
        to.flush()
        on_line(line)
    stream.close()


def supervise(commands: Sequence[Sequence[str]], env: Mapping[str, str] | None = None, cwd: Path | None = None,
              grace: float = GRACE_SECONDS, while_running: Callable[[], None] = lambda: None,
              sigterm_once: Collection[int] = (), watch_output: Mapping[int, Callable[[str], None]] | None = None) -> int:
    """Start the commands and wait until one of them exits or this process gets
    SIGTERM, SIGINT or SIGHUP; then stop the whole tree. `while_running` is called
    every poll while all commands run. Returns the exit code (see the module docstring).

    `sigterm_once`: the indexes of commands that stop gracefully on the first SIGTERM
    and must not get a second one (Flower's processes: their handler resets SIGTERM to
    the disposition they inherited, and a second signal with the default one kills them
    before they have, for a SuperNode, left the coordinator). A signal to this process's
    group (`kill %1` in a shell, Ctrl-C at a terminal) reaches them as well as the one
    sent here, so they start with SIGTERM ignored: their own handler still takes the
    first, and any later one is ignored (a stuck one still gets SIGKILL after `grace`).
    `watch_output`: command index -> a callable shown each line that command prints
    (its stdout and stderr are relayed to this process's, line by line)."""
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    handled = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # nohup stays in force
        handled.append(signal.SIGHUP)
    for sig in handled:
        signal.signal(sig, on_signal)
    become_subreaper()
    procs: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    watch_output = watch_output or {}
    try:
        for index, command in enumerate(commands):
            piped = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE} if index in watch_output else {}
            argv = _with_sigterm_ignored(command) if index in sigterm_once else list(command)
            proc = subprocess.Popen(argv, env=None if env is None else dict(env), cwd=cwd, **piped)  # pylint: disable=consider-using-with
            procs.append(proc)
            if piped:
                for stream, to in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                    relays.append(threading.Thread(target=_relay, args=(stream, to, watch_output[index]), daemon=True))
                    relays[-1].start()
        while not received and all(p.poll() is None for p in procs):
            _reap_adopted({p.pid for p in procs})
            while_running()
            time.sleep(POLL_SECONDS)
    finally:
        exited = [p.returncode for p in procs if p.returncode is not None]
        stop_descendants(procs, grace, kill_now=lambda: len(received) > 1)  # a second Ctrl-C: SIGKILL now
        for relay in relays:
            relay.join(timeout=5)  # the last lines, before the caller reads what they showed
    if received:
        return 128 + received[0]
    return exit_code(exited[0]) if exited else 1
