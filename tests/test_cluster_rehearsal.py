"""A rehearsal of ``ray up`` on this machine, with nothing read from the checkout.

The wheel is built from this checkout and installed into a fresh virtual environment
outside the repository (its dependencies are this environment's, reached through a
``.pth`` file, so nothing is downloaded). A head and an extra node are started with
``ray start`` from two other folders, and ``metalearn train --address`` is submitted
with a packaged config from a third: every process works from the installed package
only. Both are in the slow set (the wheel build and two `ray start` nodes take about
80 s): the short one trains and resumes, the full one also removes a node mid-run and
sees training go on. `.ci/run` itself installs the wheel non-editably and trains, exports
and evaluates from outside the checkout; `tests/test_multinode.py` covers a multi-node
cluster in the default suite.
"""

import os
import subprocess
import sys
import time

import pytest
import yaml

import cluster_helpers
from cluster_helpers import alive_nodes, free_port, kill_now, kill_started, wait_for_nodes
from metalearn.training.metrics import read_metrics

CHECKOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment (outside the checkout) with the built wheel."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(wheels), CHECKOUT], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = list(wheels.glob("metalearn-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env())
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=300, env=clean_env(), cwd=str(root))
    assert install.returncode == 0, install.stderr[-3000:]
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    # Dependencies from this environment (after the venv's own packages on sys.path);
    # only now, so that the install above cannot find this environment's metalearn.
    ours = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    with open(os.path.join(site.stdout.strip(), "deps.pth"), "w") as f:
        f.write("".join(path + "\n" for path in ours))
    where = subprocess.run([python, "-c", "import metalearn; print(metalearn.__file__)"],
                           capture_output=True, text=True, cwd=str(root), check=True,
                           env=clean_env())
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel, not us
    return venv


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def start_node(venv, cwd, *args) -> subprocess.Popen:
    return cluster_helpers.start_node(str(venv / "bin" / "python"), cwd, clean_env(), *args)


def metalearn(venv, cwd, *args, timeout=600, background=False):
    os.makedirs(cwd, exist_ok=True)
    command = [str(venv / "bin" / "metalearn"), *args]
    if background:
        return subprocess.Popen(command, cwd=cwd, env=clean_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def steps_of(run_dir) -> list[int]:
    """The learner steps in the run's metrics (none before its first flush)."""
    try:
        table = read_metrics(run_dir)
    except FileNotFoundError:
        return []
    return sorted(table.column("step").to_pylist()) if table.num_rows else []


@pytest.fixture
def cluster(installed, tmp_path):
    """A head and one extra node (1 CPU each), each started from its own folder."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node(installed, str(tmp_path / "head"), "--head", f"--port={port}",
                      "--num-cpus=1", "--include-dashboard=false")
    node_port = free_port()
    node = None
    try:
        wait_for_nodes(address, 1, [head])
        node = start_node(installed, str(tmp_path / "node"), f"--address={address}",
                          "--num-cpus=1", f"--node-manager-port={node_port}")
        wait_for_nodes(address, 2, [head, node])
        yield {"address": address, "node": node, "node_port": node_port}
    finally:
        if node is not None:
            kill_started(node, f"node_manager_port={node_port}")
        kill_started(head, address)


@pytest.mark.slow
def test_wheel_in_a_fresh_environment_trains_on_a_cluster_and_resumes(installed, cluster,
                                                                       tmp_path):
    run_dir = str(tmp_path / "runs" / "smoke")
    submit = str(tmp_path / "submit")
    first = metalearn(installed, submit, "train", "--config", "smoke", "--address",
                      cluster["address"], "--workers", "2", "--steps", "3", "--minutes", "6",
                      "--out", run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "training with 2 workers" in first.stderr
    assert steps_of(run_dir) == [1, 2, 3]
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert yaml.safe_load(f)["tasks"]["mix"] == "tiny"  # packaged, by name
    again = metalearn(installed, str(tmp_path / "elsewhere"), "train", "--resume", run_dir,
                      "--address", cluster["address"], "--steps", "5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed {run_dir} at step 3" in again.stderr
    assert steps_of(run_dir) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_node_removed_mid_run_and_training_goes_on(installed, cluster, tmp_path):
    run_dir = str(tmp_path / "run")
    job = metalearn(installed, str(tmp_path / "submit"), "train", "--config", "smoke",
                    "--address", cluster["address"], "--workers", "2", "--steps", "150",
                    "--minutes", "8", "--set", "run.metrics_flush_s=1", "--out", run_dir,
                    background=True)
    try:
        deadline = time.monotonic() + 300
        while not (steps_of(run_dir) and steps_of(run_dir)[-1] >= 3):
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no learner step within 5 minutes"
            time.sleep(2)
        # The extra node goes away (a reclaimed spot instance); the learner and the
        # driver are on the head, the worker that was on the node is lost with it.
        kill_now(f"node_manager_port={cluster['node_port']}")  # its raylet and workers
        assert job.poll() is None, "the run ended before the node was removed"
        deadline = time.monotonic() + 180  # the GCS notices a dead node after a timeout
        while len(alive_nodes(cluster["address"])) != 1:
            assert time.monotonic() < deadline, "the removed node still counts as alive"
            time.sleep(3)
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    assert steps_of(run_dir) == list(range(1, 151))  # no step lost or repeated
    assert "worker restarts 0" not in err  # the lost worker was noticed
