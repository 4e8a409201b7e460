import json
import re
from pathlib import Path

import jsonschema
import ray
import yaml

from pipeline.resources import CLUSTER_MARKER, STAGE_RESOURCES

ROOT = Path(__file__).resolve().parents[2]


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load(), schema)


def test_node_types_carry_the_resources_the_job_requests():
    nodes = load()["available_node_types"]
    head = nodes[load()["head_node_type"]]["resources"]
    assert head.get(CLUSTER_MARKER) == 1 and head.get("CPU") == 0
    gpu = [n["resources"] for n in nodes.values() if n["resources"].get("GPU")]
    cpu = [n["resources"] for n in nodes.values() if STAGE_RESOURCES["refine"] in n["resources"]]
    assert gpu and all(r[STAGE_RESOURCES["stage1"]] == r["GPU"] for r in gpu)
    assert cpu and all(r[STAGE_RESOURCES["refine"]] == r["CPU"] for r in cpu)


def test_ray_is_pinned_to_the_projects_version_and_token_auth_stays_on():
    cfg = load()
    pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pin == ray.__version__
    assert any(f"=={pin}" in c for c in cfg["setup_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if " start " in c)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert any("auth_token" in k for k in cfg["file_mounts"])


def test_workers_can_reach_s3_and_nothing_is_open_to_the_internet():
    cfg = load()
    workers = [n for name, n in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all(n["node_config"].get("IamInstanceProfile") for n in workers)
    # the head launches workers with that profile, which takes iam:PassRole: Ray's default head role lacks it
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    assert "iam:PassRole" in (ROOT / "README.md").read_text() and f"`{head}`" in (ROOT / "README.md").read_text()
    rules = cfg["provider"]["security_group"]["IpPermissions"]
    ranges = [r["CidrIp"] for rule in rules for r in rule.get("IpRanges", [])]
    assert ranges and "0.0.0.0/0" not in ranges and all(rule["FromPort"] == rule["ToPort"] == 22 for rule in rules)


def test_torch_is_pinned_on_the_nodes_as_in_setup_sh():
    pins = re.search(r"pip install -q (torch==\S+ torchvision==\S+)\n", (ROOT / "setup.sh").read_text()).group(1)
    assert any(pins in c for c in load()["setup_commands"])
