"""cluster/gpu.yaml: valid for Ray's own launcher schema, secure by default, and described truly.

The setup commands that edit ~/.bashrc are run here, in a scratch $HOME, so the
tests see the environment a driver under `ray submit` gets; nothing else runs
(no network, no Ray start).
"""

import copy
import fnmatch
import ipaddress
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import botocore.session
import jsonschema
import pytest
import ray.autoscaler
import yaml
from botocore.validate import ParamValidator
from ray.autoscaler._private.aws.config import (
    DEFAULT_RAY_INSTANCE_PROFILE,
    _configure_iam_role,
    _create_default_inbound_rules,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

from cgc_ray.results.table import COMMIT_ENV, code_version
from cgc_ray.runner.cluster import types_from_config

REPO = Path(__file__).resolve().parent.parent
CONFIG_PATH = REPO / "cluster" / "gpu.yaml"
WORKER_POLICY = REPO / "cluster" / "worker-policy.json"
HEAD_POLICY = REPO / "cluster" / "head-policy.json"
DOCS = REPO / "docs" / "CLUSTER.md"
RAY_PORTS = (6379, 8265, 10001)
VENV = "~/cgc-ray-venv"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
ENV_VARS = ("CGC_RAY_STORAGE", "CGC_RAY_DATA_ROOT")
DLAMI_PARAMETER = re.compile(r"/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/[\w.-]+/ami-id")


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG_PATH.read_text())


def _workers(config):
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_valid_against_ray_launcher_schema(config):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(config)  # merges Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    # Our explicit commands survive the merge with Ray's defaults (no nightly wheel).
    assert prepared["setup_commands"] == config["setup_commands"]
    assert prepared["head_node_type"] == "head.cpu"
    assert all("ImageId" in t["node_config"] for t in prepared["available_node_types"].values())


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
    assert f"RAY_AUTH_MODE=token {VENV}/bin/ray start --head" in head
    assert f"RAY_AUTH_MODE=token {VENV}/bin/ray start --address" in " ".join(config["worker_start_ray_commands"])
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


# --- (a) python, pip and ray come from the venv -------------------------------------------------

_PROGRAM = re.compile(r"(python[\d.]*|pip[\d.]*|ray)")
_OPERATORS = {";", "&&", "||", "|", "&", "(", ")", "{", "}"}
_REDIRECTS = {">", ">>", "<", "2>", "&>"}


def _simple_commands(line):
    """argv of each simple command of a shell line (split at ; && || |, redirection targets dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    argv, out, skip_next = [], [], False
    for tok in lexer:
        if skip_next:
            skip_next = False
        elif tok in _REDIRECTS:
            skip_next = True
        elif tok in _OPERATORS:
            out.append(argv)
            argv = []
        else:
            argv.append(tok)
    out.append(argv)
    return [a for a in out if a]


def _program(argv):
    """The program a simple command runs: past `sudo` and leading VAR=value assignments."""
    rest = list(argv)
    while rest and (rest[0] == "sudo" or re.fullmatch(r"[A-Za-z_]\w*=\S*", rest[0])):
        rest.pop(0)
    return rest


def _non_venv_python_pip_ray(config):
    bad = []
    for key in COMMAND_KEYS:
        for line in config.get(key) or []:
            for argv in _simple_commands(line):
                prog, *args = _program(argv) or [""]
                if not _PROGRAM.fullmatch(os.path.basename(prog)):
                    continue
                if prog.startswith(f"{VENV}/bin/"):
                    continue
                if prog == "python3" and args[:2] == ["-m", "venv"] and args[-1] == VENV:
                    continue  # the system python3 only creates the venv
                bad.append(f"{key}: {' '.join(argv)}")
    return bad


def test_python_pip_and_ray_run_from_the_venv(config):
    assert _non_venv_python_pip_ray(config) == []
    # The parser sees what it must: system tools, an env prefix, a command after `;`.
    fake = {"setup_commands": ["sudo pip install x", "ulimit -n 1; RAY_AUTH_MODE=token ray start --head",
                               "test -x a || python3 -m venv /elsewhere", "python3 -m pip install ray"]}
    assert len(_non_venv_python_pip_ray(fake)) == 4
    assert _simple_commands("a 'x; y' && b >> ~/.bashrc") == [["a", "x; y"], ["b"]]


# --- (a, e) ~/.bashrc: the venv's python and the cluster's defaults -----------------------------

def _bashrc_commands(config):
    cmds = [c for c in config["setup_commands"] if "~/.bashrc" in c]
    for c in cmds:  # runnable in a test: text tools only, no installs, no Ray
        programs = {_program(argv)[0] for argv in _simple_commands(c)}
        assert programs <= {"grep", "echo", "sed", "printf", "test"}, (c, programs)
    return cmds


def _fake_home(home):
    venv_bin = home / "cgc-ray-venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text('export VIRTUAL_ENV="$HOME/cgc-ray-venv"\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n')
    (venv_bin / "python").write_text("#!/bin/sh\n")
    (venv_bin / "python").chmod(0o755)
    (home / ".bashrc").write_text("# the image's own .bashrc\n")


def _run(cmds, home):
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    for c in cmds:
        subprocess.run(["bash", "-c", c], env=env, check=True, capture_output=True, timeout=10)
    shown = subprocess.run(["bash", "-c", "source ~/.bashrc; command -v python; echo ---; env"],
                           env=env, check=True, capture_output=True, text=True, timeout=10).stdout
    python, _, env_text = shown.partition("---\n")
    return python.strip(), dict(line.split("=", 1) for line in env_text.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def node_env(config, tmp_path_factory):
    """(home, `python` a driver gets, its environment) after the ~/.bashrc setup ran twice (two `ray up`s)."""
    home = tmp_path_factory.mktemp("home")
    _fake_home(home)
    cmds = _bashrc_commands(config)
    _run(cmds, home)
    python, env = _run(cmds, home)
    return home, python, env


def test_bashrc_activates_the_venv(node_env):
    home, python, env = node_env
    assert python == f"{home}/cgc-ray-venv/bin/python"  # `ray submit` runs `python script.py`
    assert env["VIRTUAL_ENV"] == f"{home}/cgc-ray-venv"
    assert env["RAY_AUTH_MODE"] == "token"


def test_bashrc_lines_written_once_and_rewritten_with_new_values(config, node_env, tmp_path):
    home, _, env = node_env
    text = (home / ".bashrc").read_text()
    assert text.count(f"source {VENV}/bin/activate") == 1
    for var in ("RAY_AUTH_MODE", *ENV_VARS):
        assert len(re.findall(rf"^export {var}=", text, flags=re.M)) == 1, (var, text)
    # An edited value (a second `ray up` after changing gpu.yaml) replaces the first one.
    _fake_home(tmp_path)
    cmds = _bashrc_commands(config)
    _run(cmds, tmp_path)
    edited = [c.replace(f"CGC_RAY_DATA_ROOT={env['CGC_RAY_DATA_ROOT']}", "CGC_RAY_DATA_ROOT=/elsewhere") for c in cmds]
    assert edited != cmds
    _, env2 = _run(edited, tmp_path)
    assert env2["CGC_RAY_DATA_ROOT"] == "/elsewhere"
    assert (tmp_path / ".bashrc").read_text().count("export CGC_RAY_DATA_ROOT=") == 1


def test_cluster_defaults_exported(config, node_env):
    home, _, env = node_env
    assert re.fullmatch(r"s3://[^/]+/\S+", env["CGC_RAY_STORAGE"]), env["CGC_RAY_STORAGE"]
    assert re.fullmatch(r"s3://[^/]+/\S+", env["CGC_RAY_DATA_ROOT"]), env["CGC_RAY_DATA_ROOT"]  # staged per node
    assert "CGC_RAY_GIT_DIR" not in env and COMMIT_ENV not in env  # the commit comes with each submit


def _rsync_excluded(pattern, path):
    """Whether rsync excludes ``path`` (relative to the transfer root) for the exclude ``pattern``.

    rsync(1): a leading "/" anchors at the transfer root; a pattern with "/" or
    "**" matches the end of the full path, otherwise the last component; "*"
    stops at "/", "**" does not. A leading "**/" also matches no directory
    (rsync 3.2: "**/.git" excludes a top-level .git).
    """
    anchored, pat = pattern.startswith("/"), pattern.strip("/")
    rx = "(?:.*/)?" + _glob(pat[3:]) if pat.startswith("**/") else _glob(pat)
    if anchored:
        return re.fullmatch(rx, path) is not None
    if "/" in pat or "**" in pat:
        return re.fullmatch(r"(?:.*/)?" + rx, path) is not None
    return re.fullmatch(rx, path.rsplit("/", 1)[-1]) is not None


def _glob(pat):
    parts = re.split(r"(\*\*|\*|\?)", pat)
    return "".join({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(p, re.escape(p)) for p in parts)


def test_no_git_folder_reaches_the_nodes(config):
    """.git holds ``config`` (credential helpers, tokens in remote URLs) and hooks (code): no node gets it."""
    for remote, local in config["file_mounts"].items():
        assert ".git" not in Path(local).parts and ".git" not in Path(remote.removeprefix("~/")).name, (remote, local)
    excludes = config["rsync_exclude"]
    assert any(_rsync_excluded(p, ".git") for p in excludes)  # the "." mount leaves it out, at any depth
    assert any(_rsync_excluded(p, "vendor/lib/.git") for p in excludes)
    # the matcher agrees with rsync where it matters
    assert _rsync_excluded("**/.git", "sub/.git") and not _rsync_excluded("**/.git", "refs/heads/main")
    assert _rsync_excluded("results", "refs/heads/results") and not _rsync_excluded("/results", "refs/heads/results")
    assert not any("CGC_RAY_GIT_DIR=" in c and "echo" in c for c in config["setup_commands"])


def test_the_documented_run_command_records_the_local_commit(monkeypatch):
    """The docs' command reads the commit on the operator's machine; the driver records it from the env."""
    line = re.search(r'^ray exec cluster/gpu\.yaml (".*CGC_RAY_COMMIT=.*")$', DOCS.read_text(encoding="utf-8"),
                     flags=re.M)[1]
    shown = subprocess.run(["bash", "-c", f"printf '%s' {line}"], cwd=REPO, check=True, capture_output=True,
                           text=True, timeout=10).stdout  # what `ray exec` receives, after the local shell
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True, text=True,
                          timeout=10).stdout.strip()
    assignment, program, script = shown.split()
    assert assignment == f"{COMMIT_ENV}={head}" and program == "python"
    assert (REPO / script.removeprefix("~/cgc-ray/")).is_file(), script
    monkeypatch.setenv(COMMIT_ENV, head)
    assert code_version().endswith(f"+g{head[:12]}")
    monkeypatch.setenv(COMMIT_ENV, "main (dirty)")
    with pytest.raises(ValueError, match="CGC_RAY_COMMIT=.* is not a commit id"):
        code_version()


# --- IMDSv2 ---------------------------------------------------------------------------------------

def test_every_node_requires_imdsv2(config):
    prepared = prepare_config(config)
    for name, t in prepared["available_node_types"].items():
        options = t["node_config"].get("MetadataOptions", {})
        assert options.get("HttpTokens") == "required", (name, options)
        assert options.get("HttpEndpoint", "enabled") == "enabled", (name, options)  # Ray and pyarrow need it


# --- (c) least privilege: the workers' role and the head's ---------------------------------------

def _statements(path):
    doc = json.loads(path.read_text())
    assert doc["Version"] == "2012-10-17"
    for s in doc["Statement"]:
        assert s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s, s
        yield s, _as_list(s["Action"]), _as_list(s["Resource"])


def _as_list(v):
    return v if isinstance(v, list) else [v]


def _storage(node_env, var="CGC_RAY_STORAGE"):
    bucket, prefix = re.fullmatch(r"s3://([^/]+)/(.+?)/?", node_env[2][var]).groups()
    return bucket, prefix


def _on_data_prefix(s, resources, bucket, prefix):
    """Whether a statement is about the data prefix (CGC_RAY_DATA_ROOT) rather than the results prefix."""
    listed = _as_list(s.get("Condition", {}).get("StringLike", {}).get("s3:prefix", []))
    return any(r.startswith(f"arn:aws:s3:::{bucket}/{prefix}") for r in resources) or prefix in listed


def _check_s3_read_only_on_the_data_prefix(s, actions, resources, bucket, prefix):
    """The data prefix: read and list it, nothing else (a node never writes the datasets)."""
    assert set(actions) <= {"s3:GetObject", "s3:ListBucket"}, actions
    if actions == ["s3:ListBucket"]:
        assert resources == [f"arn:aws:s3:::{bucket}"]
        assert _as_list(s["Condition"]["StringLike"]["s3:prefix"]) == [prefix, f"{prefix}/*"], s
    else:  # the key itself too: pyarrow's "does this folder exist" is a HEAD of it
        assert resources == [f"arn:aws:s3:::{bucket}/{prefix}", f"arn:aws:s3:::{bucket}/{prefix}/*"], resources


def _allows(policy, action, resource, listed_prefix=None):
    """Whether ``policy`` grants ``action`` on ``resource`` (IAM's glob match; ``s3:prefix`` StringLike)."""
    for s, actions, resources in _statements(policy):
        if action not in actions or not any(fnmatch.fnmatchcase(resource, r) for r in resources):
            continue
        allowed = s.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if allowed is None or any(fnmatch.fnmatchcase(listed_prefix or "", p) for p in _as_list(allowed)):
            return True
    return False


@pytest.mark.parametrize("policy", [WORKER_POLICY, HEAD_POLICY], ids=["worker", "head"])
def test_the_data_root_can_be_staged_by_the_workers_and_checked_by_the_head(node_env, policy):
    """CGC_RAY_DATA_ROOT's prefix: an archive under it can be read (HeadObject needs s3:GetObject), a
    dataset folder under it listed; results and other prefixes are not readable through these grants."""
    bucket, prefix = _storage(node_env, "CGC_RAY_DATA_ROOT")
    assert _allows(policy, "s3:GetObject", f"arn:aws:s3:::{bucket}/{prefix}/imagenet.tar.zst")
    assert _allows(policy, "s3:GetObject", f"arn:aws:s3:::{bucket}/{prefix}")  # the root's HEAD, as pyarrow asks
    assert _allows(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}", f"{prefix}/CUB_200_2011/")
    assert not _allows(policy, "s3:PutObject", f"arn:aws:s3:::{bucket}/{prefix}/imagenet.tar.zst")
    assert not _allows(policy, "s3:GetObject", f"arn:aws:s3:::{bucket}/elsewhere/x")
    assert not _allows(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}", "elsewhere/")


def _profiles(config):
    """(the head's instance profile ARN, the set of the workers')."""
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    return head["IamInstanceProfile"]["Arn"], {t["node_config"]["IamInstanceProfile"]["Arn"]
                                               for t in _workers(config).values()}


def _role_of(profile_arn):
    """The role a profile of ours holds: the same name (docs/CLUSTER.md creates them so)."""
    account, name = re.fullmatch(r"arn:aws:iam::(\w+):instance-profile/([\w+=,.@-]+)", profile_arn).groups()
    return f"arn:aws:iam::{account}:role/{name}"


def test_head_and_workers_each_get_their_own_profile_not_the_autoscalers(config):
    head, workers = _profiles(config)
    assert len(workers) == 1, workers
    (worker,) = workers
    assert head != worker
    for arn in (head, worker):
        assert re.fullmatch(r"arn:aws:iam::\w+:instance-profile/[\w+=,.@-]+", arn), arn
        assert not arn.endswith(f"/{DEFAULT_RAY_INSTANCE_PROFILE}")
    # `ray up` then creates and uses no ray-autoscaler-v1: Ray returns before any IAM call
    prepared = prepare_config(config)
    assert _configure_iam_role(prepared) is prepared
    assert "IamInstanceProfile" not in prepared.get("head_node", {})


def _check_s3_on_the_results_prefix(s, actions, resources, bucket, prefix):
    write = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions  # no s3:*
    assert "*" not in resources
    for r in resources:
        assert r.startswith(f"arn:aws:s3:::{bucket}"), r
        if write & set(actions):
            assert r == f"arn:aws:s3:::{bucket}/{prefix}/*", r
        if "s3:ListBucket" in actions:  # listing the bucket only under the prefix
            assert r == f"arn:aws:s3:::{bucket}"
            allowed = s["Condition"]["StringLike"]["s3:prefix"]
            assert all(p == prefix or p.startswith(f"{prefix}/") for p in _as_list(allowed)), allowed
        else:
            assert r in (f"arn:aws:s3:::{bucket}/{prefix}", f"arn:aws:s3:::{bucket}/{prefix}/*"), r


S3_GRANTS = {"s3:GetObject", "s3:ListBucket", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}


def test_worker_policy_is_s3_on_the_results_prefix_only(node_env):
    bucket, prefix = _storage(node_env)
    data = _storage(node_env, "CGC_RAY_DATA_ROOT")
    granted = set()
    for s, actions, resources in _statements(WORKER_POLICY):
        if _on_data_prefix(s, resources, *data):
            _check_s3_read_only_on_the_data_prefix(s, actions, resources, *data)
        else:
            _check_s3_on_the_results_prefix(s, actions, resources, bucket, prefix)  # no ec2:, iam:
        granted |= set(actions)
    assert granted == S3_GRANTS


def test_head_policy_acts_on_this_clusters_nodes_and_results_only(config, node_env):
    """No wildcard action; ``*`` only for EC2's describe calls (they take no resource); launch, tag and
    terminate only instances tagged with this cluster's name, launch only with the worker profile; pass
    only the worker role; S3 on the results prefix, and read-only on the data prefix."""
    bucket, prefix = _storage(node_env)
    data = _storage(node_env, "CGC_RAY_DATA_ROOT")
    region, cluster = config["provider"]["region"], config["cluster_name"]
    head, (worker,) = _profiles(config)
    account = re.fullmatch(r"arn:aws:iam::(\w+):.*", worker)[1]
    instances = f"arn:aws:ec2:{region}:{account}:instance/*"
    ours = {f"aws:RequestTag/{TAG_RAY_CLUSTER_NAME}": cluster}
    granted = set()
    for s, actions, resources in _statements(HEAD_POLICY):
        assert all("*" not in a for a in actions), actions
        granted |= set(actions)
        cond = s.get("Condition", {})
        if "*" in resources:
            assert resources == ["*"] and all(a.startswith("ec2:Describe") for a in actions), s
        elif actions[0].startswith("s3:") and _on_data_prefix(s, resources, *data):
            _check_s3_read_only_on_the_data_prefix(s, actions, resources, *data)
        elif actions[0].startswith("s3:"):
            _check_s3_on_the_results_prefix(s, actions, resources, bucket, prefix)
        elif actions == ["iam:PassRole"]:
            assert resources == [_role_of(worker)] != [_role_of(head)]
            assert cond == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
        elif actions == ["ec2:TerminateInstances"]:
            assert resources == [instances]
            assert cond == {"StringEquals": {f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster}}
        elif actions == ["ec2:CreateTags"]:
            assert resources == [instances]
            assert cond in ({"StringEquals": {"ec2:CreateAction": "RunInstances", **ours}},
                            {"StringEquals": {f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster},
                             "ForAllValues:StringNotEquals": {"aws:TagKeys": [TAG_RAY_CLUSTER_NAME]}}), cond
        elif actions == ["ec2:RunInstances"] and instances in resources:
            assert resources == [instances]
            assert cond == {"StringEquals": ours, "ArnEquals": {"ec2:InstanceProfile": worker}}
        elif actions == ["ec2:RunInstances"]:  # what a launch uses besides the instance: never an instance
            kinds = {re.fullmatch(rf"arn:aws:ec2:{region}:(?:{account})?:([a-z-]+)/\*", r)[1] for r in resources}
            assert kinds <= {"image", "key-pair", "network-interface", "security-group", "spot-instances-request",
                             "subnet", "volume"}, kinds
        else:
            assert actions == ["ssm:GetParameters"], s
    assert granted >= {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
                       "iam:PassRole"} | S3_GRANTS


def test_head_may_launch_workers_with_their_role_and_image(config):
    """The autoscaler on the head passes the worker role and resolves the image parameter."""
    _, (worker,) = _profiles(config)
    image = config["available_node_types"][config["head_node_type"]]["node_config"]["ImageId"]
    needed = {("iam:PassRole", _role_of(worker))}
    if image.startswith("resolve:ssm:"):
        region = config["provider"]["region"]
        needed.add(("ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{image[len('resolve:ssm:'):]}"))
    granted = {(a, r) for _, actions, resources in _statements(HEAD_POLICY) for a in actions for r in resources}
    assert needed <= granted
    assert {(a, r) for a, r in granted if a.startswith(("iam:", "ssm:"))} == needed


# --- (d) one current GPU image on every node type ------------------------------------------------

def test_every_node_type_has_the_same_dlami(config):
    images = {name: t["node_config"].get("ImageId") for name, t in config["available_node_types"].items()}
    assert None not in images.values(), images  # else Ray picks its default: a CUDA 11.2 Ubuntu 18.04 DLAMI
    assert len(set(images.values())) == 1, images  # one python3 builds every node's venv
    (image,) = set(images.values())
    ssm = image.removeprefix("resolve:ssm:")
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image) or (image != ssm and DLAMI_PARAMETER.fullmatch(ssm)), image


# --- (f) docs/CLUSTER.md describes this file -----------------------------------------------------

def _docs_table():
    rows = re.findall(r"^\| `([\w.]+)` \| `([\w.]+)` \| (\d+) \| (\d+) \| (\d+) \|", DOCS.read_text(encoding="utf-8"), flags=re.M)
    return {name: (instance, int(gpus), int(cpus), int(most)) for name, instance, gpus, cpus, most in rows}


def test_docs_node_table_matches_the_yaml(config):
    expected = {}
    for name, t in config["available_node_types"].items():
        most = 1 if name == config["head_node_type"] else t["max_workers"]
        res = t["resources"]
        expected[name] = (t["node_config"]["InstanceType"], res.get("GPU", 0), res.get("CPU", 0), most)
    assert _docs_table() == expected


def test_docs_gpu_counts_instances_and_commands_match_the_yaml(config):
    text = DOCS.read_text(encoding="utf-8")
    types = config["available_node_types"].values()
    gpus = {t["resources"].get("GPU", 0) for t in types}
    instances = {t["node_config"]["InstanceType"] for t in types}
    assert {int(n) for n in re.findall(r"\b(\d+)-GPU\b", text)} <= gpus
    ddp = {int(n) for n in re.findall(r"scaling\.num_workers=(\d+)", text)}
    assert ddp and ddp <= {g for g in gpus if g > 1}  # one DDP trial fills one multi-GPU node
    assert set(re.findall(r"\b[a-z]+\d+[a-z]*\.\d*x?large\b", text)) <= instances
    assert set(re.findall(r"\b(?:CGC|RAY)_[A-Z_]+\b", text)) >= {"RAY_AUTH_MODE", COMMIT_ENV, *ENV_VARS}
    # The plain run takes no arguments but the commit; every script the docs name exists.
    assert re.search(r'^ray exec cluster/gpu\.yaml "CGC_RAY_COMMIT=\$\(git rev-parse HEAD\) '
                     r'python ~/cgc-ray/experiments/\w+\.py"$', text, flags=re.M)
    for script in re.findall(r"experiments/\w+\.py", text):
        assert (REPO / script).is_file(), script


# --- spot twins of the GPU types (off by default) -------------------------------------------------

SPOT = {"MarketType": "spot"}


def _spot_twins(config):
    """{spot type: its on-demand twin} for every worker type whose node_config asks for spot."""
    workers = _workers(config)
    spot = [n for n, t in workers.items() if "InstanceMarketOptions" in t["node_config"]]
    return {n: workers.get(n.removesuffix(".spot")) for n in spot}


def test_every_gpu_type_has_a_spot_twin_with_the_same_resources(config):
    twins = _spot_twins(config)
    on_demand = {n for n, t in _workers(config).items() if n not in twins and t["resources"].get("GPU", 0) > 0}
    assert {f"{n}.spot" for n in on_demand} == set(twins), twins
    for name, base in twins.items():
        spot = config["available_node_types"][name]
        assert spot["node_config"]["InstanceMarketOptions"] == SPOT, name
        assert spot["resources"] == base["resources"], name  # trials fit either twin alike
        launch = {k: v for k, v in spot["node_config"].items() if k != "InstanceMarketOptions"}
        assert launch == base["node_config"], name  # same instance, image, role, IMDSv2, disk
        assert (spot["min_workers"], spot["max_workers"]) == (0, 0), f"{name} must be off by default"


def test_spot_node_configs_are_valid_run_instances_requests(config):
    """Ray passes node_config to EC2's RunInstances as it is: botocore's own model of that call accepts it."""
    run = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    market_types = run.members["InstanceMarketOptions"].members["MarketType"].enum
    for name in _spot_twins(config):
        conf = dict(config["available_node_types"][name]["node_config"], MinCount=1, MaxCount=1)
        report = ParamValidator().validate(conf, run)
        assert not report.has_errors(), (name, report.generate_report())
        assert conf["InstanceMarketOptions"]["MarketType"] in market_types  # botocore leaves enums to EC2
    typo = dict(conf, InstanceMarketOptions={"MarketTyp": "spot"})
    assert ParamValidator().validate(typo, run).has_errors()


def test_spot_turned_on_is_a_valid_cluster_the_driver_sees(config):
    """The documented switch (spot max_workers = the twin's, the twin's = 0) passes Ray's checks, and the
    driver then counts the spot types' GPUs where it counted the on-demand ones'."""
    on = copy.deepcopy(config)
    for name, base in _spot_twins(config).items():
        on["available_node_types"][name]["max_workers"] = base["max_workers"]
        on["available_node_types"][name.removesuffix(".spot")]["max_workers"] = 0
    validate_config(prepare_config(on))

    def gpus(types, spot):
        return sum(t.resources.get("GPU", 0) * t.max_workers for n, t in types.items() if n.endswith(".spot") == spot)

    before, after = types_from_config(config), types_from_config(on)
    assert gpus(before, spot=True) == 0 and gpus(after, spot=False) == 0
    assert gpus(after, spot=True) == gpus(before, spot=False) > 0


def test_head_may_launch_spot_workers():
    """RunInstances with InstanceMarketOptions also authorizes a spot-instances-request resource."""
    granted = {r for _, actions, resources in _statements(HEAD_POLICY) if actions == ["ec2:RunInstances"]
               for r in resources}
    assert any(re.fullmatch(r"arn:aws:ec2:[\w-]+:\w+:spot-instances-request/\*", r) for r in granted), granted
