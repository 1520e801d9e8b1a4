"""cluster/rayjob.yaml and cluster/Dockerfile: valid for KubeRay's published schema, and the Kubernetes
twin of cluster/gpu.yaml (the same Ray, node resources, variables and scripts).

No Kubernetes and no Docker here. The manifest is validated against KubeRay's RayJob CRD, vendored in
tests/fixtures/kuberay/, the way the API server would: its OpenAPI schema as JSON Schema, plus a strict
pass, because the API server silently prunes a field the schema does not know (a typo'd field is no
error, just ignored). The Dockerfile is read statically.
"""

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from cgc_ray.config.paths import ENV_STORAGE, storage_location
from cgc_ray.data.registry import ENV_CACHE_DIR
from cgc_ray.results.table import COMMIT_ENV

REPO = Path(__file__).resolve().parent.parent
RAYJOB = REPO / "cluster" / "rayjob.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
GPU_YAML = REPO / "cluster" / "gpu.yaml"
FIXTURES = REPO / "tests" / "fixtures" / "kuberay"
CRD = FIXTURES / "ray.io_rayjobs.yaml"
DOCS = REPO / "docs" / "CLUSTER.md"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.4 MB: C parser when there is one


# --- the CRD's schema as JSON Schema ---------------------------------------------------------------

def _json_schema(node, strict):
    """A CRD's structural OpenAPI v3 schema as JSON Schema (Draft 4, which OpenAPI v3 follows).

    JSON Schema ignores the ``x-kubernetes-*`` keys, so they are read here: ``int-or-string`` is an
    integer or a string (controller-gen also writes the ``anyOf``; a hand-written CRD may not),
    ``nullable`` admits null, ``preserve-unknown-fields`` and ``embedded-resource`` keep an object open.
    ``strict``: an object that lists its properties admits no others; those are the fields the API
    server would prune without a word.
    """
    if isinstance(node, list):
        return [_json_schema(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v, strict) if k in ("properties", "items", "additionalProperties", "anyOf", "allOf",
                                                 "oneOf", "not") else v
           for k, v in node.items() if k != "properties"}
    if "properties" in node:
        out["properties"] = {name: _json_schema(sub, strict) for name, sub in node["properties"].items()}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    open_object = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource")
    if strict and "properties" in node and "additionalProperties" not in node and not open_object:
        out["additionalProperties"] = False
    return out


def _int_range(bits):
    return lambda v: not isinstance(v, int) or -(2 ** (bits - 1)) <= v < 2 ** (bits - 1)


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(_int_range(32))
FORMATS.checks("int64")(_int_range(64))


@pytest.fixture(scope="module")
def crd():
    return yaml.load(CRD.read_text(), Loader=LOADER)


@pytest.fixture(scope="module")
def raw_schema(crd):
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def validators(raw_schema):
    """(the CRD's own rules, the same with unknown fields as errors)."""
    return tuple(jsonschema.Draft4Validator(_json_schema(raw_schema, strict), format_checker=FORMATS)
                 for strict in (False, True))


@pytest.fixture(scope="module")
def job():
    return yaml.safe_load(RAYJOB.read_text())


@pytest.fixture(scope="module")
def gpu_config():
    return yaml.safe_load(GPU_YAML.read_text())


def _errors(validator, doc):
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_manifest_is_a_ray_io_v1_rayjob(job, crd, validators):
    published, strict = validators
    assert job["apiVersion"] == f"{crd['spec']['group']}/v1" and job["kind"] == crd["spec"]["names"]["kind"]
    assert _errors(published, job) == []
    assert _errors(strict, job) == []  # every field we set is one KubeRay reads: none is pruned


def _reached(instance, schema, path="$"):
    """(path, value, schema node) for every value in ``instance`` and the node of the schema that governs it."""
    yield path, instance, schema
    if isinstance(instance, dict):
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            sub = schema.get("properties", {}).get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from _reached(value, sub, f"{path}.{key}")
    elif isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            yield from _reached(value, schema["items"], f"{path}[{i}]")


def test_list_keys_unique_and_no_unchecked_rules(job, raw_schema):
    """What JSON Schema cannot say, the API server checks: list-map keys and set items are unique. CEL rules
    (``x-kubernetes-validations``) are not evaluated here, so the manifest must use no field carrying one."""
    for path, value, s in _reached(job, raw_schema):
        assert "x-kubernetes-validations" not in s, f"{path} has CEL rules this test does not check: {s}"
        if s.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in s["x-kubernetes-list-map-keys"]) for item in value]
            assert len(keys) == len(set(keys)), (path, keys)
        elif s.get("x-kubernetes-list-type") == "set":
            assert len(value) == len({yaml.safe_dump(v) for v in value}), (path, value)


def _broken(job, edit):
    doc = copy.deepcopy(job)
    edit(doc["spec"]["rayClusterSpec"])
    return doc


@pytest.mark.parametrize("edit, published_catches", [
    # a typo'd field: the published schema prunes it silently; only the strict pass catches it
    (lambda c: c.update(enableInTreeAutoscalling=True), False),
    (lambda c: c["workerGroupSpecs"][0].update(maxReplica=8), False),
    # what the published schema constrains: required fields, types, enums, quantities, int32
    (lambda c: c["workerGroupSpecs"][0].pop("groupName"), True),
    (lambda c: c["workerGroupSpecs"][0].update(maxReplicas="8"), True),
    (lambda c: c.update(enableInTreeAutoscaling="true"), True),
    (lambda c: c["authOptions"].update(mode="Token"), True),
    (lambda c: c["autoscalerOptions"].update(upscalingMode="Fast"), True),
    (lambda c: c["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        {"nvidia.com/gpu": "four"}), True),
    (lambda c: c["autoscalerOptions"].update(idleTimeoutSeconds=2 ** 31), True),
    (lambda c: c["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), True),
])
def test_validation_can_fail(job, validators, edit, published_catches):
    published, strict = validators
    doc = _broken(job, edit)
    assert bool(_errors(published, doc)) == published_catches
    assert _errors(strict, doc)


def test_duplicate_env_names_are_caught(job, raw_schema):
    doc = _broken(job, lambda c: c["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]))
    with pytest.raises(AssertionError, match="env"):
        test_list_keys_unique_and_no_unchecked_rules(doc, raw_schema)


def test_what_the_operator_checks_beyond_the_schema(job):
    """KubeRay v1.7.0's validation.go, for the fields we set: the name becomes the RayCluster's (a DNS-1035
    label, at most 47 characters), replicas bounds, token auth needs rayVersion >= 2.52.0, and a group's
    Ray resources come from rayStartParams or `resources`, not both."""
    name = job["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    cluster = job["spec"]["rayClusterSpec"]
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)
    for g in cluster["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", g["groupName"]), g["groupName"]  # a DNS-1123 label
        assert "resources" not in g, g["groupName"]
    assert len({g["groupName"] for g in cluster["workerGroupSpecs"]}) == len(cluster["workerGroupSpecs"])


# --- the Kubernetes twin of cluster/gpu.yaml --------------------------------------------------------

def _containers(job):
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        yield group.get("groupName", "head"), group, group["template"]["spec"]["containers"][0]


def _exports(gpu_config):
    """The ``export NAME=value`` lines gpu.yaml's setup_commands write into every node's ~/.bashrc."""
    return dict(re.findall(r"echo 'export (CGC_RAY_\w+)=(\S*)'", "\n".join(gpu_config["setup_commands"])))


def _ray_pin(text):
    return re.search(r'"ray\[([a-z,]+)\]==([\d.]+)"', text).groups()


def test_worker_groups_are_gpu_yamls_worker_types(job, gpu_config):
    """gpu1 / gpu4 / gpu1-spot / gpu4-spot are worker.gpu1 / ... / worker.gpu4.spot: the same Ray resources,
    the same bounds, the pod's GPU limit equal to its Ray GPUs; the head runs no trial."""
    types = gpu_config["available_node_types"]
    head = types[gpu_config["head_node_type"]]
    workers = {n: t for n, t in types.items() if n != gpu_config["head_node_type"]}
    cluster = job["spec"]["rayClusterSpec"]
    groups = {f"worker.{g['groupName'].replace('-', '.')}": g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == set(workers)
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert float(head_params["num-cpus"]) == head["resources"]["CPU"] == 0
    for name, g in groups.items():
        params, t = g["rayStartParams"], workers[name]
        assert {"CPU": float(params["num-cpus"]), "GPU": float(params["num-gpus"])} == t["resources"], name
        assert (g["minReplicas"], g["maxReplicas"]) == (t["min_workers"], t["max_workers"]), name
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == t["resources"]["GPU"], name
        assert float(g["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]) <= t["resources"]["CPU"]
    for name, _, container in _containers(job):
        if name == "head":
            assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    spot = {n for n, g in groups.items() if g["template"]["spec"].get("nodeSelector")}
    assert spot == {n for n, t in workers.items() if "InstanceMarketOptions" in t["node_config"]}


def test_autoscaler_and_lifecycle(job, gpu_config):
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == gpu_config["idle_timeout_minutes"] * 60
    assert cluster["authOptions"]["mode"] == "token"  # gpu.yaml's RAY_AUTH_MODE=token
    assert spec["shutdownAfterJobFinishes"] is True


def test_same_variables_image_and_ray_everywhere(job, gpu_config):
    exports = _exports(gpu_config)
    assert set(exports) >= {ENV_STORAGE, "CGC_RAY_DATA_ROOT"}
    images = set()
    for name, _, container in _containers(job):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert set(env) >= set(exports), name
        assert env[ENV_STORAGE] == exports[ENV_STORAGE], name  # the same results prefix as the EC2 cluster
        assert re.fullmatch(r"s3://[^/?]+/\S+", env["CGC_RAY_DATA_ROOT"]), (name, env)  # pods have no /data
        assert env[ENV_CACHE_DIR] in {m["mountPath"] for m in container["volumeMounts"]}, name
        assert COMMIT_ENV not in env, name  # the image's own commit, set at build
        images.add(container["image"])
    assert len(images) == 1, images  # one Ray, one code version in the whole cluster
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == _ray_pin("\n".join(gpu_config["setup_commands"]))[1]


def test_entrypoint_runs_an_experiment_script_of_the_image(job):
    argv = shlex.split(job["spec"]["entrypoint"])
    workdir = _instructions()["WORKDIR"][-1]
    assert argv[0] == "python" and argv[1].startswith(f"{workdir}/experiments/"), argv
    assert (REPO / argv[1].removeprefix(f"{workdir}/")).is_file(), argv[1]
    assert "--autoscale" in argv  # GPU workers start at zero


# --- cluster/Dockerfile, read statically ------------------------------------------------------------

def _instructions():
    """{INSTRUCTION: [arguments, in order]} of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    out = {}
    for ins in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if ins.strip():
            word, _, rest = ins.strip().partition(" ")
            out.setdefault(word.upper(), []).append(" ".join(rest.split()))
    return out


def _env(instructions):
    return dict(kv.split("=", 1) for e in instructions["ENV"] for kv in shlex.split(e))


def test_base_image_cuda_is_the_one_torchs_wheels_are_built_for():
    ins = _instructions()
    (base,) = ins["FROM"]
    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:base|runtime|cudnn-runtime)-ubuntu\d\d\.04", base)
    assert tag, f"FROM {base}: expected an nvidia/cuda base/runtime image on Ubuntu"
    major, minor = tag.groups()
    run = " ".join(ins["RUN"])
    torch_pin, cu = re.search(r'"torch==([\d.]+)\+cu(\d+)"', run).groups()
    assert cu == f"{major}{minor}", (base, cu)
    assert re.search(rf"https://download\.pytorch\.org/whl/cu{cu}\b", run)
    if torch.__version__.split("+")[0] == torch_pin and torch.version.cuda:  # the torch tested here is the image's
        assert torch.version.cuda == f"{major}.{minor}", (torch.version.cuda, base)


def test_image_installs_what_gpu_yaml_and_the_readme_install(gpu_config):
    ins = _instructions()
    run = " ".join(ins["RUN"])
    assert _ray_pin(run) == _ray_pin("\n".join(gpu_config["setup_commands"]))
    assert re.search(r'"boto3[^"]*"', run)[0] in "\n".join(gpu_config["setup_commands"])
    readme_install = re.search(r"^(pip install -e \.)( |$)", (REPO / "README.md").read_text(), flags=re.M)[1]
    last = [a for a in shlex.split(ins["RUN"][-1]) if a != "--no-cache-dir"]
    assert last == ["python", "-m", *readme_install.split()]  # the project, last, from the copied tree
    assert ins["COPY"] == [". ."] and ins["WORKDIR"] == ["/opt/cgc-ray"]
    venv = _env(ins)["VIRTUAL_ENV"]
    assert _env(ins)["PATH"].startswith(f"{venv}/bin:")  # KubeRay's `ray start` and the entrypoint's python
    assert ins["USER"] == ["ray"]


def test_image_env_names_are_gpu_yamls(gpu_config, monkeypatch):
    """The image declares the variables gpu.yaml exports, empty (the pod sets them), and its own commit."""
    ins = _instructions()
    env = _env(ins)
    names = {n for n in env if n.startswith("CGC_RAY_")}
    assert names == set(_exports(gpu_config)) | {COMMIT_ENV}
    assert {n: env[n] for n in _exports(gpu_config)} == {n: "" for n in _exports(gpu_config)}
    assert env[COMMIT_ENV] == "$CGC_RAY_COMMIT" and "CGC_RAY_COMMIT" in ins["ARG"] and "CGC_RAY_REF" in ins["ARG"]
    monkeypatch.setenv(ENV_STORAGE, "")  # empty is unset to cgc-ray: a plain `docker run` writes ./results
    assert storage_location(None, cwd="/w") == "/w/results"


def test_docs_name_the_vendored_kuberay_release():
    tag = re.search(r"tag `(v[\d.]+)`", (FIXTURES / "README.md").read_text())[1]
    assert f"KubeRay {tag}" in DOCS.read_text(encoding="utf-8")
    assert f"{tag}'s RayJob schema" in RAYJOB.read_text()
