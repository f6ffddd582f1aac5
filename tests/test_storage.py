"""Sweep checkpoints in object storage, rehearsed against a real S3 API on 127.0.0.1.

moto's server (a local implementation of the S3 REST API) stands in for the bucket;
pyarrow's S3 filesystem, which Tune uses, reaches it through ``AWS_ENDPOINT_URL`` as
it would reach MinIO or any S3-compatible store. The rehearsal: two ``ray start`` nodes
in separate folders, trials on the non-head node, the driver interrupted mid-sweep and
the sweep resumed from the bucket, then its best rule exported.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from metalearn.core.config import ConfigError
from metalearn.distributed import storage

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from test_sweep import write_spec  # noqa: E402  (the smoke spec, changed)


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free port with one bucket, ``sweeps``; the environment
    (credentials, endpoint) points boto3 and pyarrow at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket="sweeps")
    yield {"client": client, "env": env}
    server.stop()


# The smoke sweep's first grid point, fixed: one trial.
ONE_TRIAL = {"learner.lr_values": [3.0e-3, 1.0e-3, 3.0e-4], "learner.lr_boundaries": [10, 20],
             "curriculum.unroll_start": [1, 2], "curriculum.unroll_end": [2, 3],
             "curriculum.unroll_ramp_steps": 20}


def keys(client, prefix="") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="sweeps", Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_locations_paths_and_uris(tmp_path):
    assert storage.resolve("", str(tmp_path / "o" / "tune")) == str(tmp_path / "o" / "tune")
    assert storage.resolve("file://" + str(tmp_path), "x") == str(tmp_path)
    assert storage.resolve("s3://b/p", "x") == "s3://b/p"
    assert storage.join("s3://b/p/", "name") == "s3://b/p/name"
    # An endpoint override in the query stays at the end of the joined URI.
    assert (storage.join("s3://b/p?endpoint_override=http://h:9&scheme=http", "n", "c")
            == "s3://b/p/n/c?endpoint_override=http://h:9&scheme=http")
    assert storage.join(str(tmp_path), "n") == str(tmp_path / "n")
    import pyarrow.fs as pafs
    fs = pafs.S3FileSystem(region="us-east-1")
    assert (storage.uri_of("sweeps/prefix/n/t/checkpoint_000001", fs, "s3://sweeps/prefix?scheme=http")
            == "s3://sweeps/prefix/n/t/checkpoint_000001?scheme=http")
    assert storage.uri_of("/a/b", pafs.LocalFileSystem(), "s3://x") == "/a/b"
    with pytest.raises(ConfigError, match="storage 'nosuch://x'"):
        storage.filesystem("nosuch://x")
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="not a writable folder"):
        storage.check_writable(str(blocked / "sub"))
    storage.check_writable(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()  # a check creates nothing


def test_bucket_checks_and_downloads(s3, tmp_path):
    storage.check_writable("s3://sweeps/prefix")
    # The probe is removed (pyarrow leaves a "prefix/" folder marker behind).
    assert not [k for k in keys(s3["client"]) if "metalearn-probe" in k]
    with pytest.raises(ConfigError, match="check that the bucket exists"):
        storage.check_writable("s3://no-such-bucket/prefix")
    s3["client"].put_object(Bucket="sweeps", Key="run/checkpoint_000002/a/b.txt", Body=b"hi")
    assert storage.exists("s3://sweeps/run/checkpoint_000002")
    assert not storage.exists("s3://sweeps/run/checkpoint_000009")
    with storage.local_copy("s3://sweeps/run/checkpoint_000002") as folder:
        assert os.path.basename(folder) == "checkpoint_000002"
        with open(os.path.join(folder, "a", "b.txt")) as f:
            assert f.read() == "hi"
    assert not os.path.exists(folder)  # the download is removed on exit
    with pytest.raises(FileNotFoundError, match="no such folder"):
        with storage.local_copy("s3://sweeps/run/checkpoint_000009"):
            pass


@pytest.mark.long
def test_rehearsal_two_nodes_trials_on_the_worker_node_interrupted_and_resumed(s3, tmp_path):
    """Under two minutes (about 110 s here): two ``ray start`` nodes from their own
    folders (the head with no CPU, so every trial runs on the other node and writes its
    checkpoints from there); a missing bucket refused before anything is written; the
    sweep driver interrupted (SIGINT, as Ctrl-C) once the bucket holds a checkpoint,
    resumed from the bucket to the end, and its best rule exported from the bucket."""
    from cluster_helpers import free_port, kill_started, start_node, wait_for_nodes

    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, **s3["env"], "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"

    def start(folder, *args):
        return start_node(sys.executable, folder, env, *args)

    head = start(str(tmp_path / "head"), "--head", f"--port={port}", "--num-cpus=0",
                 "--include-dashboard=false")
    node_port = free_port()
    node = None
    try:
        wait_for_nodes(address, 1, [head])
        node = start(str(tmp_path / "node"), f"--address={address}", "--num-cpus=2",
                     f"--node-manager-port={node_port}")
        nodes = wait_for_nodes(address, 2, [head, node])
        assert sorted(n["cpu"] for n in nodes) == [0, 2]  # trials can only go to the node
        spec = write_spec(tmp_path, "rehearsal", search=ONE_TRIAL,
                          trial={"steps": 12, "report_every": 2, "minutes": 10},
                          scheduler={"type": "fifo"})
        out = tmp_path / "out"
        command = [os.path.join(bin_dir, "metalearn"), "sweep", spec, "--out", str(out),
                   "--address", address, "--storage", "s3://sweeps/rehearsal"]
        # A bucket that does not exist: one line, before anything is written.
        missing = subprocess.run(command[:-1] + ["s3://missing/x"], cwd=str(tmp_path),
                                 env=env, capture_output=True, text=True, timeout=300)
        assert missing.returncode == 2, missing.stderr[-3000:]
        assert "storage s3://missing/x: cannot write there" in missing.stderr
        assert not out.exists()

        driver = subprocess.Popen(command, cwd=str(tmp_path), env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not any("/checkpoint_000001/" in k for k in keys(s3["client"], "rehearsal/")):
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(2)
        driver.send_signal(signal.SIGINT)  # the user's Ctrl-C, mid-sweep
        driver.communicate(timeout=120)
        assert not (out / "tune").exists()  # nothing but the bucket holds the trial
        assert json.loads((out / "resume.json").read_text()) == {
            "spec": spec, "storage": "s3://sweeps/rehearsal"}

        resumed = subprocess.run(command[:2] + ["--resume", str(out), "--address", address],
                                 cwd=str(tmp_path), env=env,
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        [row] = pq.read_table(str(out / "results.parquet")).to_pylist()
        assert row["status"] == "DONE" and row["final_step"] == 12
        history = pq.read_table(str(out / "history.parquet")).to_pylist()
        steps = [h["step"] for h in history]
        assert steps[0] == 2 and steps[-1] == 12 and steps == sorted(set(steps))
        assert any(h["restored_step"] >= 2 for h in history)  # continued, not restarted
        assert row["checkpoint"].startswith("s3://sweeps/rehearsal/rehearsal/")
        assert (out / "reports.jsonl").exists()  # the report log stays on this disk
        assert any("/checkpoint_" in k for k in keys(s3["client"], "rehearsal/rehearsal/"))
        exported = subprocess.run(
            [os.path.join(bin_dir, "metalearn"), "export", "--best", str(out), "--out",
             str(tmp_path / "rule"), "--json"], cwd=str(tmp_path), env=env,
            capture_output=True, text=True, timeout=300)
        assert exported.returncode == 0, exported.stderr[-3000:]
        assert json.loads(exported.stdout.strip().splitlines()[-1])["step"] == 12
    finally:
        if node is not None:
            kill_started(node, f"node_manager_port={node_port}")
        kill_started(head, address)
