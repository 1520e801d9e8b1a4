"""cluster/gpu.yaml: valid for Ray's own launcher schema, and secure by default."""

import ipaddress
import json
import re
from pathlib import Path

import pytest
import yaml

CONFIG_PATH = Path(__file__).resolve().parent.parent / "cluster" / "gpu.yaml"
RAY_PORTS = (6379, 8265, 10001)


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG_PATH.read_text())


def test_valid_against_ray_launcher_schema(config):
    jsonschema = pytest.importorskip("jsonschema")
    autoscaler = pytest.importorskip("ray.autoscaler")
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(config)  # merges Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    # Our explicit commands survive the merge with Ray's defaults (no nightly wheel).
    assert prepared["setup_commands"] == config["setup_commands"]
    assert prepared["head_node_type"] == "head.cpu"


def _is_world(cidr):
    """0.0.0.0/0 or ::/0 (placeholders such as REPLACE_WITH_YOUR_CIDR are not)."""
    try:
        return ipaddress.ip_network(cidr, strict=False).prefixlen == 0
    except ValueError:
        return False


def _opens_port_to_world(rule, port):
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    covers = str(rule.get("IpProtocol")) == "-1" or lo == -1 or lo <= port <= hi
    ranges = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
    return covers and any(_is_world(c) for c in ranges)


def test_no_ray_port_open_to_the_internet(config):
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert rules, "expected an explicit SSH rule"
    for rule in rules:
        for port in RAY_PORTS:
            assert not _opens_port_to_world(rule, port), (port, rule)
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
        assert not any(_is_world(r["CidrIp"]) for r in rule["IpRanges"])


def test_ray_default_rules_plus_ours_keep_ray_ports_private(config):
    """Ray adds an intra-cluster rule and SSH; together with ours, no Ray port faces the world."""
    pytest.importorskip("boto3")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    rules = _create_default_inbound_rules({"sg-self"}, config["provider"]["security_group"]["IpPermissions"])
    for rule in rules:
        for port in RAY_PORTS:
            assert not _opens_port_to_world(rule, port), (port, rule)


def test_rule_checker_detects_open_ports():
    assert _opens_port_to_world({"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 7000,
                                 "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, 6379)
    assert _opens_port_to_world({"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}, 8265)
    assert not _opens_port_to_world({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                     "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, 10001)
    assert not _opens_port_to_world({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}, 6379)


def test_dashboard_local_and_token_auth_on(config):
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token ray start --head" in head
    assert "RAY_AUTH_MODE=token ray start --address" in " ".join(config["worker_start_ray_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])  # drivers from `ray submit`


def test_setup_installs_this_project_and_pinned_ray(config):
    cmds = config["setup_commands"]
    assert config["file_mounts"]["~/cgc-ray"] == "."
    assert any(re.search(r"pip install -e ~/cgc-ray$", c) for c in cmds)
    assert any(re.search(r'"ray\[[a-z,]+\]==\d+\.\d+\.\d+"', c) for c in cmds)
    assert not any(s in c for c in cmds for s in ("ray-wheels", "dev0", "nightly"))
    for key in ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, f"{key} must be explicit so Ray's defaults are not used"


def test_node_types(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpus = sorted(t["resources"].get("GPU", 0) for name, t in types.items() if name != config["head_node_type"])
    assert gpus[0] == 1 and gpus[-1] > 1  # packed single-GPU type and a multi-GPU DDP type
