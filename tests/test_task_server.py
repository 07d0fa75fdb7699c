"""The site's ClientApp task server (client/pinned_clientapp.py, fed by client/site_executor.py).

It imports torch, transformers, peft, opacus and flwr once, after forking its first task,
and forks a process per task token, so a deployed message no longer pays about 9 s of
imports. What must hold:
- every token read becomes exactly one task, in its own process, also when two tokens
  arrive in one write; the server exits when its stdin closes and leaves no zombie;
- the server warms up only once it has forked a task (a site never sent one spends
  nothing), and the tasks forked after that start warm;
- a task starts from the server's state, never from an earlier task's (a module one task
  loaded, an environment variable it set, e.g. the running app's hash);
- warming loads the third-party modules, no fedlora handler module, and starts no thread;
- the executor starts the server again when it has exited, and the task still gets there.
Real tasks through it run in every deployment test (tests/test_deployment.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fedlora.client.site_executor import TaskServer

# A task server whose tasks record what they see instead of calling the SuperNode.
SERVER = textwrap.dedent("""
    import json, os, sys
    import fedlora.client.pinned_clientapp as pinned

    out = sys.argv[1]
    pinned.WARM_MODULES = ("wave",)  # a module nothing here imports: a warm task has it
    assert "wave" not in sys.modules

    def record(runtime_api_address, token, state_dir, approved, parent_pid):
        seen = {"token": token, "pid": os.getpid(), "server": os.getppid(), "env": os.environ.get("TASK_MARK"),
                "module": "json.tool" in sys.modules, "warm": "wave" in sys.modules}
        os.environ["TASK_MARK"] = token  # what an earlier task leaves behind must not reach the next one
        import json.tool  # noqa: F401
        with open(os.path.join(out, token + ".json"), "w") as fh:
            json.dump(seen, fh)
        os._exit(0)

    pinned.run_forked_task = record
    pinned.serve_tasks("127.0.0.1:1", out, ["hash"], None)
    print("server exited")
""")


def test_each_token_is_one_task_in_a_fresh_fork_of_the_server(tmp_path):
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert server.stdin is not None
    server.stdin.write("first\nsecond\n")  # two tokens in one write
    server.stdin.flush()
    time.sleep(1.5)
    server.stdin.write("third\n\n")  # and a blank line, which is no task
    server.stdin.close()
    server.wait(timeout=60)
    assert server.stdout is not None
    out = server.stdout.read()
    assert server.returncode == 0 and "server exited" in out

    seen = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert sorted(seen) == ["first", "second", "third"]
    assert len({s["pid"] for s in seen.values()}) == 3 and server.pid not in {s["pid"] for s in seen.values()}
    assert {s["server"] for s in seen.values()} == {server.pid}
    # Each task saw the server's state, not the earlier tasks' environment or modules.
    assert all(s["env"] is None and s["module"] is False for s in seen.values())
    # Warmed once it had forked the first write's tasks: they started cold, the later one warm.
    assert {token: s["warm"] for token, s in seen.items()} == {"first": False, "second": False, "third": True}
    # Its children were reaped: none is left as a zombie of the exited server (all gone).
    for s in seen.values():
        assert not Path(f"/proc/{s['pid']}").exists()


def test_warming_imports_the_third_party_modules_and_starts_no_thread():
    script = textwrap.dedent("""
        import json, sys, threading
        import fedlora.client.pinned_clientapp as pinned
        pinned.warm_imports()
        print(json.dumps({"warm": [m for m in pinned.WARM_MODULES if m not in sys.modules],
                          "handlers": [m for m in ("fedlora.client.client_app", "fedlora.client.training_handlers")
                                       if m in sys.modules],
                          "threads": threading.active_count()}))
    """)
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result == {"warm": [], "handlers": [], "threads": 1}
    assert {"torch", "transformers", "opacus", "peft"} <= set(
        __import__("fedlora.client.pinned_clientapp", fromlist=["WARM_MODULES"]).WARM_MODULES)


def test_the_executor_starts_the_server_again_when_it_has_exited(tmp_path):
    # A server that takes one token and exits: the second token needs a new one.
    one_shot = [sys.executable, "-c", f"import sys; open({str(tmp_path / 'tokens')!r}, 'a').write(sys.stdin.readline())"]
    tasks = TaskServer(one_shot)
    tasks.hand_over("first")
    tasks.proc.wait(timeout=30)
    tasks.hand_over("second")
    tasks.proc.wait(timeout=30)
    tasks.close()
    assert (tmp_path / "tokens").read_text().split() == ["first", "second"]
