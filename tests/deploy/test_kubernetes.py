"""deploy/kubernetes: the README's commands render it, and every object is valid Kubernetes
that runs what the code offers.

Rendering: the ``kustomize`` binary (``make deploy-tools`` installs it from the Go module
proxy), the renderer ``kubectl kustomize`` embeds; the README's blocks are run as a user
would, with ``kubectl`` replaced by a stand-in that records its arguments.

Validation: the strict JSON Schemas that the ``kubernetes-validate`` package (PyPI) ships,
generated from the OpenAPI document of each Kubernetes release (1.25 to 1.37), checked with
``jsonschema``. Strict means no field the API does not define, so a misspelt key fails
instead of being dropped by the API server. Chosen over kubeconform because the schemas
come from a registry package pinned like any test dependency: kubeconform downloads them
from GitHub at run time, which neither CI nor a developer here can reach.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from typer.main import get_command

from cdp_stream.app import Runtime, create_app
from cdp_stream.bus.memory import MemoryBus
from cdp_stream.cli import cli
from cdp_stream.profiles.db import make_engine
from cdp_stream.settings import Settings
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# The oldest Kubernetes release still maintained by most providers, and the newest one the
# schemas cover.
VERSIONS = ("1.30", "1.37")
STAGES = ("collector", "resolver", "activation", "api")
Object = dict[str, Any]


def _kustomize() -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("kustomize", path=path)
    if found is None:
        unavailable("kustomize (`make deploy-tools` installs it)")
    assert found is not None
    return found


def _block(heading: str, containing: str) -> str:
    """The README's bash block under ``heading`` that contains ``containing``."""
    section = re.split(r"\n##+ ", README.split(f"\n### {heading}\n", 1)[1], maxsplit=1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"one block with {containing!r} under {heading}"
    return found[0]


_KUBECTL = """#!/bin/sh
# Records what it is asked to do, one line per call (the arguments, tab-separated).
printf '%s\\t' "$@" >> "$KUBECTL_LOG"
printf '\\n' >> "$KUBECTL_LOG"
"""


class Workspace:
    """A copy of deploy/kubernetes in which the README's blocks run, as from a checkout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copytree(ROOT / "deploy" / "kubernetes", root / "deploy" / "kubernetes")
        (root / "bin").mkdir()
        (root / "bin" / "kubectl").write_text(_KUBECTL)
        (root / "bin" / "kubectl").chmod(0o755)
        self.log = root / "kubectl.log"
        self.overlay = root / "deploy" / "kubernetes" / "overlays" / "example"

    def run(self, script: str) -> list[list[str]]:
        """Run ``script`` with bash; the kubectl calls it made."""
        self.log.write_text("")
        path = os.pathsep.join(
            [str(self.root / "bin"), str(Path(_kustomize()).parent), os.environ["PATH"]]
        )
        env = {**os.environ, "PATH": path, "KUBECTL_LOG": str(self.log)}
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return [line.rstrip("\t").split("\t") for line in self.log.read_text().splitlines()]

    def applied(self) -> list[Object]:
        return [o for o in yaml.safe_load_all((self.overlay / "cdp-stream.yaml").read_text()) if o]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def objects(workspace: Workspace) -> list[Object]:
    """What the README's install block applies."""
    calls = workspace.run(_block("Deploying on Kubernetes", "kustomize build"))
    assert calls == [["apply", "-f", "cdp-stream.yaml"]]
    return workspace.applied()


def _named(objects: list[Object], kind: str) -> dict[str, Object]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _one(objects: list[Object], kind: str, prefix: str) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, (kind, prefix)
    return found[0]


def _pod(workload: Object) -> Object:
    spec: Object = workload["spec"]["template"]
    return spec


def _container(workload: Object) -> Object:
    containers = _pod(workload)["spec"]["containers"]
    assert len(containers) == 1
    container: Object = containers[0]
    return container


def _environment(objects: list[Object], workload: Object) -> dict[str, str]:
    """The environment a workload's container gets: its ConfigMap and Secret, then env."""
    container = _container(workload)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= _named(objects, "ConfigMap")[source["configMapRef"]["name"]]["data"]
        else:
            secret = _named(objects, "Secret")[source["secretRef"]["name"]]["data"]
            env |= {k: base64.b64decode(v).decode() for k, v in secret.items()}
    env |= {e["name"]: e["value"] for e in container.get("env", [])}
    return env


def _workloads(objects: list[Object]) -> Iterator[Object]:
    yield from (o for o in objects if o["kind"] in ("Deployment", "Job"))


def _invalid(obj: Object, version: str) -> str | None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"{obj['kind']} {obj['metadata']['name']} at {where}: {exc.message}"
    return None


def test_the_readme_deploys_every_stage(objects: list[Object]) -> None:
    for stage in STAGES:
        assert f"cdp-stream-{stage}" in _named(objects, "Deployment")
        assert f"cdp-stream-{stage}" in _named(objects, "PodDisruptionBudget")
    assert set(_named(objects, "Job")) == {"cdp-stream-migrate"}
    assert set(_named(objects, "Service")) == {"cdp-stream-collector", "cdp-stream-api"}
    assert set(_named(objects, "HorizontalPodAutoscaler")) == {"cdp-stream-collector"}
    _one(objects, "ConfigMap", "cdp-stream-")
    _one(objects, "Secret", "cdp-stream-")
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"cdp"}
    images = {_container(w)["image"] for w in _workloads(objects)}
    assert images == {"registry.example.com/cdp-stream:0.1.0"}


def test_the_readme_builds_the_image_it_deploys() -> None:
    build = _block("Deploying on Kubernetes", "docker build")
    dockerfile, tag = re.findall(r"docker build -f (\S+) -t (\S+) \.", build)[0]
    assert (ROOT / dockerfile).is_file()
    assert f"docker push {tag}" in build
    install = _block("Deploying on Kubernetes", "kustomize build")
    assert f"kustomize edit set image cdp-stream={tag}\n" in install


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_kubernetes(
    objects: list[Object], workspace: Workspace, version: str
) -> None:
    base = subprocess.run(
        [_kustomize(), "build", str(workspace.root / "deploy" / "kubernetes" / "base")],
        capture_output=True,
        text=True,
        check=True,
    )
    rendered = [*objects, *(o for o in yaml.safe_load_all(base.stdout) if o)]
    problems = [p for o in rendered if (p := _invalid(o, version))]
    assert not problems, "\n".join(problems)


def test_the_schemas_refuse_a_misspelt_field(objects: list[Object]) -> None:
    collector = copy.deepcopy(_named(objects, "Deployment")["cdp-stream-collector"])
    container = _container(collector)
    container["readinesProbe"] = container.pop("readinessProbe")
    assert _invalid(collector, VERSIONS[-1]) is not None
    assert _invalid(_named(objects, "Deployment")["cdp-stream-collector"], VERSIONS[-1]) is None


def test_every_workload_runs_a_real_cli_command(objects: list[Object]) -> None:
    commands = set(get_command(cli).commands)  # type: ignore[attr-defined]
    ran = {}
    for workload in _workloads(objects):
        args = _container(workload)["args"]
        assert args[0] in commands, workload["metadata"]["name"]
        ran[workload["metadata"]["name"]] = args
    assert ran["cdp-stream-migrate"] == ["migrate"]
    for stage in STAGES:
        assert ran[f"cdp-stream-{stage}"] == [stage]


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a process gets with exactly ``env`` as its CDP_ environment."""
    for name in [n for n in os.environ if n.startswith("CDP_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_every_setting_is_a_real_one_and_makes_a_server_deployment(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each CDP_ name in the ConfigMap, the Secret and a container's env is a Settings
    field (pydantic-settings ignores unknown ones silently), and the values parse into a
    deployment on Kafka and Postgres, not the embedded default."""
    fields = {f"CDP_{name.upper()}" for name in Settings.model_fields}
    for workload in _workloads(objects):
        env = _environment(objects, workload)
        assert set(env) <= fields, (workload["metadata"]["name"], set(env) - fields)
        settings = _settings(env, monkeypatch)
        assert not settings.embedded_postgres and not settings.postgres_bus
        assert settings.database_url == (
            "postgresql+asyncpg://cdp:CHANGE-ME@postgres.example.internal:5432/cdp"
        )
        assert settings.suppression_key is not None and settings.dmp_noise_key is not None
        assert settings.bootstrap_write_key and settings.bootstrap_api_token
        assert settings.http_host == "0.0.0.0"  # reachable from the kubelet and Prometheus


def test_consumers_scale_up_to_the_partitions_and_stop_after_committing(
    objects: list[Object],
) -> None:
    deployments = _named(objects, "Deployment")
    for stage in ("resolver", "activation"):
        deployment = deployments[f"cdp-stream-{stage}"]
        partitions = int(_environment(objects, deployment)["CDP_TOPIC_PARTITIONS"])
        assert 1 <= deployment["spec"]["replicas"] <= partitions
        # A rollout never makes the group bigger than asked.
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
        # From SIGTERM to exit, a resolver with a backlog (a 2,000-event batch in hand)
        # took 0.8 to 1.6 s on the development box: 60 s leaves room for a slow database.
        assert _pod(deployment)["spec"]["terminationGracePeriodSeconds"] >= 60


def test_http_stages_leave_the_service_before_they_stop(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grace period covers the preStop pause (while the Service drops the pod) and a
    request in flight that waits the longest for the broker (CDP_PUBLISH_TIMEOUT_S)."""
    for stage in ("collector", "api"):
        deployment = _named(objects, "Deployment")[f"cdp-stream-{stage}"]
        settings = _settings(_environment(objects, deployment), monkeypatch)
        command = _container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        grace = _pod(deployment)["spec"]["terminationGracePeriodSeconds"]
        assert grace > int(command[1]) + settings.publish_timeout_s


def test_the_collector_scales_out_on_cpu_and_the_api_keeps_its_replicas(
    objects: list[Object],
) -> None:
    deployments = _named(objects, "Deployment")
    hpa = _named(objects, "HorizontalPodAutoscaler")["cdp-stream-collector"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "cdp-stream-collector",
    }
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    # The autoscaler owns the count: a re-apply must not reset it.
    assert "replicas" not in deployments["cdp-stream-collector"]["spec"]
    assert _environment(objects, deployments["cdp-stream-collector"])["CDP_COLLECTOR_WORKERS"] == (
        "1"
    )
    assert deployments["cdp-stream-api"]["spec"]["replicas"] >= 2
    for stage in ("collector", "api"):  # a rollout never has fewer ready pods than asked
        assert (
            deployments[f"cdp-stream-{stage}"]["spec"]["strategy"]["rollingUpdate"][
                "maxUnavailable"
            ]
            == 0
        )
    for deployment in deployments.values():
        resources = _container(deployment)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_services_and_budgets_select_the_pods_of_their_stage_only(
    objects: list[Object],
) -> None:
    deployments = _named(objects, "Deployment")
    pods = {name: _pod(d)["metadata"]["labels"] for name, d in deployments.items()}
    for name, deployment in deployments.items():
        assert _selects(deployment["spec"]["selector"]["matchLabels"], pods[name])
    for kind, selector in (
        ("Service", lambda o: o["spec"]["selector"]),
        ("PodDisruptionBudget", lambda o: o["spec"]["selector"]["matchLabels"]),
    ):
        for name, obj in _named(objects, kind).items():
            chosen = [pod for pod, labels in pods.items() if _selects(selector(obj), labels)]
            assert chosen == [name], (kind, name, chosen)
            if kind == "PodDisruptionBudget":
                assert obj["spec"]["maxUnavailable"] == 1  # drains proceed, one at a time
    for name, service in _named(objects, "Service").items():
        ports = {p["name"] for p in _container(deployments[name])["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def test_pods_are_scraped_where_they_serve_metrics(objects: list[Object]) -> None:
    for name, deployment in _named(objects, "Deployment").items():
        annotations = _pod(deployment)["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        port = int(annotations["prometheus.io/port"])
        assert port in {p["containerPort"] for p in _container(deployment)["ports"]}, name
        env = _environment(objects, deployment)
        if "args" in _container(deployment) and _container(deployment)["args"][0] in (
            "resolver",
            "activation",
        ):
            assert int(env["CDP_METRICS_PORT"]) == port
        else:
            assert int(env["CDP_HTTP_PORT"]) == port


async def test_the_probes_ask_what_the_http_stages_answer(objects: list[Object]) -> None:
    """Readiness on /readyz, liveness on /healthz: with Postgres away the pod is taken out
    of its Service (503) but not restarted (200), and /metrics (the scrape) is served."""
    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none", "test")
    try:
        for stage in ("collector", "api"):
            container = _container(_named(objects, "Deployment")[f"cdp-stream-{stage}"])
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
            assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
            app = create_app(Runtime(Settings(), stage, engine, MemoryBus()), (stage,))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
                assert (await client.get("/healthz")).status_code == 200
                ready = await client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["database"].startswith("unavailable")
                assert (await client.get("/metrics")).status_code != 404, stage
    finally:
        await engine.dispose()


def test_the_readme_upgrade_runs_the_migration_first(
    objects: list[Object], workspace: Workspace
) -> None:
    calls = workspace.run(_block("Scaling and upgrades", "kubectl apply"))
    assert calls[0] == ["-n", "cdp", "delete", "job", "cdp-stream-migrate", "--ignore-not-found"]
    assert calls[1][:3] == ["apply", "-f", "cdp-stream.yaml"]
    assert calls[2][:3] == ["-n", "cdp", "wait"] and calls[2][-1] == "job/cdp-stream-migrate"
    assert calls[3] == ["apply", "-f", "cdp-stream.yaml"]
    assert len(calls) == 4
    upgraded = workspace.applied()
    label, _, value = calls[1][calls[1].index("-l") + 1].partition("=")
    chosen = [o for o in upgraded if o["metadata"].get("labels", {}).get(label) == value]
    assert [(o["kind"], o["metadata"]["name"]) for o in chosen] == [("Job", "cdp-stream-migrate")]
    images = {_container(w)["image"] for w in _workloads(upgraded)}
    assert images == {"registry.example.com/cdp-stream:0.2.0"}
    # The rest is what the install applied, with the new image.
    assert len(upgraded) == len(objects)


def test_pods_run_as_nobody_on_a_read_only_root(objects: list[Object]) -> None:
    for workload in _workloads(objects):
        pod = _pod(workload)["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 65534  # the image's USER nobody
        security = _container(workload)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"] for m in _container(workload)["volumeMounts"]}
        assert mounts == {"/tmp"}  # the one writable place (prometheus_client's files)
    assert "USER nobody" in (ROOT / "deploy" / "Dockerfile").read_text()
    for service in _named(objects, "Service").values():
        assert "type" not in service["spec"]  # ClusterIP: your ingress decides what is public


def test_the_readme_states_the_numbers_the_manifests_have(objects: list[Object]) -> None:
    deployments = _named(objects, "Deployment")
    hpa = _named(objects, "HorizontalPodAutoscaler")["cdp-stream-collector"]["spec"]
    cpu = hpa["metrics"][0]["resource"]["target"]["averageUtilization"]
    resolver, api = deployments["cdp-stream-resolver"], deployments["cdp-stream-api"]
    partitions = _environment(objects, resolver)["CDP_TOPIC_PARTITIONS"]
    consumer_grace = _pod(resolver)["spec"]["terminationGracePeriodSeconds"]
    pause = _container(api)["lifecycle"]["preStop"]["exec"]["command"][1]
    metrics_port = _environment(objects, resolver)["CDP_METRICS_PORT"]
    text = " ".join(README.split())  # as the README wraps its lines
    for claim in (
        f"the collector: {hpa['minReplicas']} to {hpa['maxReplicas']} pods on CPU ({cpu}% of the",
        f"adds pods at {cpu}% of the CPU request, up to {hpa['maxReplicas']}",
        f"{resolver['spec']['replicas']} resolvers (at most the partition count, "
        f"`CDP_TOPIC_PARTITIONS`, {partitions})",
        f"`CDP_TOPIC_PARTITIONS` partitions ({partitions})",
        f"{deployments['cdp-stream-activation']['spec']['replicas']} activation consumer",
        f"the profile API, {api['spec']['replicas']} pods",
        f"on their metrics port ({metrics_port})",
        f"within the {consumer_grace} s `terminationGracePeriodSeconds`",
        f"{pause} s (`preStop`)",
    ):
        assert claim in text, claim
