"""A private network for this process and everything it starts: loopback only.

Ray's processes (gcs_server, raylet, workers) listen on all interfaces, and Ray 2.55.1
under Flower 1.42 has no setting that binds them to 127.0.0.1. Where nothing but
loopback exists, nothing can listen anywhere else: on Linux an unprivileged process
can create a user namespace (its own uid and gid mapped to themselves, so files keep
their owner) holding a network namespace whose only interface is `lo`. Every child,
Ray's included, inherits it; the file system, signals and process tree stay the
host's.

unshare(CLONE_NEWUSER) succeeds only in a single-threaded process, so `enter()` runs
before anything starts a thread (torch, Ray, gRPC). Python 3.11 has no os.unshare:
libc's is called through ctypes, and `lo` is brought up with an ioctl, because `ip`
may be absent.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import subprocess
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# Tests set this to "1" to make unshare fail as it does where user namespaces are disabled.
TEST_UNAVAILABLE_ENV = "FEDLORA_TEST_NO_NAMESPACES"


class IsolationUnavailable(OSError):
    """This process cannot enter a private network namespace; the message says why."""


def only_loopback() -> bool:
    """True when this process's network namespace has no interface but loopback
    (already isolated, e.g. by `unshare -rn` or a parent fedlora process)."""
    try:
        return [name for _, name in socket.if_nameindex()] == ["lo"]
    except OSError:
        return False


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def enter() -> None:
    """Move this process into a new user + network namespace with only `lo`, up.
    Raises IsolationUnavailable (with the reason) where that is not possible."""
    if not sys.platform.startswith("linux"):
        raise IsolationUnavailable(f"network namespaces need Linux (this is {sys.platform})")
    if os.environ.get(TEST_UNAVAILABLE_ENV) == "1":
        raise IsolationUnavailable(f"user namespaces are unavailable ({TEST_UNAVAILABLE_ENV}=1)")
    if _threads() > 1:  # a programming error, not the machine's: say so rather than blame the kernel
        raise RuntimeError(f"private_network.enter() needs a single-threaded process ({_threads()} threads run)")
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        reason = {errno.EPERM: "user namespaces are disabled for unprivileged users",
                  errno.ENOSPC: "the user namespace limit is reached (user.max_user_namespaces)",
                  errno.EINVAL: "the kernel refused a new user namespace"}.get(code, os.strerror(code))
        raise IsolationUnavailable(f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {reason}")
    # Map our own ids only; setgroups must be denied before an unprivileged gid_map write.
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _loopback_up()


def unavailable_reason() -> str | None:
    """Why a process here cannot enter a private network (None: it can). Tried in a fresh
    interpreter, so that this process, threaded or not, stays where it is."""
    probe = ("import sys\nfrom fedlora.private_network import IsolationUnavailable, enter\n"
             "try:\n    enter()\nexcept IsolationUnavailable as exc:\n    sys.exit(str(exc))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or [f"the probe exited with {proc.returncode}"])[-1]
