"""Every cluster config validates offline: `ray up` configs against Ray's own schema,
the KubeRay manifest against the structure the operator requires."""

import glob
import os

import pytest
import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..")
RAY_UP_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "clusters", "*.yaml")))
KUBERAY = os.path.join(ROOT, "clusters", "kubernetes", "raycluster.yaml")


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def test_there_are_configs_for_every_target():
    names = {os.path.basename(p) for p in RAY_UP_CONFIGS}
    assert {"aws.yaml", "gcp.yaml", "local-fake.yaml"} <= names
    assert os.path.exists(os.path.join(ROOT, "clusters", "kubernetes", "raycluster.yaml"))


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=os.path.basename)
def test_ray_up_config_validates_against_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(path)
    if config["provider"]["type"] == "fake_multinode":
        # Ray's wheel lacks this provider's defaults file, so prepare_config cannot fill
        # defaults; the config is complete on its own and validates as written.
        validate_config(config)
    else:
        validate_config(prepare_config(config))
    # Project setup: every node gets this checkout and installs it.
    if config["provider"]["type"] != "fake_multinode":
        assert config["file_mounts"].get("~/metalearn") == "."
        assert any("pip install" in c and "metalearn" in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_configs_reach_the_papers_scale(name):
    config = _load(os.path.join(ROOT, "clusters", name))
    types = config["available_node_types"]
    cpu = types["cpu_worker"]
    assert cpu["max_workers"] * cpu["resources"]["CPU"] >= 512
    assert types["gpu_worker"]["resources"]["GPU"] >= 1


def _images() -> list[tuple[str, str]]:
    """(file, image) for every container image the cluster files name."""
    import re

    found = []
    for path in RAY_UP_CONFIGS + [KUBERAY, os.path.join(ROOT, "clusters", "kubernetes",
                                                        "Dockerfile")]:
        text = open(path).read()
        found += [(os.path.basename(path), m) for m in
                  re.findall(r"(?:image|_image|FROM)[:\s]+(rayproject/ray:\S+)", text)]
    return found


def test_every_image_is_rays_own_with_python_3_11_and_this_ray():
    import re

    import ray

    images = _images()
    assert {f for f, _ in images} >= {"aws.yaml", "gcp.yaml", "Dockerfile"}
    for path, image in images:
        version, python = re.match(r"rayproject/ray:([\d.]+)-py3(\d+)", image).groups()
        assert int(python) >= 11, f"{path}: {image} has Python 3.{python} (3.11+ needed)"
        assert version == ray.__version__, f"{path}: {image} is not Ray {ray.__version__}"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_gpu_nodes_run_the_gpu_image(name):
    config = _load(os.path.join(ROOT, "clusters", name))
    assert config["docker"]["image"].endswith("-cpu")
    assert config["available_node_types"]["gpu_worker"]["docker"]["worker_image"].endswith(
        "-gpu")


def test_a_typo_is_caught_by_the_schema():
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import validate_config

    config = _load(os.path.join(ROOT, "clusters", "local-fake.yaml"))
    config["available_node_types"]["ray.worker.cpu"]["min_wrkers"] = 1
    with pytest.raises(ValidationError, match="min_wrkers"):
        validate_config(config)


def test_kuberay_manifest_structure():
    import ray

    manifest = _load(os.path.join(ROOT, "clusters", "kubernetes", "raycluster.yaml"))
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    spec = manifest["spec"]
    assert spec["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g)
                                                  for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        containers = group["template"]["spec"]["containers"]
        assert len(containers) == 1, name
        limits = containers[0]["resources"]["limits"]
        # Ray must advertise exactly the CPUs (and GPUs) the pod is given.
        assert group["rayStartParams"]["num-cpus"] == str(limits["cpu"]), name
        if "num-gpus" in group["rayStartParams"]:
            assert group["rayStartParams"]["num-gpus"] == str(limits["nvidia.com/gpu"]), name
    cpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu-workers")
    assert cpu["maxReplicas"] * int(cpu["rayStartParams"]["num-cpus"]) >= 512
    assert cpu["minReplicas"] <= cpu["replicas"] <= cpu["maxReplicas"]


def test_the_rayjob_runs_a_valid_command_on_the_raycluster_into_its_runs_volume():
    import shlex

    from metalearn.cli import build_parser

    cluster = _load(KUBERAY)
    job = _load(os.path.join(ROOT, "clusters", "kubernetes", "rayjob.yaml"))
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "metalearn"
    args = build_parser(argv[1:]).parse_args(argv[1:])  # exits on a flag metalearn lacks
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    runs = [m["mountPath"] for m in head["volumeMounts"] if m["name"] == "runs"]
    assert runs and args.out.startswith(runs[0] + "/")


@pytest.mark.parametrize("path", RAY_UP_CONFIGS + [KUBERAY], ids=os.path.basename)
def test_the_dashboard_is_not_bound_to_every_interface(path):
    # Ray's dashboard runs jobs for whoever reaches it: users reach it through
    # `ray dashboard CLUSTER.yaml` or a port forward (clusters/README.md).
    with open(path) as f:
        text = f.read()
    assert "0.0.0.0" not in text
