"""deploy/: the Compose file and the Kubernetes manifests, validated offline against their
schemas, and checked to wire the front to the GPU Service the way the e2e tests run them."""

from __future__ import annotations

from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from devtools.harness import ROOT
from sdxl_controlnet.metrics import JOBS_WAITING
from sdxl_controlnet.settings import Settings

DEPLOY = ROOT / "deploy"
# The oldest Kubernetes release the manifests are meant for (docs/deployment.md), and the
# newest: the preStop pause is an `exec` of sleep, not the `sleep` action of 1.30.
KUBERNETES_VERSIONS = ["1.27.0", "1.33.0"]
# Settings that only one Service reads, or that differ between them by design.
PER_SERVICE = {"FRONT_WORKERS", "MAX_QUEUE", "GPUS", "GPU_TYPE", "ALLOW_CPU"}
# The job store's settings: the front's alone.
PER_SERVICE |= {name.upper() for name in Settings.model_fields if name.startswith("job_")}
SHARED = {name.upper() for name in Settings.model_fields} - PER_SERVICE

COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
MANIFESTS = [
    resource
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    for resource in yaml.safe_load_all(path.read_text())
]


def of_kind(kind: str) -> list[dict]:
    return [resource for resource in MANIFESTS if resource["kind"] == kind]


def option(args: list[str], name: str) -> str:
    """The value after ``name`` in a command line."""
    return args[args.index(name) + 1]


def depends_url(args: list[str]) -> tuple[str, int]:
    """Host and port of the front's `--depends SDXLControlNetService=URL`."""
    service, url = option(args, "--depends").split("=", 1)
    assert service == "SDXLControlNetService"
    parts = urlsplit(url)
    return parts.hostname, parts.port


def running(service_name: str) -> tuple[dict, dict]:
    """The one Deployment, and its container, that runs the BentoML Service ``service_name``."""
    (found,) = [
        (deployment, container)
        for deployment in of_kind("Deployment")
        for container in deployment["spec"]["template"]["spec"]["containers"]
        if option(container["args"], "--service-name") == service_name
    ]
    return found


def selects(service: dict, deployment: dict) -> bool:
    return service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_compose_file_follows_the_compose_specification() -> None:
    jsonschema.validate(COMPOSE, get_builtin_schema("vendor.compose-spec"))


def test_compose_runs_both_services_from_one_image_and_reserves_the_gpu() -> None:
    gpu, front = COMPOSE["services"]["gpu"], COMPOSE["services"]["front"]
    assert gpu["image"] == front["image"]
    assert option(gpu["command"], "--service-name") == "SDXLControlNetService"
    assert option(front["command"], "--service-name") == "ControlNet"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert "ports" not in gpu
    (volume,) = gpu["volumes"]
    name, path = volume.split(":")
    assert name in COMPOSE["volumes"]
    assert gpu["environment"]["BENTOML_HF_CACHE_DIR"].startswith(path + "/")


def test_compose_front_depends_on_the_gpu_service_by_name_and_port() -> None:
    gpu, front = COMPOSE["services"]["gpu"], COMPOSE["services"]["front"]
    assert depends_url(front["command"]) == ("gpu", int(option(gpu["command"], "--port")))
    assert "gpu" in front["depends_on"]


class ComposeOverrideLoader(yaml.SafeLoader):
    """Reads Compose's merge tags: ``!reset`` empties a value, ``!override`` replaces it."""


ComposeOverrideLoader.add_constructor("!reset", lambda loader, node: None)
ComposeOverrideLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_sequence(node)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node)
    ),
)


def test_compose_cpu_override_swaps_image_and_model_and_drops_only_the_gpu() -> None:
    """deploy/docker-compose.cpu.yaml, run for real by `make image-test`."""
    cpu = yaml.load((DEPLOY / "docker-compose.cpu.yaml").read_text(), ComposeOverrideLoader)
    gpu, front = cpu["services"]["gpu"], cpu["services"]["front"]
    assert set(cpu["services"]) == set(COMPOSE["services"])
    assert gpu["image"] == front["image"] and "sdxl-controlnet-cpu:latest" in gpu["image"]
    assert gpu["deploy"] is None  # !reset: no GPU to reserve
    (volume,) = gpu["volumes"]
    source, mount, mode = volume.split(":")
    assert (DEPLOY / source).resolve() == ROOT / "models" / "tiny" and mode == "ro"
    models = {k: v for k, v in gpu["environment"].items() if k.startswith("SDXL_")}
    assert models == {
        "SDXL_BASE_MODEL": f"{mount}/base",
        "SDXL_CONTROLNET_MODEL": f"{mount}/controlnet",
        "SDXL_VAE_MODEL": f"{mount}/vae",
        "SDXL_PREVIEW_MODEL": f"{mount}/preview",
    }
    assert "command" not in gpu and "command" not in front  # the base file's commands


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "resource", MANIFESTS, ids=lambda r: f"{r['kind']}/{r['metadata']['name']}"
)
def test_kubernetes_manifest_is_valid(resource: dict, version: str) -> None:
    kubernetes_validate.validate(resource, version, strict=True)


def test_kubernetes_runs_each_service_from_one_image_the_gpu_one_on_a_gpu() -> None:
    _, gpu = running("SDXLControlNetService")
    _, front = running("ControlNet")
    assert gpu["image"] == front["image"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in front["resources"]["limits"]


def test_kubernetes_front_depends_on_the_gpu_services_name_and_port() -> None:
    gpu_deployment, _ = running("SDXLControlNetService")
    _, front = running("ControlNet")
    host, port = depends_url(front["args"])
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == host]
    assert selects(service, gpu_deployment)
    assert [p["port"] for p in service["spec"]["ports"]] == [port]


@pytest.mark.parametrize("deployment", of_kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_kubernetes_deployment_is_probed_exposed_scaled_and_not_root(deployment: dict) -> None:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert any(selects(service, deployment) for service in of_kind("Service"))
    scaled = [hpa["spec"]["scaleTargetRef"]["name"] for hpa in of_kind("HorizontalPodAutoscaler")]
    assert scaled.count(deployment["metadata"]["name"]) == 1


def env(container: dict) -> dict[str, str]:
    """A container's variables with a value of their own (not those read from a Secret)."""
    return {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}


def test_compose_front_keeps_its_jobs_in_the_compose_redis() -> None:
    front, redis = COMPOSE["services"]["front"], COMPOSE["services"]["redis"]
    store = urlsplit(front["environment"]["JOB_STORE_URL"])
    assert (store.scheme, store.hostname, store.port) == ("redis", "redis", 6379)
    assert front["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in redis  # it holds webhook secrets: the front reaches it, no one else
    args = redis["command"]
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--maxmemory-policy") == "noeviction"
    (volume,) = redis["volumes"]
    name, path = volume.split(":")
    assert name in COMPOSE["volumes"] and option(args, "--dir") == path


def test_kubernetes_front_pods_share_the_redis_that_keeps_its_data() -> None:
    _, front = running("ControlNet")
    store = urlsplit(env(front)["JOB_STORE_URL"])
    (redis,) = of_kind("StatefulSet")
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == store.hostname]
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in service["spec"]["ports"]] == [store.port]
    # The password in the URL is the Secret's, the one Redis requires.
    (password,) = [v for v in front["env"] if v["name"] == "REDIS_PASSWORD"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    (required,) = [v for v in container["env"] if v["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"] == required["valueFrom"]
    assert store.password == "$(REDIS_PASSWORD)"
    assert option(container["args"], "--requirepass") == "$(REDIS_PASSWORD)"
    assert option(container["args"], "--appendonly") == "yes"
    assert option(container["args"], "--maxmemory-policy") == "noeviction"
    assert container["volumeMounts"][0]["mountPath"] == "/data"


def test_kubernetes_jobs_run_at_once_one_per_gpu_replica_at_most() -> None:
    _, front = running("ControlNet")
    (gpu_scaler,) = [
        hpa
        for hpa in of_kind("HorizontalPodAutoscaler")
        if hpa["spec"]["scaleTargetRef"]["name"]
        == running("SDXLControlNetService")[0]["metadata"]["name"]
    ]
    assert Settings.from_env(env(front)).job_concurrency == gpu_scaler["spec"]["maxReplicas"]


@pytest.mark.parametrize("service_name", ["SDXLControlNetService", "ControlNet"])
def test_kubernetes_lets_a_generation_in_flight_finish_on_shutdown(service_name: str) -> None:
    deployment, container = running(service_name)
    timeout_s = Settings.from_env(env(container)).generation_timeout_s
    waits_s = timeout_s if service_name == "SDXLControlNetService" else timeout_s + 30
    pre_stop_s = pre_stop_pause_s(container)
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s >= pre_stop_s + waits_s


def pre_stop_pause_s(container: dict) -> int:
    """The preStop pause: `sleep N` run in the container, which any Kubernetes runs."""
    pre_stop = container["lifecycle"]["preStop"]
    assert "sleep" not in pre_stop, "the sleep action needs Kubernetes 1.30"
    command, seconds = pre_stop["exec"]["command"]
    assert command == "sleep"
    return int(seconds)


def shared(settings: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in settings.items() if name in SHARED}


def test_kubernetes_front_and_gpu_set_the_settings_both_read_alike() -> None:
    _, gpu = running("SDXLControlNetService")
    _, front = running("ControlNet")
    assert shared(env(gpu)) == shared(env(front))
    assert {"GENERATION_TIMEOUT_S", "MAX_STEPS", "MAX_OUTPUT_PIXELS"} <= set(shared(env(front)))


def test_compose_front_and_gpu_set_the_settings_both_read_alike() -> None:
    gpu, front = COMPOSE["services"]["gpu"], COMPOSE["services"]["front"]
    assert shared(gpu["environment"]) == shared(front["environment"])
    assert "GENERATION_TIMEOUT_S" in shared(front["environment"])


def test_compose_front_runs_one_worker_per_cpu_it_may_use() -> None:
    front = COMPOSE["services"]["front"]
    assert Settings.from_env(front["environment"]).front_workers == front["cpus"]


def test_kubernetes_front_runs_one_worker_per_cpu_of_its_limit() -> None:
    _, front = running("ControlNet")
    cpus = front["resources"]["limits"]["cpu"]
    assert front["resources"]["requests"]["cpu"] == cpus
    assert Settings.from_env(env(front)).front_workers == int(cpus)


def test_kubernetes_gpu_start_up_allows_download_and_compile_and_keeps_the_caches() -> None:
    _, gpu = running("SDXLControlNetService")
    probe = gpu["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 30 * 60
    mounted = [mount["mountPath"] for mount in gpu["volumeMounts"]]
    for cache in ("BENTOML_HF_CACHE_DIR", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        assert any(env(gpu)[cache].startswith(path + "/") for path in mounted), cache


def test_keda_example_scales_the_gpu_deployment_on_the_waiting_jobs_metric() -> None:
    (scaled,) = yaml.safe_load_all(
        (DEPLOY / "kubernetes" / "keda" / "gpu-scaledobject.yaml").read_text()
    )
    gpu_deployment, _ = running("SDXLControlNetService")
    (gpu_scaler,) = [
        h
        for h in of_kind("HorizontalPodAutoscaler")
        if h["metadata"]["name"] == scaled["metadata"]["name"]
    ]
    assert scaled["spec"]["scaleTargetRef"]["name"] == gpu_deployment["metadata"]["name"]
    assert gpu_scaler["spec"]["scaleTargetRef"]["name"] == gpu_deployment["metadata"]["name"]
    assert scaled["spec"]["maxReplicaCount"] == gpu_scaler["spec"]["maxReplicas"]
    behaviour = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behaviour == gpu_scaler["spec"]["behavior"]
    queries = [trigger["metadata"]["query"] for trigger in scaled["spec"]["triggers"]]
    (waiting,) = JOBS_WAITING.describe()
    assert f"max({waiting.name})" in queries
