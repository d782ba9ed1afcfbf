"""The deployment files in cluster/, checked offline: schemas, KubeRay's own rules, security, entry points.

KubeRay manifests are validated against the openAPIV3Schema of the CRDs in ``shared/kuberay-crds`` (read
strictly: an unknown field is an error, as ``kubectl apply --validate=strict`` would say), the
cluster-launcher YAML against Ray's ``ray-schema.json``. Every checker also runs on a broken copy of a
real document, to show that it catches what it is meant to catch.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from raycv.config import AnnotateConfig, TrainConfig, load_config
from raycv.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _crd_dir() -> Path:
    """``shared/kuberay-crds`` beside this checkout, else beside the repository it was cloned from (a CI
    clone made elsewhere, e.g. ``git clone . /tmp/ci-check``)."""
    repo = Path(__file__).resolve().parents[1]
    beside = repo.parent / "shared" / "kuberay-crds"
    if beside.is_dir():
        return beside
    origin = subprocess.run(
        ["git", "-C", str(repo), "remote", "get-url", "origin"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if origin and Path(origin).is_dir():
        return Path(origin).resolve().parent / "shared" / "kuberay-crds"
    return beside


CRD_DIR = _crd_dir()
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
LAUNCHER = CLUSTER / "cluster-launcher-gpu.yaml"
DAY_S = 24 * 3600
DASHBOARD_PORT = 8265
# KubeRay name limits (ray-operator/controllers/ray/utils/constant.go): a RayCluster name becomes the
# prefix of "-serve-svc" (63 - 10 = 53); a RayJob adds "-xxxxx" for its cluster, a RayCronJob another one.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 41}
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|SESSION_KEY", re.I)
SECRET_TEXT = [
    re.compile(r"AWS_SECRET_ACCESS_KEY"),
    re.compile(r"aws_secret_access_key"),
    re.compile(r"AWS_ACCESS_KEY_ID|aws_access_key_id"),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML

# ------------------------------------------------------------------------------------------ loading


def _load_all(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=_LOADER) if doc is not None]


@functools.cache
def _file_docs(name: str) -> tuple[Any, ...]:
    return tuple(_load_all((CLUSTER / name).read_text()))


def _yaml_files() -> list[str]:
    return sorted(p.name for p in CLUSTER.glob("*.yaml"))


def _k8s_files() -> list[str]:
    return [name for name in _yaml_files() if name != LAUNCHER.name]


def _embedded(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Kubernetes objects kept as YAML text in a ConfigMap (the plain CronJob's RayJob template)."""
    if doc.get("kind") != "ConfigMap":
        return
    for key, text in (doc.get("data") or {}).items():
        for inner in _load_all(text):
            if isinstance(inner, dict) and "apiVersion" in inner:
                yield f"ConfigMap {doc['metadata']['name']} data.{key}", inner


def _objects(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for every Kubernetes object of a file, ConfigMap-embedded ones included."""
    for i, doc in enumerate(_file_docs(name)):
        yield f"{name}[{i}] {doc['kind']}", doc
        for where, inner in _embedded(doc):
            yield f"{name}[{i}] {where}", inner


def _all_objects() -> list[tuple[str, dict[str, Any]]]:
    return [item for name in _k8s_files() for item in _objects(name)]


def _ray_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(w, d) for w, d in _all_objects() if d["apiVersion"].split("/")[0] == "ray.io"]


def _rayjob_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "RayJob":
        return [obj["spec"]]
    if obj["kind"] == "RayCronJob":
        return [obj["spec"]["jobTemplate"]]
    return []


def _cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    return [job["rayClusterSpec"] for job in _rayjob_specs(obj) if "rayClusterSpec" in job]


def _pod_specs(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


_EXAMPLE_FILE = {
    "RayCluster": "raycluster.yaml",
    "RayJob": "rayjob-train.yaml",
    "RayCronJob": "raycronjob-annotate-nightly.yaml",
}


def _example(kind: str) -> dict[str, Any]:
    """A deep copy of a real object of that kind, for the tests that break things on purpose."""
    return copy.deepcopy(next(d for _, d in _objects(_EXAMPLE_FILE[kind]) if d["kind"] == kind))


def _launcher() -> dict[str, Any]:
    return copy.deepcopy(_file_docs(LAUNCHER.name)[0])


# ------------------------------------------------------------------------------- CRD schema check


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """An openAPIV3Schema as JSON Schema: closed objects (as the API server prunes unknown fields,
    a strict field validation rejects them), ``nullable`` as a null type. ``x-kubernetes-*`` keys and
    ``format`` (int32, int-or-string, ...) stay as unknown keywords that jsonschema ignores; CEL rules
    (``x-kubernetes-validations``) run in the API server only."""
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: _strict(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    closed = "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields")
    if closed and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """``x-kubernetes-list-type: map`` lists: the key fields identify an item (two containers with one
    name, two ports with one number and protocol are rejected by the API server)."""
    if not validator.is_type(instance, "array"):
        return
    props = schema.get("items", {}).get("properties", {})
    seen: dict[tuple[Any, ...], int] = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"items {seen[key]} and {i} share the key {keys}={key}")
            seen[key] = i


_KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


@functools.cache
def _crd_validator(kind: str, version: str) -> Any:
    if not CRD_DIR.is_dir():
        pytest.fail(
            f"KubeRay CRDs not found at {CRD_DIR}. The tests read them from shared/kuberay-crds beside "
            "the repository (../shared/kuberay-crds); check out shared/ next to the repo."
        )
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=_LOADER)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions, f"{kind}: CRD serves {sorted(versions)}, manifest asks for {version}"
    return _KubeValidator(_strict(versions[version]["schema"]["openAPIV3Schema"]))


def _schema_errors(obj: dict[str, Any]) -> list[str]:
    group, _, version = obj["apiVersion"].partition("/")
    assert group == "ray.io" and obj["kind"] in CRD_FILES, f"not a KubeRay object: {obj['apiVersion']}"
    errors = _crd_validator(obj["kind"], version).iter_errors(obj)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors)


def test_crds_are_beside_the_repo():
    missing = [f for f in CRD_FILES.values() if not (CRD_DIR / f).is_file()]
    assert CRD_DIR.is_dir() and not missing, (
        f"KubeRay CRDs missing in {CRD_DIR}: {missing or 'the whole folder'}. Check out shared/ beside the repo."
    )


def test_cluster_folder_holds_every_kind():
    kinds = {d["kind"] for _, d in _all_objects()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap", "Role", "ServiceAccount"} <= kinds
    assert all("apiVersion" in d and "kind" in d for name in _k8s_files() for d in _file_docs(name))
    assert LAUNCHER.is_file() and (CLUSTER / "Dockerfile").is_file() and (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("where", [w for w, _ in _ray_objects()])
def test_ray_objects_validate_against_the_crds(where):
    obj = dict(_ray_objects())[where]
    assert _schema_errors(obj) == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()
_WORKER = "spec.workerGroupSpecs.0"
_WORKER_CONTAINER = f"{_WORKER}.template.spec.containers.0"


def _rename_auth(obj: dict[str, Any]) -> None:
    obj["spec"]["authOption"] = obj["spec"].pop("authOptions")


def _duplicate_port(obj: dict[str, Any]) -> None:
    ports = obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append({"containerPort": ports[0]["containerPort"], "name": "again"})


@pytest.mark.parametrize(
    ("kind", "mutate", "expected"),
    [
        pytest.param(
            "RayJob", _set("spec.ttlSecondsAfterFinished", "10m"), "is not of type 'integer'", id="int"
        ),
        pytest.param(
            "RayJob", _set("spec.shutdownAfterJobFinishes", "yes"), "is not of type 'boolean'", id="bool"
        ),
        pytest.param(
            "RayCluster",
            _set(f"{_WORKER}.groupName", _DELETE),
            "'groupName' is a required property",
            id="required-groupName",
        ),
        pytest.param(
            "RayCluster",
            _set("spec.headGroupSpec.template", _DELETE),
            "'template' is a required property",
            id="required-template",
        ),
        pytest.param("RayCluster", _rename_auth, "'authOption' was unexpected", id="unknown-field"),
        pytest.param(
            "RayCluster",
            _set("spec.authOptions.mode", "tokens"),
            "is not one of ['disabled', 'token']",
            id="enum",
        ),
        pytest.param(
            "RayCluster",
            _set(f"{_WORKER_CONTAINER}.resources.limits.memory", "26 GiB"),
            "does not match",
            id="quantity",
        ),
        pytest.param(
            "RayCluster",
            _set(f"{_WORKER_CONTAINER}.imagePullPolicy", ["Always"]),
            "is not of type 'string'",
            id="pod-template-field",
        ),
        pytest.param("RayCluster", _duplicate_port, "share the key", id="duplicate-port"),
        pytest.param(
            "RayCronJob", _set("spec.schedule", _DELETE), "'schedule' is a required property", id="schedule"
        ),
        pytest.param(
            "RayCronJob",
            _set("spec.concurrencyPolicy", "Forbid"),
            "'concurrencyPolicy' was unexpected",
            id="no-concurrencyPolicy",
        ),
    ],
)
def test_schema_check_rejects_broken_copies(kind, mutate, expected):
    broken = _example(kind)
    mutate(broken)
    errors = _schema_errors(broken)
    assert any(expected in e for e in errors), errors


# ------------------------------------------------------------------------- KubeRay's own rules


def _name_problems(obj: dict[str, Any]) -> list[str]:
    meta, kind = obj["metadata"], obj["kind"]
    name = meta.get("name") or meta.get("generateName", "") + "xxxxx"
    limit = MAX_NAME.get(kind, 63)
    problems = [f"{kind} name {name!r} is longer than {limit}"] if len(name) > limit else []
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"{kind} name {name!r} is not a DNS-1035 label")
    return problems


def _cluster_rule_problems(cluster: dict[str, Any]) -> list[str]:
    """The checks of ValidateRayClusterSpec (ray-operator/controllers/ray/utils/validation.go) that the
    schema cannot express, for the fields these manifests use."""
    problems = []
    if cluster.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {cluster.get('rayVersion')!r} is not the tested Ray {ray.__version__}")
    autoscaler = cluster.get("autoscalerOptions", {})
    v2 = cluster.get("enableInTreeAutoscaling") and autoscaler.get("version") == "v2"
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group, (label, pod) in zip(groups, _pod_specs(cluster)):
        if v2 and pod.get("restartPolicy", "Never") != "Never":
            problems.append(f"{label}: restartPolicy must be Never or unset with autoscaler v2")
        start_resources = {"num-cpus", "num-gpus", "memory", "resources"} & set(
            group.get("rayStartParams", {})
        )
        if start_resources and group.get("resources"):
            problems.append(f"{label}: resources set both in rayStartParams and in the group's resources")
        if any(e["name"] == "RAY_enable_autoscaler_v2" for c in pod["containers"] for e in c.get("env", [])):
            problems.append(f"{label}: RAY_enable_autoscaler_v2 env var; use autoscalerOptions.version")
    return problems


def _job_rule_problems(job: dict[str, Any]) -> list[str]:
    problems = []
    if job.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true (the job's cluster is deleted after it)")
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        if not isinstance(job.get(key), int) or job[key] <= 0:
            problems.append(f"{key} must be a positive integer, got {job.get(key)!r}")
    if not isinstance(job.get("backoffLimit"), int) or job["backoffLimit"] < 0:
        problems.append(f"backoffLimit must be set to an integer >= 0, got {job.get('backoffLimit')!r}")
    runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "{}")
    if not isinstance(runtime_env, dict) or set(runtime_env) - {"env_vars"}:
        problems.append(f"runtimeEnvYAML may only set env_vars (code is in the image): {runtime_env!r}")
    return problems


def _rule_problems(obj: dict[str, Any]) -> list[str]:
    problems = _name_problems(obj)
    problems += [p for c in _cluster_specs(obj) for p in _cluster_rule_problems(c)]
    return problems + [p for job in _rayjob_specs(obj) for p in _job_rule_problems(job)]


@pytest.mark.parametrize("where", [w for w, _ in _ray_objects()])
def test_ray_objects_pass_kuberay_rules(where):
    assert _rule_problems(dict(_ray_objects())[where]) == []


def test_kuberay_rules_reject_broken_copies():
    broken = _example("RayJob")
    broken["metadata"]["name"] = "raycv-train-with-a-name-much-too-long-for-its-cluster"
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["restartPolicy"] = "Always"
    broken["spec"]["rayClusterSpec"]["rayVersion"] = "2.51.0"
    broken["spec"]["runtimeEnvYAML"] = "pip: [requests]\n"
    del broken["spec"]["activeDeadlineSeconds"]
    problems = " | ".join(_rule_problems(broken))
    for expected in (
        "longer than 47",
        "restartPolicy",
        "rayVersion",
        "runtimeEnvYAML",
        "activeDeadlineSeconds",
    ):
        assert expected in problems


# ------------------------------------------------------------------------------------ security


def _auth_problems(obj: dict[str, Any]) -> list[str]:
    return [
        f"{obj['kind']} {obj['metadata'].get('name') or obj['metadata'].get('generateName')}: "
        f"authOptions.mode is {cluster.get('authOptions', {}).get('mode')!r}, not 'token'"
        for cluster in _cluster_specs(obj)
        if cluster.get("authOptions", {}).get("mode") != "token"
    ]


def _launcher_auth_problems(cfg: dict[str, Any]) -> list[str]:
    problems = []
    if "--env=RAY_AUTH_MODE=token" not in cfg.get("docker", {}).get("run_options", []):
        problems.append("docker.run_options lacks --env=RAY_AUTH_MODE=token")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key, []) if "ray start" in c]
        if not starts or not all("RAY_AUTH_MODE=token" in c for c in starts):
            problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token")
    return problems


def test_token_auth_is_on_in_every_ray_cluster():
    specs = [c for _, obj in _ray_objects() for c in _cluster_specs(obj)]
    # raycluster, the two RayJobs, the RayCronJob's template and the plain CronJob's template
    assert len(specs) >= 5
    assert [p for _, obj in _ray_objects() for p in _auth_problems(obj)] == []
    assert _launcher_auth_problems(_launcher()) == []


def test_auth_check_catches_a_cluster_without_token_auth():
    cron = _example("RayCronJob")
    del cron["spec"]["jobTemplate"]["rayClusterSpec"]["authOptions"]
    cluster = _example("RayCluster")
    cluster["spec"]["authOptions"]["mode"] = "disabled"
    assert len(_auth_problems(cron)) == 1 and len(_auth_problems(cluster)) == 1
    cfg = _launcher()
    cfg["head_start_ray_commands"] = [
        c.replace("export RAY_AUTH_MODE=token && ", "") for c in cfg["head_start_ray_commands"]
    ]
    assert _launcher_auth_problems(cfg) == [
        "head_start_ray_commands: `ray start` without RAY_AUTH_MODE=token"
    ]


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _secret_text_problems(text: str) -> list[str]:
    return [f"matches {pattern.pattern}" for pattern in SECRET_TEXT if pattern.search(text)]


def _secret_value_problems(doc: Any) -> list[str]:
    """Secret-looking variables with a literal value: env entries, runtimeEnvYAML, docker --env options."""
    problems = [
        f"env {node['name']} has a literal value"
        for node in _walk(doc)
        if isinstance(node.get("name"), str) and "value" in node and SECRET_NAME.search(node["name"])
    ]
    for node in _walk(doc):
        env_vars = (yaml.safe_load(node.get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
        problems += [f"runtimeEnvYAML env_vars.{k}" for k in env_vars if SECRET_NAME.search(k)]
        for option in node.get("run_options", []) if isinstance(node.get("run_options"), list) else []:
            name = re.match(r"(?:-e|--env)[= ]?([A-Za-z_][A-Za-z0-9_]*)=", option)
            if name and SECRET_NAME.search(name.group(1)):
                problems.append(f"docker option {option}")
    return problems


def _dockerfile_problems(text: str) -> list[str]:
    """Secret-looking ENV/ARG names (a build argument or variable ends up in the image's history), root."""
    instructions = re.findall(r"^\s*(?:ENV|ARG)\s+(.+)$", text.replace("\\\n", " "), re.M)
    names = [
        n for line in instructions for n in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", line)
    ]
    problems = [f"Dockerfile sets {n}" for n in names if SECRET_NAME.search(n)]
    users = re.findall(r"^\s*USER\s+(\S+)", text, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"Dockerfile must end as a non-root USER, has {users}")
    return problems


@pytest.mark.parametrize("name", [*_yaml_files(), "Dockerfile", "Dockerfile.dockerignore"])
def test_no_credentials_in_deployment_files(name):
    text = (CLUSTER / name).read_text()
    assert _secret_text_problems(text) == []
    if name.endswith(".yaml"):
        assert [p for doc in _file_docs(name) for p in _secret_value_problems(doc)] == []
    if name == "Dockerfile":
        assert _dockerfile_problems(text) == []


def test_credential_checks_catch_planted_secrets():
    fake_key_id = "AKIA" + "Q" * 16  # built here so this file holds no key-shaped string
    assert _secret_text_problems(f"aws_access_key_id = {fake_key_id}\n")
    assert _secret_text_problems("  - name: AWS_SECRET_ACCESS_KEY\n")
    job = _example("RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"].append({"name": "RAY_AUTH_TOKEN", "value": "not-a-real-token"})
    job["spec"]["runtimeEnvYAML"] = "env_vars:\n  DB_PASSWORD: hunter2\n"
    cfg = _launcher()
    cfg["docker"]["run_options"].append("--env=GITHUB_TOKEN=abc")
    assert len(_secret_value_problems(job)) == 2 and len(_secret_value_problems(cfg)) == 1
    dockerfile = "FROM x\nARG GITHUB_TOKEN\nENV A=1 \\\n    AWS_SESSION_TOKEN=abc\n"
    assert len(_dockerfile_problems(dockerfile)) == 3  # two secret names, and no USER


def _service_exposes_dashboard(service_type: Any, ports: list[dict[str, Any]] | None) -> bool:
    if service_type not in ("LoadBalancer", "NodePort"):
        return False
    return ports is None or any(
        DASHBOARD_PORT in (p.get("port"), p.get("targetPort")) or p.get("name") == "dashboard" for p in ports
    )


def _exposure_problems(obj: dict[str, Any]) -> list[str]:
    """Ways the dashboard/Jobs port 8265 could leave the cluster network (CVE-2023-48022)."""
    problems = []
    spec = obj.get("spec", {})
    if obj["kind"] == "Service" and _service_exposes_dashboard(spec.get("type"), spec.get("ports")):
        problems.append(f"Service {obj['metadata']['name']} publishes {DASHBOARD_PORT}")
    if obj["kind"] == "Ingress":
        problems.append(f"Ingress {obj['metadata']['name']}: use kubectl port-forward for the dashboard")
    for cluster in _cluster_specs(obj):
        head = cluster["headGroupSpec"]
        service = head.get("headService", {}).get("spec", {})
        if _service_exposes_dashboard(head.get("serviceType", service.get("type")), None):
            problems.append(f"head service of type {head.get('serviceType', service.get('type'))}")
        if head.get("enableIngress"):
            problems.append("headGroupSpec.enableIngress publishes the dashboard")
        for label, pod in _pod_specs(cluster):
            host_ports = [p for c in pod["containers"] for p in c.get("ports", []) if "hostPort" in p]
            if pod.get("hostNetwork") or host_ports:
                problems.append(f"{label}: binds ports on the node (hostNetwork/hostPort)")
    return problems


def _launcher_exposure_problems(cfg: dict[str, Any]) -> list[str]:
    commands = " ".join(cfg.get("head_start_ray_commands", []))
    problems = [] if "--dashboard-host=127.0.0.1" in commands else ["head: dashboard not bound to 127.0.0.1"]
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        if rule.get("FromPort", 0) <= DASHBOARD_PORT <= rule.get("ToPort", -1):
            problems.append(f"security group opens {DASHBOARD_PORT}")
    return problems


def test_dashboard_is_not_exposed():
    assert [p for _, obj in _all_objects() for p in _exposure_problems(obj)] == []
    heads = [c["headGroupSpec"] for _, obj in _ray_objects() for c in _cluster_specs(obj)]
    assert all(h.get("serviceType") == "ClusterIP" for h in heads)
    assert _launcher_exposure_problems(_launcher()) == []


def test_exposure_check_catches_published_dashboards():
    cluster = _example("RayCluster")
    cluster["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    node_port = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "raycv-dashboard"},
        "spec": {"type": "NodePort", "ports": [{"port": 80, "targetPort": DASHBOARD_PORT}]},
    }
    assert _exposure_problems(cluster) and _exposure_problems(node_port)
    cfg = _launcher()
    cfg["head_start_ray_commands"] = [
        c.replace("127.0.0.1", "0.0.0.0") for c in cfg["head_start_ray_commands"]
    ]
    cfg["provider"]["security_group"] = {"IpPermissions": [{"FromPort": 8265, "ToPort": 8265}]}
    assert len(_launcher_exposure_problems(cfg)) == 2


def test_ray_pods_use_the_irsa_service_account():
    (account,) = _file_docs("serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount"
    arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn)
    for _, obj in _ray_objects():
        for cluster in _cluster_specs(obj):
            for label, pod in _pod_specs(cluster):
                assert pod["serviceAccountName"] == account["metadata"]["name"]
                # only the head (its autoscaler sidecar) talks to the Kubernetes API
                assert pod.get("automountServiceAccountToken", True) is (label == "head")


# ------------------------------------------------------------------------- entry points and fit


def _entrypoint_config(entrypoint: str) -> TrainConfig | AnnotateConfig:
    """The config a RayJob's entrypoint would run, validated as raycv would; ValueError if it can't run."""
    argv = shlex.split(entrypoint)
    scripts = {"jobs/train.py": "train", "jobs/annotate.py": "annotate"}
    if len(argv) < 3 or argv[0] != "python" or argv[1] not in scripts:
        raise ValueError(f"entrypoint must be `python jobs/{{train,annotate}}.py CONFIG ...`: {entrypoint!r}")
    config, rest = REPO / argv[2], argv[3:]
    if not (REPO / argv[1]).is_file() or not config.is_file() or config.parent != REPO / "jobs" / "configs":
        raise ValueError(f"{argv[1]} or {argv[2]} is not a file of the repo (jobs/, jobs/configs/)")
    if len(rest) % 2 or any(flag != "--set" for flag in rest[::2]):
        raise ValueError(f"only `--set key=value` may follow the config: {rest}")
    return load_config(config, rest[1::2], kind=scripts[argv[1]])


def _entrypoints() -> list[tuple[str, str]]:
    return [(w, job["entrypoint"]) for w, obj in _ray_objects() for job in _rayjob_specs(obj)]


@pytest.mark.parametrize("entrypoint", [e for _, e in _entrypoints()], ids=[w for w, _ in _entrypoints()])
def test_entrypoints_run_repo_files_with_valid_configs(entrypoint):
    _entrypoint_config(entrypoint)


def test_entrypoint_check_catches_missing_files_and_bad_overrides():
    with pytest.raises(ValueError, match="not a file of the repo"):
        _entrypoint_config("python jobs/annotate.py jobs/configs/nope.yaml")
    with pytest.raises(ValueError, match="must be"):
        _entrypoint_config("python jobs/evaluate.py jobs/configs/train_classification.yaml")
    with pytest.raises(ConfigError, match="incremental"):
        _entrypoint_config(
            "python jobs/annotate.py jobs/configs/annotate_classification.yaml --set incremental=[1]"
        )


def _cpus(quantity: Any) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _slots(cluster: dict[str, Any], cpus_each: float, gpus_each: float) -> int:
    """How many Ray workers/actors of that size the worker groups hold at maxReplicas."""
    total = 0
    for group in cluster.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_pod = math.floor(_cpus(limits.get("cpu", 0)) / cpus_each)
        if gpus_each:
            per_pod = min(per_pod, math.floor(float(limits.get("nvidia.com/gpu", 0)) / gpus_each))
        total += per_pod * group["maxReplicas"]
    return total


def _fit_problems(cluster: dict[str, Any], cfg: TrainConfig | AnnotateConfig) -> list[str]:
    if isinstance(cfg, TrainConfig):
        need, cpus, gpus = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, float(cfg.scaling.use_gpu)
    else:
        need, cpus, gpus = cfg.actors, cfg.cpus_per_actor, cfg.gpus_per_actor
    have = _slots(cluster, cpus, gpus)
    return [] if have >= need else [f"{need} x ({cpus} CPU, {gpus} GPU) needed, the groups hold {have}"]


def test_job_clusters_can_hold_their_configs():
    for _, obj in _ray_objects():
        for job in _rayjob_specs(obj):
            assert _fit_problems(job["rayClusterSpec"], _entrypoint_config(job["entrypoint"])) == []
    standing = _example("RayCluster")["spec"]
    for config in ("train_classification.yaml", "annotate_classification.yaml"):
        kind = "train" if config.startswith("train") else "annotate"
        assert _fit_problems(standing, load_config(REPO / "jobs" / "configs" / config, kind=kind)) == []
    standing["workerGroupSpecs"][0]["maxReplicas"] = 2
    cfg = load_config(REPO / "jobs" / "configs" / "train_classification.yaml", kind="train")
    assert _fit_problems(standing, cfg)  # 4 GPU workers do not fit in 2 one-GPU pods


def test_image_workdir_and_versions_agree():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert base and re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", base.group(1))
    workdir = re.findall(r"^WORKDIR\s+(\S+)", dockerfile, re.M)[-1]
    copied = " ".join(re.findall(r"^COPY\s+(.+)$", dockerfile, re.M))
    assert all(part in copied for part in ("pyproject.toml", "constraints.txt", "raycv/", "jobs/"))
    images = set()
    for _, obj in _ray_objects():
        for cluster in _cluster_specs(obj):
            for _, pod in _pod_specs(cluster):
                # the job driver runs where `ray start` ran: the entrypoints' relative paths need it
                assert [c.get("workingDir") for c in pod["containers"]] == [workdir]
                images |= {c["image"] for c in pod["containers"]}
    cfg = _launcher()
    assert images == {cfg["docker"]["image"]}
    assert all(f"cd {workdir} " in c for c in cfg["head_start_ray_commands"] if "ray start" in c)


# ----------------------------------------------------------------------------------- schedules


def _overlap_problems(schedule: str, job: dict[str, Any]) -> list[str]:
    """A daily run must be over (all retries, cluster deleted) before the next one starts."""
    fields = schedule.split()
    if len(fields) != 5 or fields[2:] != ["*", "*", "*"] or not all(f.isdigit() for f in fields[:2]):
        return [f"schedule {schedule!r} is not once a day"]
    worst = (job["backoffLimit"] + 1) * (job["activeDeadlineSeconds"] + job["ttlSecondsAfterFinished"])
    return [] if worst < DAY_S else [f"a run may last {worst} s, longer than the {DAY_S} s between runs"]


def _nightly() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The RayCronJob, the plain CronJob, and the RayJob template the CronJob creates."""
    (cron,) = [d for _, d in _all_objects() if d["kind"] == "RayCronJob"]
    (plain,) = [d for _, d in _all_objects() if d["kind"] == "CronJob"]
    (template,) = [d for w, d in _all_objects() if d["kind"] == "RayJob" and "ConfigMap" in w]
    return cron, plain, template


def test_nightly_runs_cannot_overlap():
    cron, plain, template = _nightly()
    assert _overlap_problems(cron["spec"]["schedule"], cron["spec"]["jobTemplate"]) == []
    assert _overlap_problems(plain["spec"]["schedule"], template["spec"]) == []
    assert plain["spec"]["concurrencyPolicy"] == "Forbid"
    longer = {**template["spec"], "activeDeadlineSeconds": 12 * 3600}
    assert _overlap_problems("0 2 * * *", longer) and _overlap_problems("0 */6 * * *", template["spec"])


def test_nightly_variants_run_the_same_incremental_job():
    cron, plain, template = _nightly()
    assert cron["spec"]["jobTemplate"] == template["spec"]
    assert cron["spec"]["schedule"] == plain["spec"]["schedule"]
    assert "--set incremental=true" in template["spec"]["entrypoint"]
    assert _entrypoint_config(template["spec"]["entrypoint"]).incremental is True


def test_plain_cronjob_creates_rayjobs_with_least_privilege():
    docs = {d["kind"]: d for d in _file_docs("cronjob-annotate-nightly.yaml")}
    api = {k: d["apiVersion"] for k, d in docs.items()}
    assert api == {
        "ServiceAccount": "v1",
        "Role": "rbac.authorization.k8s.io/v1",
        "RoleBinding": "rbac.authorization.k8s.io/v1",
        "ConfigMap": "v1",
        "CronJob": "batch/v1",
    }
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert set(rule["verbs"]) <= {"create", "get"}
    account = docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": docs["Role"]["metadata"]["name"],
    }
    assert docs["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "template")
    volume = next(v for v in pod["volumes"] if v["name"] == "template")
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    args = container["args"]
    assert args[:2] == ["create", "-f"]
    key = Path(args[2]).relative_to(mount["mountPath"]).as_posix()
    template = yaml.safe_load(docs["ConfigMap"]["data"][key])
    assert template["kind"] == "RayJob" and "name" not in template["metadata"]
    assert template["metadata"]["generateName"].endswith("-")


# ------------------------------------------------------------------------------------- launcher


@functools.cache
def _ray_schema() -> dict[str, Any]:
    return json.loads(RAY_SCHEMA.read_text())


def _launcher_errors(cfg: dict[str, Any]) -> list[str]:
    errors = jsonschema.Draft7Validator(_ray_schema()).iter_errors(cfg)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_launcher_validates_against_rays_schema():
    assert _launcher_errors(_launcher()) == []
    # what `ray up` runs before it calls AWS: defaults filled in, then the schema and its cross-checks
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_launcher()))


def test_launcher_schema_check_rejects_broken_copies():
    cfg = _launcher()
    cfg["max_workers"] = "eight"
    cfg["auth_token"] = "nope"
    del cfg["available_node_types"]["ray.worker.gpu"]["resources"]
    errors = " | ".join(_launcher_errors(cfg))
    for expected in (
        "'eight' is not of type 'integer'",
        "'auth_token' was unexpected",
        "'resources' is a required",
    ):
        assert expected in errors


def test_launcher_has_autoscaling_gpu_workers_with_instance_profiles():
    cfg = _launcher()
    types = cfg["available_node_types"]
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(
        t.get("min_workers", 0) == 0 < t["max_workers"] <= cfg["max_workers"] for t in workers
    )
    assert all(
        t["node_config"]["InstanceType"].startswith(("g4dn.", "g5.", "g6.", "p4d.", "p5.")) for t in workers
    )
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0
    for t in types.values():
        assert re.fullmatch(
            r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+",
            t["node_config"]["IamInstanceProfile"]["Arn"],
        )
    assert not any("pip install" in c for c in cfg["setup_commands"])
