"""The cluster files in cluster/: schema-valid for `ray up`, token authentication on, dashboard kept private."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.version import Version

REPOSITORY = Path(__file__).resolve().parents[2]
CLUSTER = REPOSITORY / "cluster"
LAUNCHER_FILES = ["local.yaml", "aws.yaml", "gcp.yaml"]
CLOUD_FILES = ["aws.yaml", "gcp.yaml"]
PROJECT_VERSION = re.search(r'^version = "([^"]+)"', (REPOSITORY / "pyproject.toml").read_text(), re.MULTILINE).group(1)
WHEEL = f"frozen_tune-{PROJECT_VERSION}-py3-none-any.whl"
# Ports that must never be opened to addresses outside the cluster: GCS, dashboard and Jobs API, Ray Client.
PRIVATE_PORTS = {6379, 8265, 10001}
# The oldest Ray with token authentication.
MIN_TOKEN_AUTH_RAY = Version("2.52.0")


def launcher_file(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def kuberay_documents() -> list[dict]:
    return [document for document in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if document]


def ray_cluster() -> dict:
    clusters = [document for document in kuberay_documents() if document.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    return clusters[0]


def start_commands(config: dict) -> list[str]:
    return [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_matches_ray_schema(name):
    schema = ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)

    errors = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(launcher_file(name))]

    assert errors == []


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_passes_ray_up_checks(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # `ray up` fills in the provider's defaults, then validates; both steps must accept the file.
    prepared = prepare_config(copy.deepcopy(launcher_file(name)))
    validate_config(prepared)

    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_rejects_broken_file():
    schema = ray_schema()
    broken = launcher_file("aws.yaml")
    broken["available_node_types"]["cpu_worker"]["min_workers"] = "zero"
    del broken["provider"]["type"]

    errors = list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))

    assert len(errors) == 2


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_token_auth_on_every_node(name):
    config = launcher_file(name)

    for command in start_commands(config):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_dashboard_listens_on_loopback(name):
    head_start = " ".join(launcher_file(name)["head_start_ray_commands"])

    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_aws_security_group_keeps_ray_ports_closed():
    rules = launcher_file("aws.yaml")["provider"]["security_group"]["IpPermissions"]

    for rule in rules:
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        assert not ports & PRIVATE_PORTS, rule


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cpu_and_gpu_workers_autoscale_from_zero(name):
    node_types = launcher_file(name)["available_node_types"]
    workers = {key: value for key, value in node_types.items() if key != launcher_file(name)["head_node_type"]}

    assert set(workers) == {"cpu_worker", "gpu_worker"}
    for worker in workers.values():
        assert worker["min_workers"] == 0
        assert worker["max_workers"] >= 1
    gpu_config = workers["gpu_worker"]["node_config"]
    assert gpu_config.get("InstanceType", "").startswith(("g4dn", "g5", "g6", "p3", "p4")) or gpu_config.get("guestAccelerators")
    assert "gpu" in workers["gpu_worker"]["docker"]["worker_image"]


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_workers_are_spot(name):
    node_types = launcher_file(name)["available_node_types"]

    for worker in ("cpu_worker", "gpu_worker"):
        node_config = node_types[worker]["node_config"]
        spot = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"
        assert spot, worker


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_project_installed_at_pinned_version(name):
    config = launcher_file(name)
    commands = [*config.get("setup_commands", [])]
    for node_type in config.get("available_node_types", {}).values():
        commands += node_type.get("worker_setup_commands", [])

    assert config["file_mounts"][f"~/{WHEEL}"] == f"dist/{WHEEL}"
    assert commands
    assert all(WHEEL in command for command in commands if "pip install" in command)
    assert any("pip install" in command for command in commands)


def test_one_ray_version_everywhere():
    text = "\n".join((CLUSTER / name).read_text() for name in [*LAUNCHER_FILES, "kuberay.yaml", "Dockerfile"])
    versions = set(re.findall(r"ray(?:\[[a-z,]+\])?==([0-9.]+)", text)) | set(re.findall(r"rayproject/ray:([0-9.]+)-", text))
    versions.add(ray_cluster()["spec"]["rayVersion"])

    assert len(versions) == 1, versions
    assert Version(versions.pop()) >= MIN_TOKEN_AUTH_RAY


def test_dockerfile_installs_pinned_wheel():
    dockerfile = (CLUSTER / "Dockerfile").read_text()

    assert f"COPY dist/{WHEEL} " in dockerfile
    assert f'pip install --no-cache-dir "/tmp/{WHEEL}' in dockerfile


def test_kuberay_has_required_fields():
    cluster = ray_cluster()
    spec = cluster["spec"]

    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    assert Version(spec["rayVersion"]) >= MIN_TOKEN_AUTH_RAY
    assert spec["authOptions"]["mode"] == "token"
    assert "rayStartParams" in spec["headGroupSpec"]
    head_containers = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert head_containers[0]["name"] and head_containers[0]["image"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert "rayStartParams" in group
        assert group["minReplicas"] == 0
        assert group["maxReplicas"] >= 1
        for container in group["template"]["spec"]["containers"]:
            assert container["name"] and container["image"]


def test_kuberay_cpu_and_gpu_groups():
    groups = {group["groupName"]: group for group in ray_cluster()["spec"]["workerGroupSpecs"]}
    gpu_limits = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu_limits = groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]

    assert set(groups) == {"cpu-workers", "gpu-workers"}
    assert gpu_limits["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu_limits
    assert ray_cluster()["spec"]["enableInTreeAutoscaling"] is True


def test_kuberay_dashboard_stays_inside_cluster():
    cluster = ray_cluster()
    kinds = {document["kind"] for document in kuberay_documents()}

    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not kinds & {"Ingress", "Service"}


def test_kuberay_images_pinned_to_project_version():
    spec = ray_cluster()["spec"]
    containers = [*spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        containers += group["template"]["spec"]["containers"]

    for container in containers:
        assert container["image"].split(":")[-1].startswith(PROJECT_VERSION), container["image"]
