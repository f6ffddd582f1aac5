"""Multi-node behaviour: workers spread over nodes, a lost node is survived, and the fake
multi-node autoscaler (clusters/local-fake.yaml) adds worker nodes for a training run.

Each test starts (and stops) its own Ray cluster; none may run while another Ray is
initialised in this process (tests/test_train.py's module fixture is torn down by then).
"""

import os
import subprocess
import sys
import time

import pytest
import yaml

from metalearn.training.runner import train
from metalearn.training.session import Session
from metalearn.training.config import config_to_yaml
from metalearn.training.loop import Callback
from metalearn.training.metrics import read_metrics
from cluster_helpers import alive_nodes, free_port, kill_started
from train_helpers import tiny_config

os.environ["RAY_AUTH_MODE"] = "disabled"
VENV_BIN = os.path.dirname(sys.executable)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture
def no_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield ray
    ray.shutdown()


def node_of(actor) -> str:
    """The node an actor lives on (waits while the actor restarts)."""
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + 180
    while True:
        try:
            return ray.get(actor.__ray_call__.remote(
                lambda self: ray.get_runtime_context().get_node_id()), timeout=120)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


# In the slow set: the short chaos run (tests/test_chaos.py) removes a node in the
# default suite; this one also checks where the replaced worker lands.
@pytest.mark.slow
def test_node_lost_mid_run_workers_replaced_learner_intact(no_ray, tmp_path):
    from ray.cluster_utils import Cluster

    from metalearn.distributed.driver import RAY

    ray = no_ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        # Two worker nodes of 2 CPUs: SPREAD must put one worker on each.
        first = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        head_id = ray.get_runtime_context().get_node_id()
        config = tiny_config(tmp_path, run={"steps": 8, "minutes": 5.0},
                             worker={"num_workers": 2, "batch_size": 8})
        seen = {}

        class NodeRemover(Callback):
          def on_row(self, loop, row):
            if row["step"] == 2 and "removed" not in seen:
                nodes = [node_of(w) for w in loop.workers.workers]
                seen["before"] = nodes
                seen["generation"] = loop.theta.generation
                replacement = cluster.add_node(num_cpus=2)
                seen["replacement"] = replacement.node_id
                victim = next(n for n in first if n.node_id == nodes[0])
                cluster.remove_node(victim)
                seen["removed"] = victim.node_id
                seen["removed_at"] = row["step"]
            elif "removed" in seen and row["step"] >= 6 and "after" not in seen:
                seen["after"] = [node_of(w) for w in loop.workers.workers]
                seen["generation_after"] = loop.theta.generation

        summary = train(Session.of(config, str(tmp_path / "run")), RAY, callbacks=[NodeRemover()])
    finally:
        ray.shutdown()
        cluster.shutdown()

    before, after = seen["before"], seen["after"]
    assert len(set(before)) == 2 and head_id not in before, before  # spread, not on head
    assert seen["removed"] == before[0]
    assert seen["removed"] not in after  # the lost worker came back on another node
    assert set(after) <= {before[1], seen["replacement"]}
    assert summary.worker_failures >= 1
    assert summary.learner_restarts == 0  # the learner (on the head) never noticed
    assert seen["generation_after"] == seen["generation"]
    assert summary.final_step == 8
    steps = read_metrics(tmp_path / "run").column("step").to_pylist()
    assert sorted(steps) == list(range(1, 9))  # no step lost or repeated around the failure


# Slow (about a minute): the cluster rehearsal (tests/test_cluster_rehearsal.py) keeps
# `ray start` nodes and a submitted run in the default suite.
@pytest.mark.slow
def test_fake_multinode_autoscaler_adds_worker_nodes(no_ray, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    with open(os.path.join(ROOT, "clusters", "local-fake.yaml")) as f:
        cluster = yaml.safe_load(f)
    # Same cluster, but on a free port so it cannot meet another Ray on this host.
    cluster["provider"]["gcs_address"] = address
    config_path = tmp_path / "fake.yaml"
    config_path.write_text(yaml.safe_dump(cluster))
    train_config = tmp_path / "tiny.yaml"
    train_config.write_text(config_to_yaml(tiny_config(tmp_path)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_ADDRESS": address}
    head = subprocess.Popen(
        [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block",
         f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         # `ray start` does not take the head's resources from the autoscaling config
         "--num-cpus=0", '--resources={"learner": 1}',
         f"--autoscaling-config={config_path}"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                before = alive_nodes(address)
                break
            except (AssertionError, IndexError, ValueError):
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(3)
        assert len(before) == 1 and before[0]["cpu"] == 0  # only the CPU-less head
        run_dir = tmp_path / "run"
        result = subprocess.run(
            [os.path.join(VENV_BIN, "metalearn"), "train", "--config", str(train_config),
             "--address", address, "--workers", "2", "--steps", "4", "--minutes", "6",
             "--out", str(run_dir)],
            env=env, capture_output=True, text=True, timeout=480)
        assert result.returncode == 0, result.stderr[-3000:]
        after = alive_nodes(address)
        assert len(after) >= 3, after  # the autoscaler added a node per worker
        assert sum(n["cpu"] for n in after) >= 2
        steps = read_metrics(run_dir).column("step").to_pylist()
        assert sorted(steps) == [1, 2, 3, 4]  # (the driver may write the last rows unordered)
    finally:
        kill_started(head, address)


@pytest.mark.parametrize("estimator", [
    "pes", pytest.param("es", marks=pytest.mark.slow),
    pytest.param("hybrid", marks=pytest.mark.slow)])
def test_estimators_train_on_a_fake_multinode_cluster(no_ray, tmp_path, estimator):
    """ES-family estimators through the real driver, learner and worker actors on two
    worker nodes, with two vmapped tasks per worker: the learner needs no special case
    (a submission is a gradient with a count) and their metrics reach the metrics table.
    PES (the most state: particles and accumulator per task) runs in the default suite;
    ES and the hybrid share its code paths and run with ``-m slow``."""
    from ray.cluster_utils import Cluster

    from metalearn.distributed.driver import RAY

    ray = no_ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        # A generous time limit: the step limit ends the run (compiles are slow on a
        # busy machine).
        config = tiny_config(tmp_path, run={"steps": 3, "minutes": 20.0},
                             estimator={"kind": estimator, "pairs": 2},
                             worker={"num_workers": 2, "batch_size": 8,
                                     "tasks_per_worker": 2},
                             learner={"meta_batch": 4})
        summary = train(Session.of(config, str(tmp_path / "run")), RAY)
        table = read_metrics(tmp_path / "run").to_pydict()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary.final_step == 3
    assert table["step"] == [1, 2, 3]
    assert all(v > 0 for v in table["est/grad_norm"])
    assert all(v > 0 for v in table["grad_var"])  # two submissions of 2 tasks per step
    if estimator == "pes":
        assert all(v > 0 for v in table["est/xi_norm"])
    if estimator == "hybrid":
        assert all(0 <= v <= 1 for v in table["est/w_bp"])
