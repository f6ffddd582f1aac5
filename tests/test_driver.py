"""The Ray runner's connection rules (``init_ray``) without starting Ray."""

import os
import socket
import tempfile

from metalearn.distributed import driver


def test_a_running_local_cluster_is_found_and_a_stale_one_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    assert driver.running_local_cluster() is None  # no `ray start` here
    os.makedirs(tmp_path / "ray")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
        assert driver.running_local_cluster() == address
    # The cluster is gone but its address file stays: not an address to wait on.
    assert driver.running_local_cluster() is None


def test_init_ray_follows_rays_conventions(monkeypatch):
    calls = []
    monkeypatch.setattr(driver.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(driver.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(driver, "running_local_cluster", lambda: "127.0.0.1:6379")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    assert driver.init_ray("10.0.0.1:6379") and calls[-1] == {"address": "10.0.0.1:6379"}
    assert driver.init_ray("") and calls[-1] == {"address": "127.0.0.1:6379"}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert driver.init_ray("") and calls[-1] == {}  # ray.init reads RAY_ADDRESS itself
    assert driver.init_ray("local") and calls[-1]["address"] == "local"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(driver, "running_local_cluster", lambda: None)
    assert driver.init_ray("") and calls[-1]["address"] == "local"
    assert calls[-1]["_system_config"] == driver.local_system_config()
