"""Shared fixtures: small rule configs and problems that compile in seconds."""

import os

# Tests run on CPU; keep Ray quiet and local (token auth on a laptop test is noise).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile many small programs once each: LLVM's -O0 halves XLA:CPU compile time
# (measured 36 s -> 17 s for a 6-layer rule) and the numbers asserted do not depend on it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# Under pytest-xdist each worker gets its own temporary folder: Ray keeps its sessions and
# the address of the last `ray start` cluster (which `metalearn train` joins) under it, so
# one worker's test clusters stay invisible to the other's runs. Short, for Ray's socket
# paths (at most 107 bytes).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import tempfile

    _worker_tmp = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(),
                               f"ml-{os.getpid()}-{os.environ['PYTEST_XDIST_WORKER']}")
    os.makedirs(_worker_tmp, exist_ok=True)
    os.environ["TMPDIR"] = _worker_tmp
    tempfile.tempdir = None  # re-read TMPDIR

import jax  # noqa: E402
import pytest  # noqa: E402

from metalearn.core.config import MetaObjectiveConfig, RuleConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_rule() -> RuleConfig:
    """A structurally complete rule with very few channels."""
    return RuleConfig.small(top_units=8, top_delta_size=4, compute_h_size=6, delta_dim=3)


@pytest.fixture(scope="session")
def tiny_objective() -> MetaObjectiveConfig:
    return MetaObjectiveConfig(num_draws=2, samples_per_class=3)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray on 2 CPUs for one test module (tests that start their own skip it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray2():
    """A fresh local Ray on 2 CPUs for one test (sweeps; started after the test's other
    fixtures, so it inherits the environment they set)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # The machine is shared: Ray's memory monitor would kill our actors for memory that
    # other processes use (it looks at the whole node). The kernel's OOM killer stays.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (minutes each) first: with one process per core they then
    overlap the many short tests instead of running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_unconfigure(config):
    """Remove this xdist worker's temporary folder (Ray's session logs live there)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "_worker_tmp" in globals():
        import shutil

        shutil.rmtree(_worker_tmp, ignore_errors=True)
