"""Offline checks of the cluster deployment configs in cluster/ (issue 6).

- Launcher configs (cluster/*.yaml) go through Ray's own pipeline for `ray up`, minus the cloud
  calls: `prepare_config` (merge with the provider's defaults.yaml) and then `validate_config`
  (ray/autoscaler/ray-schema.json plus Ray's cross-field checks), both from
  ray.autoscaler._private.util.
- KubeRay manifests (cluster/kuberay/*.yaml) have no schema offline (the CRDs live in the
  operator), so the fields KubeRay and Kubernetes require are checked by hand.
- Every `python -m cbdtune.X` command in these files and in cluster/README.md names a module of
  this package, and the flags given to cbdtune.search are ones it accepts.
- The Ray dashboard (8265) and MLflow (5000) are never opened to the internet.

No network and no Ray processes: the whole file runs in about a second.
"""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
LAUNCHER_CONFIGS = sorted(CLUSTER_DIR.glob("*.yaml"))
KUBERAY_MANIFESTS = sorted(KUBERAY_DIR.glob("*.yaml"))
README = CLUSTER_DIR / "README.md"

# The flags of `python -m cbdtune.search` (issues 5 and 6), checked without importing it so
# this file reports a typo even before cbdtune/search.py exists. Once it does,
# test_cluster_search_commands_parse_with_the_real_cli holds the commands to its real parser.
SEARCH_FLAGS = frozenset({
    "dataset", "space", "num-samples", "max-concurrent", "workers-per-trial",
    "gpus-per-worker", "cpus-per-worker", "sampler", "scheduler", "metric", "mode",
    "mlflow-uri", "experiment", "name", "storage", "results-dir", "resume", "seed",
    "data-dir", "max-failures", "allow-autoscale", "debug", "help",
})  # fmt: skip
SEARCH_CHOICES = {"sampler": {"tpe", "random", "cmaes"}, "scheduler": {"asha", "none"}}

PRIVATE_PORTS = {8265: "Ray dashboard", 5000: "MLflow server"}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost"}
# Ray minor version the package pins (ray[...]==2.60.*); images must carry the same Ray.
RAY_MINOR = ".".join(ray.__version__.split(".")[:2])

_MODULE_RE = re.compile(r"\bpython3?\s+-m\s+(cbdtune(?:\.\w+)+)")
# A shell command ends at a quote, backtick, separator or end of line.
_COMMAND_END_RE = re.compile(r"['\"`;|&)\n]")


# ----------------------------------------------------------------------------- helpers


def _load_yaml(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return yaml.safe_load(f)


def _load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML tree (folded scalars come out as one line)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _command_texts() -> list[tuple[str, str]]:
    """(file, text) pairs that may hold shell commands: YAML string values and the README."""
    texts = []
    for path in [*LAUNCHER_CONFIGS, *KUBERAY_MANIFESTS]:
        for doc in _load_docs(path):
            texts += [(path.name, s) for s in _strings(doc)]
    # Join backslash continuations so a multi-line command in a code block reads as one line.
    texts.append((README.name, re.sub(r"\\\n\s*", " ", README.read_text())))
    return texts


def _cbdtune_commands() -> list[tuple[str, str, str]]:
    """(file, module, argument text) of every `python -m cbdtune.X ...` in the cluster files."""
    found = []
    for name, text in _command_texts():
        for match in _MODULE_RE.finditer(text):
            rest = text[match.end() :]
            end = _COMMAND_END_RE.search(rest)
            found.append((name, match.group(1), rest[: end.start()] if end else rest))
    return found


def _parse_flags(args: str) -> dict[str, str | None]:
    """`--flag value` / `--flag=value` / bare `--flag` into {flag: value or None}."""
    flags: dict[str, str | None] = {}
    tokens = shlex.split(args)
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        if not eq:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            value = nxt if nxt is not None and not nxt.startswith("--") else None
        flags[name] = value
    return flags


def _rule_opens_port_to_internet(rule: dict[str, Any], port: int) -> bool:
    """Whether one AWS IpPermissions entry admits `port` from 0.0.0.0/0 or ::/0."""
    protocol = str(rule.get("IpProtocol", "tcp")).lower()
    if protocol not in {"-1", "tcp", "6"}:
        return False
    if protocol != "-1":
        low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
        if not (low == -1 or low <= port <= high):
            return False
    cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges", [])]
    cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])]
    return any(c and ipaddress.ip_network(c, strict=False).prefixlen == 0 for c in cidrs)


def _head_commands(config: dict[str, Any]) -> list[str]:
    return [*config.get("head_setup_commands", []), *config.get("head_start_ray_commands", [])]


def _worker_commands(config: dict[str, Any]) -> list[str]:
    return [
        *config.get("worker_setup_commands", []),
        *config.get("worker_start_ray_commands", []),
    ]


def _check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    """The RayCluster fields KubeRay needs, and a GPU worker group that scales from 0."""
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams"), dict), f"{where}: head rayStartParams"
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c.get("image") for c in head_containers), where
    images = [c["image"] for c in head_containers]

    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    gpu_groups = []
    for group in groups:
        name = group.get("groupName")
        assert name, f"{where}: worker group without groupName"
        assert isinstance(group.get("rayStartParams"), dict), f"{where}/{name}: rayStartParams"
        low, n, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert 0 <= low <= n <= high, (
            f"{where}/{name}: need minReplicas <= replicas <= maxReplicas, "
            f"but got {low}, {n}, {high}"
        )
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("image") for c in containers), f"{where}/{name}"
        images += [c["image"] for c in containers]
        gpus = sum(
            int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            for c in containers
        )
        if gpus:
            gpu_groups.append((name, low))
    assert gpu_groups, f"{where}: no worker group with resources.limits nvidia.com/gpu"
    assert all(low == 0 for _, low in gpu_groups), f"{where}: GPU groups must scale from 0"

    version = str(spec.get("rayVersion", ""))
    assert version.startswith(RAY_MINOR + "."), f"{where}: rayVersion {version!r}"
    for image in images:
        if image.startswith("rayproject/ray"):
            assert f":{version}" in image, f"{where}: image {image} is not Ray {version}"


# ----------------------------------------------------------------------------- launcher


def test_launcher_configs_present() -> None:
    """The AWS and GCP launcher configs exist (the parametrized tests below need them)."""
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_ray_schema(path: Path) -> None:
    """`ray up`'s own checks: merge with the provider defaults, then Ray's JSON schema."""
    raw = _load_yaml(path)
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # raises jsonschema.ValidationError / ValueError on a bad config
    assert config["head_node_type"] in raw["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_gpu_workers_scale_from_zero_to_set_max(path: Path) -> None:
    """CPU head; every worker type has min 0 and an explicit max; some worker type has GPUs."""
    config = _load_yaml(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head should be a CPU node"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    for name, node_type in workers.items():
        assert node_type.get("min_workers", 0) == 0, f"{name}: min_workers must be 0"
        assert "max_workers" in node_type, f"{name}: set max_workers explicitly (cost ceiling)"
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no GPU worker type"
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_images_carry_the_pinned_ray(path: Path) -> None:
    """Docker images are rayproject/ray of the pinned Ray minor; workers get a GPU image."""
    docker = _load_yaml(path)["docker"]
    images = {k: docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    assert images, "no docker image"
    for key, image in images.items():
        assert image.startswith(f"rayproject/ray:{RAY_MINOR}."), f"{key}: {image}"
    assert "gpu" in docker.get("worker_image", docker.get("image", "")), "workers need CUDA"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_setup_installs_this_project(path: Path) -> None:
    """Setup commands fetch the cbdtune repository and pip-install it on every node."""
    setup = " ".join(_load_yaml(path)["setup_commands"])
    assert "git clone" in setup and "cbdtune" in setup
    assert re.search(r"pip install\b.*cbdtune", setup), setup


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_security_group_keeps_private_ports_closed(path: Path) -> None:
    """No extra inbound rule admits the dashboard or MLflow port from 0.0.0.0/0 or ::/0."""
    config = _load_yaml(path)
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for node_type in config["available_node_types"].values():
        # GCP: firewall rules are not in node_config, but network tags would select them.
        assert "tags" not in node_type["node_config"], "network tags could open firewall rules"
    for port, what in PRIVATE_PORTS.items():
        assert not any(_rule_opens_port_to_internet(r, port) for r in rules), (
            f"{path.name}: {what} port {port} is open to the internet"
        )
    run_options = " ".join(map(str, config.get("docker", {}).get("run_options", [])))
    assert not re.search(r"(^|\s)(-p|--publish)\b", run_options), "docker publishes a port"


def test_open_port_check_flags_a_public_dashboard_rule() -> None:
    """The rule check used above does catch a public 8265 rule and an all-traffic rule."""
    public = {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000,
              "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}  # fmt: skip
    everything = {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
    office = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
              "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}  # fmt: skip
    assert _rule_opens_port_to_internet(public, 8265)
    assert _rule_opens_port_to_internet(everything, 5000)
    assert not _rule_opens_port_to_internet(office, 8265)
    assert not _rule_opens_port_to_internet(public, 22)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_binds_dashboard_and_mlflow_to_loopback(path: Path) -> None:
    """The head starts Ray's dashboard and the MLflow server on 127.0.0.1, workers start no MLflow."""
    config = _load_yaml(path)
    head = _head_commands(config)
    commands = [*head, *_worker_commands(config), *config.get("setup_commands", [])]
    for command in commands:
        for host in re.findall(r"--dashboard-host[= ](\S+)", command):
            assert host.strip("'\"") in LOOPBACK_HOSTS, f"dashboard bound to {host}"
    mlflow = [c for c in head if "mlflow server" in c]
    assert mlflow, "the head must start the MLflow server"
    for command in mlflow:
        hosts = re.findall(r"(?:--host|-h)[= ](\S+)", command)
        assert hosts and all(h.strip("'\"") in LOOPBACK_HOSTS for h in hosts), command
    assert not any("mlflow server" in c for c in _worker_commands(config))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_starts_ray_with_token_auth(path: Path) -> None:
    """Every `ray start` runs with RAY_AUTH_MODE=token, and the token file reaches every node."""
    config = _load_yaml(path)
    starts = [
        c
        for c in [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]
        if "ray start" in c
    ]
    assert len(starts) >= 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts), starts
    assert "~/.ray/auth_token" in config.get("file_mounts", {})


# ----------------------------------------------------------------------------- KubeRay


def test_kuberay_manifests_present() -> None:
    """The RayCluster, RayJob and MLflow manifests exist."""
    assert {p.name for p in KUBERAY_MANIFESTS} >= {"raycluster.yaml", "rayjob.yaml", "mlflow.yaml"}


def test_kuberay_raycluster_has_autoscaled_gpu_group() -> None:
    """RayCluster: ray.io/v1, in-tree autoscaler on, CPU head, a GPU worker group from 0."""
    (cluster,) = _load_docs(KUBERAY_DIR / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    _check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in head)


def test_kuberay_rayjob_runs_the_search_against_mlflow_service() -> None:
    """RayJob: entrypoint is the gesture search, logging to http://mlflow:5000, shared storage."""
    (job,) = _load_docs(KUBERAY_DIR / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    entrypoint = spec["entrypoint"]
    assert "python -m cbdtune.search" in entrypoint
    flags = _parse_flags(entrypoint.split("cbdtune.search", 1)[1])
    assert flags.get("dataset") == "gesture"
    assert flags.get("mlflow-uri") == "http://mlflow:5000"
    storage = flags.get("storage") or ""
    assert storage.startswith(("s3://", "gs://", "/")), f"--storage {storage!r} is not shared"

    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
        "a RayJob needs exactly one of rayClusterSpec / clusterSelector"
    )
    if "rayClusterSpec" in spec:
        _check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    else:
        (cluster,) = _load_docs(KUBERAY_DIR / "raycluster.yaml")
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


def test_kuberay_mlflow_deployment_service_and_volume_fit_together() -> None:
    """PVC + Deployment (sqlite on the mounted PVC) + ClusterIP Service `mlflow` on port 5000."""
    docs = {doc["kind"]: doc for doc in _load_docs(KUBERAY_DIR / "mlflow.yaml")}
    assert set(docs) >= {"PersistentVolumeClaim", "Deployment", "Service"}
    pvc, deployment, service = (docs[k] for k in ("PersistentVolumeClaim", "Deployment", "Service"))
    for doc in (pvc, deployment, service):
        assert doc["apiVersion"] in {"v1", "apps/v1"} and doc["metadata"]["name"]

    assert pvc["spec"]["accessModes"] and pvc["spec"]["resources"]["requests"]["storage"]

    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert pvc["metadata"]["name"] in claims.values()
    (container,) = pod["spec"]["containers"]
    assert container["image"]
    mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
    argv = " ".join([*container.get("command", []), *container.get("args", [])])
    assert "mlflow server" in argv
    (store,) = re.findall(r"--backend-store-uri[= ](\S+)", argv)
    assert store.startswith("sqlite:////") or store.startswith("postgresql")
    if store.startswith("sqlite:"):
        db_path = store.removeprefix("sqlite:///")
        assert any(db_path.startswith(m.rstrip("/") + "/") for m in mounts), (
            f"sqlite file {db_path} is not on the PVC mounted at {mounts}"
        )

    assert service["metadata"]["name"] == "mlflow"  # the host in --mlflow-uri http://mlflow:5000
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert any(p["port"] == 5000 for p in service["spec"]["ports"])


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_nothing_exposed_outside_the_cluster(path: Path) -> None:
    """No LoadBalancer/NodePort Service, no Ingress, and the Ray head Service stays ClusterIP."""
    for doc in _load_docs(path):
        assert doc["kind"] != "Ingress"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        spec = doc.get("spec", {})
        for cluster_spec in (spec, spec.get("rayClusterSpec", {})):
            head = cluster_spec.get("headGroupSpec", {})
            assert head.get("serviceType", "ClusterIP") == "ClusterIP"


# ----------------------------------------------------------------------------- commands

CBDTUNE_COMMANDS = _cbdtune_commands()
SEARCH_COMMANDS = [c for c in CBDTUNE_COMMANDS if c[1] == "cbdtune.search"]
GPU_SEARCH_COMMANDS = [c for c in SEARCH_COMMANDS if "--gpus-per-worker" in c[2]]


def test_cluster_files_run_the_search() -> None:
    """The RayJob and the README both carry a `python -m cbdtune.search` command."""
    files = {name for name, _, _ in SEARCH_COMMANDS}
    assert {"rayjob.yaml", "README.md"} <= files, files


@pytest.mark.parametrize("module", sorted({m for _, m, _ in CBDTUNE_COMMANDS}))
def test_cluster_commands_name_existing_modules(module: str) -> None:
    """Each `python -m cbdtune.X` is a module (or a package with __main__) of this package."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{module} does not exist (named in cluster/ files)"
    if spec.submodule_search_locations is not None:
        assert importlib.util.find_spec(module + ".__main__"), f"{module} has no __main__"


@pytest.mark.parametrize(
    ("name", "args"),
    [(name, args) for name, _, args in SEARCH_COMMANDS],
    ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(SEARCH_COMMANDS)],
)
def test_cluster_search_commands_use_known_flags(name: str, args: str) -> None:
    """Flags passed to cbdtune.search are ones it accepts, with values of the right type."""
    flags = _parse_flags(args)
    unknown = set(flags) - SEARCH_FLAGS
    assert not unknown, f"{name}: unknown cbdtune.search flags {sorted(unknown)}"
    for flag, choices in SEARCH_CHOICES.items():
        if flag in flags:
            assert flags[flag] in choices, f"{name}: --{flag} {flags[flag]}"
    if "gpus-per-worker" in flags:
        assert float(flags["gpus-per-worker"] or "nan") > 0, f"{name}: --gpus-per-worker"
    if "space" in flags:
        space = flags["space"] or ""
        candidates = [REPO / space, REPO / "search_spaces" / f"{space}.yaml"]
        assert any(p.is_file() for p in candidates), f"{name}: --space {space}: no such file"


@pytest.mark.parametrize(
    ("name", "args"),
    [(name, args) for name, _, args in SEARCH_COMMANDS],
    ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(SEARCH_COMMANDS)],
)
def test_cluster_search_commands_parse_with_the_real_cli(
    name: str, args: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """cbdtune.search's own parser and argument checks accept each command as written."""
    search = pytest.importorskip("cbdtune.search", reason="cbdtune.search not written yet")
    try:
        parsed = search.parser().parse_args(shlex.split(args))
    except SystemExit:
        pytest.fail(f"{name}: python -m cbdtune.search{args}\n{capsys.readouterr().err}")
    from cbdtune.settings import SearchSettings

    SearchSettings.from_args(parsed)  # every value checked, as the CLI does before Ray


@pytest.mark.parametrize(
    ("name", "args"),
    [(name, args) for name, _, args in GPU_SEARCH_COMMANDS],
    ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(GPU_SEARCH_COMMANDS)],
)
def test_cluster_gpu_searches_allow_autoscale(name: str, args: str) -> None:
    """GPU pools here start at 0 nodes: without --allow-autoscale the search stops at once."""
    flags = _parse_flags(args)
    assert "allow-autoscale" in flags, f"{name}: add --allow-autoscale"
    assert int(flags.get("max-concurrent") or 0) > 0, f"{name}: give --max-concurrent"


def test_parse_flags_reads_both_spellings() -> None:
    """`--flag value`, `--flag=value` and a bare `--flag` are all read."""
    flags = _parse_flags(" --dataset gesture --gpus-per-worker=0.25 --resume --seed 0")
    assert flags == {"dataset": "gesture", "gpus-per-worker": "0.25", "resume": None, "seed": "0"}
