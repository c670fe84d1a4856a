"""The cluster configs, validated offline:

* ``ray_cluster.yaml`` against Ray's own cluster-config schema (``validate_config(fillout_defaults(...))``)
  and the project's rules (CPU render and GPU training workers, S3 through an instance role, token auth,
  the dashboard on the head's loopback);
* ``infra/kuberay`` and ``infra/mlflow``: core Kubernetes kinds against Kubernetes' own OpenAPI schemas
  (``kubernetes-validate``, strict: unknown fields are errors), the pod templates inside the KubeRay kinds
  the same way, and the KubeRay kinds' structure and required fields (KubeRay ships CRDs, not a schema
  package); every job entrypoint names a module of ``jobs/`` and a config the image carries.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"
MANIFESTS = sorted((ROOT / "infra/kuberay").glob("*.yaml")) + sorted((ROOT / "infra/mlflow").glob("*.yaml"))
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}


# -------------------------------------------------------------------------------------------------
# ray_cluster.yaml
# -------------------------------------------------------------------------------------------------
def ray_cluster() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def validate_ray(config: dict) -> dict:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    filled = fillout_defaults(copy.deepcopy(config))
    validate_config(filled)
    return filled


def test_ray_cluster_yaml_passes_rays_own_schema():
    filled = validate_ray(ray_cluster())
    assert filled["provider"]["type"] == "aws"


def test_ray_cluster_yaml_schema_check_is_real():
    from jsonschema import ValidationError

    bad = ray_cluster()
    bad["available_node_types"]["gpu_train_worker"]["max_worker"] = 4  # a typo
    with pytest.raises(ValidationError, match="max_worker"):
        validate_ray(bad)


def test_ray_cluster_yaml_has_render_and_training_workers_an_instance_role_and_token_auth():
    config = ray_cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only
    cpu = [t for n, t in types.items() if "InstanceType" in t["node_config"] and n != config["head_node_type"]
           and t["node_config"]["InstanceType"].startswith(("c", "m"))]
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert cpu and gpu and all(t["max_workers"] > t["min_workers"] == 0 for t in cpu + gpu)  # autoscaling
    assert all(t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values())  # S3 via the role
    assert config["docker"]["image"].startswith("ghcr.io/") and "geco" in config["docker"]["image"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]  # the token on every node
    text = (ROOT / "ray_cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{12}|aws_secret_access_key", text, re.I)


# -------------------------------------------------------------------------------------------------
# Kubernetes manifests
# -------------------------------------------------------------------------------------------------
def documents() -> list[tuple[str, dict]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
                if doc["kind"] == "ConfigMap":  # manifests carried in a ConfigMap (cronjob.yaml's RayJob)
                    out += [(f"{path.name}:{k}", yaml.safe_load(v)) for k, v in doc.get("data", {}).items()
                            if k.endswith(".yaml")]
    return out


def pod_template(template: dict) -> dict:
    """A pod template as a core ``PodTemplate`` object, for Kubernetes' own schema."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def kube_validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_manifests_hold_what_the_brief_asks_for():
    kinds = {(name.split(":")[0], doc["kind"]) for name, doc in documents()}
    assert {("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"), ("raycronjob.yaml", "RayCronJob"),
            ("cronjob.yaml", "CronJob"), ("mlflow.yaml", "Deployment"), ("mlflow.yaml", "Service")} <= kinds


@pytest.mark.parametrize("name, doc", [d for d in documents() if d[1]["kind"] not in RAY_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_core_kinds_pass_kubernetes_schemas(name, doc):
    kube_validate(doc)


def test_kubernetes_schema_check_is_real():
    deployment = next(doc for _, doc in documents() if doc["kind"] == "Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kube_validate(bad)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy_"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kube_validate(bad)


def check_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams are strings"
    kube_validate(pod_template(head["template"]))
    groups = spec["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu-render", "gpu-train"], where
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] > 0, where
        assert isinstance(g["rayStartParams"], dict), where
        kube_validate(pod_template(g["template"]))
    gpu = groups[1]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1", where
    assert spec.get("authOptions") == {"mode": "token"}, f"{where}: Ray token auth"
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["rayVersion"] == "2.60.0", where


def check_job_spec(spec: dict, where: str) -> None:
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["python", "-m", entry[2]] and entry[2].startswith("jobs."), where
    assert (ROOT / (entry[2].replace(".", "/") + ".py")).is_file(), f"{where}: no module {entry[2]}"
    config = entry[entry.index("--config") + 1]
    assert config.startswith("/opt/geco/") and (ROOT / config.removeprefix("/opt/geco/")).is_file(), where
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{where}: a cluster spec or a selector"
    if "rayClusterSpec" in spec:
        check_cluster_spec(spec["rayClusterSpec"], where)
        assert spec["shutdownAfterJobFinishes"] is True, where
    else:
        assert spec["clusterSelector"] == {"ray.io/cluster": "geco"}, where
    if "submitterPodTemplate" in spec:
        kube_validate(pod_template(spec["submitterPodTemplate"]))
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert not any(k.startswith("AWS_") for k in env.get("env_vars", {})), f"{where}: no credentials in runtime envs"


@pytest.mark.parametrize("name, doc", [d for d in documents() if d[1]["kind"] in RAY_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kuberay_kinds_structure_and_required_fields(name, doc):
    assert doc["apiVersion"] == "ray.io/v1", name
    assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), name
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        check_cluster_spec(spec, name)
    elif doc["kind"] == "RayJob":
        check_job_spec(spec, name)
    else:  # RayCronJob (KubeRay >= 1.6): schedule + jobTemplate (a RayJob spec) + suspend
        assert set(spec) <= {"schedule", "jobTemplate", "suspend"}, name
        assert len(spec["schedule"].split()) == 5 and isinstance(spec.get("suspend", False), bool), name
        check_job_spec(spec["jobTemplate"], name)


def test_the_image_carries_what_the_jobs_need():
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    for folder in ("geco", "pipelines", "cli", "jobs", "configs"):
        assert f"COPY {folder} {folder}" in dockerfile
    assert "WORKDIR /opt/geco" in dockerfile and "psycopg2" in dockerfile  # MLflow's PostgreSQL backend


def test_the_cron_fallback_creates_the_rayjob_it_carries():
    docs = dict((d["kind"], d) for n, d in documents() if n == "cronjob.yaml")
    cron, role = docs["CronJob"], docs["Role"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert pod["containers"][0]["command"] == ["kubectl", "create", "-f", "/manifests/rayjob.yaml"]
    assert pod["volumes"][0]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert {"create"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["rayjobs"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    rayjob = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])
    assert rayjob["metadata"]["generateName"]  # `kubectl create` makes a new one each time


def test_mlflow_server_has_a_database_backend_and_s3_artifacts():
    docs = {d["kind"]: d for n, d in documents() if n == "mlflow.yaml"}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")
    assert args[args.index("--backend-store-uri") + 1] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert any(e["name"] == "MLFLOW_BACKEND_STORE_URI" and "secretKeyRef" in e["valueFrom"] for e in container["env"])
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
