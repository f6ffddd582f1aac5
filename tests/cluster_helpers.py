"""Helpers for tests that start Ray nodes as separate processes (``ray start``)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_started(group: subprocess.Popen, marker: str) -> None:
    """Stop the fake cluster: the head's process group, then any process (a fake node's
    raylet, a worker) whose command line names this cluster's GCS address."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group.pid, sig)
        except ProcessLookupError:
            break
        try:
            group.wait(timeout=5)  # a test cluster: SIGKILL after a short grace
            break
        except subprocess.TimeoutExpired:
            continue
    for _ in range(2):
        kill_now(marker)
        time.sleep(1)


def kill_now(marker: str) -> None:
    """SIGKILL every process whose command line holds ``marker`` (a node going away)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            if marker in cmdline:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def alive_nodes(address: str) -> list[dict]:
    script = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
              "print(json.dumps([{'id': n['NodeID'], 'cpu': n['Resources'].get('CPU', 0)} "
              "for n in ray.nodes() if n['Alive']]))" % address)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_node(python: str, cwd, env: dict, *args) -> subprocess.Popen:
    """``ray start --block`` with ``python``'s Ray, from the folder ``cwd`` (created),
    in a session of its own (``kill_started`` stops it)."""
    os.makedirs(cwd, exist_ok=True)
    return subprocess.Popen(
        [python, "-m", "ray.scripts.scripts", "start", "--block",
         "--node-ip-address=127.0.0.1", *args],
        cwd=cwd, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_nodes(address: str, count: int, processes) -> list[dict]:
    """The alive nodes, once there are ``count`` of them (at most 180 s)."""
    deadline = time.monotonic() + 180
    while True:
        try:
            nodes = alive_nodes(address)
            if len(nodes) >= count:
                return nodes
        except (AssertionError, IndexError, ValueError, subprocess.TimeoutExpired):
            pass
        assert all(p.poll() is None for p in processes), "a `ray start` exited"
        assert time.monotonic() < deadline, f"{count} nodes did not come up"
        time.sleep(3)
