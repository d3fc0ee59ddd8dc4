"""deploy/k8s: every manifest passes ``kubernetes-validate --strict`` (offline, against the
Kubernetes versions pinned below, a warning counting as a failure); the CloudNativePG
``Cluster``, a custom resource those schemas do not cover, is NOT schema-validated: its
test checks the fields the bus relies on instead; and the manifests agree with the bus
(probe paths, port, settings, the signing key's path) and with each other (labels,
Secrets, grace period, connections at the autoscaler's maximum)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from sbus.api.auth import PUBLIC
from sbus.bootstrap import create_app
from sbus.config import Settings
from sbus.security.keys import write_keypair

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests claim to run on and the newest the pinned
# kubernetes-validate (pyproject.toml, dev extra) ships schemas for; both are bundled
# with it, so the check runs offline.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
# Files the Kubernetes schemas do not cover, and what checks them instead.
NOT_SCHEMA_VALIDATED = {
    "postgres-cluster.yaml": "CloudNativePG custom resource: test_the_cloudnativepg_cluster_*",
    "kustomization.yaml": "kustomize's own file: test_the_folder_holds_exactly_*",
}
# Validated, but left out of kustomization.yaml on purpose: the Secrets hold placeholders
# that must never overwrite real values, and the Ingress needs the operator's host.
APPLIED_SEPARATELY = {"secrets.yaml", "ingress.yaml"}

Doc = dict[str, Any]


def documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


@functools.cache
def _manifests() -> tuple[Doc, ...]:
    return tuple(
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in documents(path)
    )


def resources() -> Iterator[Doc]:
    yield from _manifests()


def the(kind: str, name: str | None = None) -> Doc:
    found = [
        doc
        for doc in resources()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in deploy/k8s"
    return found[0]


def pod_spec(kind: str) -> Doc:
    spec: Doc = the(kind)["spec"]["template"]["spec"]
    return spec


def container(kind: str) -> Doc:
    (only,) = pod_spec(kind)["containers"]
    return dict(only)


def env_of(kind: str) -> dict[str, Doc]:
    return {entry["name"]: entry for entry in container(kind).get("env", [])}


def plain_env(kind: str) -> dict[str, str]:
    return {name: e["value"] for name, e in env_of(kind).items() if "value" in e}


def secret_value(name: str, key: str) -> str:
    value: str = the("Secret", name)["stringData"][key]
    return value


def schema_problems(paths: Sequence[Path], version: str) -> list[str]:
    """What ``kubernetes-validate --strict`` finds in ``paths``: every line it prints
    that is not a pass (an ERROR, a WARN such as a kind it has no schema for, a FATAL),
    a non-zero exit, and any document it did not report as passed."""
    done = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = (done.stdout + done.stderr).splitlines()
    passes = re.compile(r"INFO \S+ passed for resource ")
    problems = [line for line in lines if not passes.match(line)]
    passed = len(lines) - len(problems)
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}")
    expected = sum(len(documents(p)) for p in paths)
    if passed != expected:
        problems.append(f"{passed} of {expected} documents reported as passed")
    return problems


def test_the_folder_holds_exactly_the_known_files() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    files = {path.name for path in K8S.iterdir()}
    listed = set(kustomization["resources"])
    assert files == listed | APPLIED_SEPARATELY | {"kustomization.yaml"}
    assert not listed & APPLIED_SEPARATELY
    assert set(NOT_SCHEMA_VALIDATED) <= files
    namespace = the("Namespace")["metadata"]["name"]
    assert kustomization["namespace"] == namespace
    for doc in resources():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    # kustomization.yaml's `images:` must name the image the pods use, or it sets nothing.
    (image,) = kustomization["images"]
    for kind in ("Deployment", "Job"):
        assert container(kind)["image"].split(":")[0] == image["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_strict_schema_validation(version: str) -> None:
    checked = sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_SCHEMA_VALIDATED)
    assert {p.name for p in checked} >= {"deployment.yaml", "secrets.yaml", "hpa.yaml"}
    assert schema_problems(checked, version) == []


def test_the_validation_fails_on_a_broken_manifest(tmp_path: Path) -> None:
    """The check above can fail: a misspelled field, a wrong type and a kind without a
    schema (a warning from the validator) are each reported."""
    text = (K8S / "deployment.yaml").read_text(encoding="utf-8")
    misspelled = tmp_path / "misspelled.yaml"
    misspelled.write_text(text.replace("readinessProbe:", "readinesProbe:"), encoding="utf-8")
    wrong_type = tmp_path / "wrong-type.yaml"
    wrong_type.write_text(text.replace("replicas: 3", 'replicas: "three"'), encoding="utf-8")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("apiVersion: example.com/v1\nkind: Nothing\nmetadata: {name: x}\n")
    problems = schema_problems([misspelled, wrong_type, unknown], KUBERNETES_VERSIONS[0])
    assert [line.split()[0:2] for line in problems[:3]] == [
        ["ERROR", str(misspelled)],
        ["ERROR", str(wrong_type)],
        ["WARN", str(unknown)],
    ]
    assert "readinesProbe" in problems[0]
    assert "'three' is not of type 'integer'" in problems[1]
    assert problems[3:] == ["exit status 1", "0 of 3 documents reported as passed"]


# The CloudNativePG Cluster: NOT schema-validated (a custom resource). -------------------


def test_the_cloudnativepg_cluster_has_what_the_bus_relies_on() -> None:
    cluster = the("Cluster")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = cluster["spec"]
    assert spec["instances"] >= 3
    assert re.fullmatch(r"[1-9][0-9]*(Mi|Gi|Ti)", spec["storage"]["size"])
    initdb = spec["bootstrap"]["initdb"]
    assert initdb["database"] and initdb["owner"]
    owner = the("Secret", initdb["secret"]["name"])
    assert owner["type"] == "kubernetes.io/basic-auth"
    assert owner["stringData"]["username"] == initdb["owner"]
    # No acknowledged commit lost on failover: a commit waits for a standby, keeps
    # waiting when none is there, and only a standby known to hold it is promoted.
    sync = spec["postgresql"]["synchronous"]
    assert sync["method"] in ("any", "first")
    assert 1 <= sync["number"] <= spec["instances"] - 1
    assert sync.get("dataDurability", "required") == "required"
    assert sync["failoverQuorum"] is True
    assert "synchronous_commit" not in spec["postgresql"].get("parameters", {})
    assert "minSyncReplicas" not in spec  # the older, self-healing form drops the wait


def test_the_store_url_points_at_the_clusters_rw_service() -> None:
    cluster = the("Cluster")
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    url = urlsplit(secret_value("sbus-store", "url"))
    assert url.scheme == "postgresql+asyncpg"
    assert url.hostname == f"{cluster['metadata']['name']}-rw"
    assert url.port == 5432
    assert url.username == initdb["owner"]
    assert url.password == the("Secret", "sbus-db-owner")["stringData"]["password"]
    assert url.path == f"/{initdb['database']}"
    for kind in ("Deployment", "Job"):
        ref = env_of(kind)["SBUS_STORE"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("sbus-store", "url")


# The manifests agree with the bus. ---------------------------------------------------


@pytest.fixture
def manifest_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Settings read from the Deployment's environment exactly as the pod would (the
    store URL from its Secret, the key file made here in place of the mounted one)."""
    for name in [n for n in os.environ if n.startswith("SBUS_")]:
        monkeypatch.delenv(name)
    for name, value in plain_env("Deployment").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SBUS_STORE", secret_value("sbus-store", "url"))
    key, _, _ = write_keypair(tmp_path / "signing-key.pem")
    monkeypatch.setenv("SBUS_SIGNING_KEY", str(key))
    return Settings()


def test_every_sbus_variable_is_a_setting() -> None:
    for kind in ("Deployment", "Job"):
        names = {name for name in env_of(kind) if name.startswith("SBUS_")}
        assert names, kind
        unknown = [n for n in names if n.removeprefix("SBUS_").lower() not in Settings.model_fields]
        assert unknown == [], f"{kind} sets variables the bus does not read: {unknown}"


def test_the_settings_parse_into_a_token_mode_replica(manifest_settings: Settings) -> None:
    s = manifest_settings
    assert (s.host, s.auth_mode, s.worker_count()) == ("0.0.0.0", "token", 1)
    assert s.own_problem() is None
    (port,) = container("Deployment")["ports"]
    assert port["containerPort"] == s.port == 7000


async def test_the_probes_are_public_routes_answering_before_the_store(
    manifest_settings: Settings,
) -> None:
    """In token mode, on the app the pod builds: liveness answers at once, readiness is
    503 until the store is connected (the app is not started here), and neither needs
    a token; a store route does."""
    c = container("Deployment")
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe")}
    probes["readinessProbe"] = c["readinessProbe"]["httpGet"]
    assert [p["path"] for p in probes.values()] == ["/livez", "/livez", "/admin/health"]
    assert {p["port"] for p in probes.values()} == {c["ports"][0]["name"]}
    assert {p["path"] for p in probes.values()} <= PUBLIC
    transport = httpx.ASGITransport(app=create_app(manifest_settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://sbus") as client:
        # Both are the app's routes (an unknown path is 404 with a problem document).
        live = await client.get("/livez")
        assert (live.status_code, live.json()) == (200, {"status": "alive"})
        health = await client.get("/admin/health")
        assert (health.status_code, health.json()["status"]) == (503, "not_ready")
        assert (await client.get("/shards")).status_code == 401


def test_the_signing_key_secret_is_mounted_where_the_setting_points() -> None:
    c, spec = container("Deployment"), pod_spec("Deployment")
    path = Path(env_of("Deployment")["SBUS_SIGNING_KEY"]["value"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert len(mounts) == 1, f"nothing mounted at {path.parent}"
    mount = mounts[0]
    assert mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    (item,) = secret["items"]
    assert item["path"] == path.name
    assert item["key"] in the("Secret", secret["secretName"])["stringData"]
    # Readable by the pod's group (fsGroup) and by no one else.
    assert secret["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]


def test_the_grace_period_outlasts_the_shutdown_delay_and_the_drain() -> None:
    env = plain_env("Deployment")
    delay, drain = float(env["SBUS_SHUTDOWN_DELAY"]), float(env["SBUS_DRAIN_TIMEOUT"])
    assert delay > 0  # endpoints and load balancers need time to stop sending
    grace = pod_spec("Deployment")["terminationGracePeriodSeconds"]
    assert grace > delay + drain


def test_the_pods_run_unprivileged_on_a_read_only_root() -> None:
    for kind in ("Deployment", "Job"):
        pod = pod_spec(kind)["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        own = container(kind)["securityContext"]
        assert own == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert pod_spec(kind)["automountServiceAccountToken"] is False
        assert container(kind)["resources"]["requests"]["memory"]


# The manifests agree with each other. ------------------------------------------------


def test_the_selectors_pick_the_bus_pods_and_only_them() -> None:
    deployment = the("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert the("Service")["spec"]["selector"] == selector
    assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    job_labels = the("Job")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= job_labels.items()  # no traffic or budget for the Job
    (port,) = the("Service")["spec"]["ports"]
    assert port["targetPort"] == container("Deployment")["ports"][0]["name"]
    backend = the("Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert (backend["name"], backend["port"]["name"]) == ("sbus", port["name"])


def test_the_autoscaler_and_the_budget_fit_the_deployment() -> None:
    deployment, hpa = the("Deployment"), the("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] >= 3
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert container("Deployment")["resources"]["requests"]["cpu"]  # utilization needs it
    budget = the("PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] < deployment["spec"]["replicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_database_has_connections_for_the_autoscalers_maximum() -> None:
    env = plain_env("Deployment")
    per_pod = int(env["SBUS_WORKERS"]) * int(env["SBUS_PG_POOL_SIZE"])
    most = the("HorizontalPodAutoscaler")["spec"]["maxReplicas"] * per_pod
    limit = int(the("Cluster")["spec"]["postgresql"]["parameters"]["max_connections"])
    # PostgreSQL keeps 3 for superusers; leave room for the Job and an operator's psql.
    assert most + 3 + 10 <= limit


def test_every_secret_reference_names_a_documented_secret_and_key() -> None:
    for kind in ("Deployment", "Job"):
        for entry in env_of(kind).values():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in the("Secret", ref["name"])["stringData"]


def test_the_guide_creates_the_secrets_the_manifests_name() -> None:
    """docs/operations.md section 5 creates every Secret with the names and keys the
    manifests read, and the store URL it builds is the one the Cluster serves."""
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = guide.split("## 5. Kubernetes", 1)[1].split("\n## 6.", 1)[0]
    assert "generic sbus-signing-key --from-file=signing-key.pem=" in section
    assert "generic sbus-db-owner --type=kubernetes.io/basic-auth" in section
    assert "--from-literal=username=sbus" in section
    url = secret_value("sbus-store", "url").replace("change-me", "$PASSWORD")
    assert f'generic sbus-store --from-literal=url="{url}"' in section
    assert "sbus token keygen signing-key.pem" in section


# Each check above can fail: a copy of the folder with one mistake is refused. ----------

BROKEN: list[tuple[str, str, str, Callable[[], None]]] = [
    (
        "deployment.yaml",
        "terminationGracePeriodSeconds: 35",
        "terminationGracePeriodSeconds: 25",
        test_the_grace_period_outlasts_the_shutdown_delay_and_the_drain,
    ),
    (
        "deployment.yaml",
        "mountPath: /etc/sbus/keys",
        "mountPath: /etc/sbus/key",
        test_the_signing_key_secret_is_mounted_where_the_setting_points,
    ),
    (
        "deployment.yaml",
        "name: SBUS_LOG_FORMAT",
        "name: SBUS_LOGFORMAT",
        test_every_sbus_variable_is_a_setting,
    ),
    (
        "deployment.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: false",
        test_the_pods_run_unprivileged_on_a_read_only_root,
    ),
    (
        "service.yaml",
        "app.kubernetes.io/component: bus\n  ports:",
        "app.kubernetes.io/component: api\n  ports:",
        test_the_selectors_pick_the_bus_pods_and_only_them,
    ),
    (
        "migrate-job.yaml",
        "app.kubernetes.io/component: migrate\n    spec:",
        "app.kubernetes.io/component: bus\n    spec:",
        test_the_selectors_pick_the_bus_pods_and_only_them,
    ),
    (
        "hpa.yaml",
        "maxReplicas: 10",
        "maxReplicas: 20",
        test_the_database_has_connections_for_the_autoscalers_maximum,
    ),
    (
        "postgres-cluster.yaml",
        "dataDurability: required",
        "dataDurability: preferred",
        test_the_cloudnativepg_cluster_has_what_the_bus_relies_on,
    ),
    (
        "postgres-cluster.yaml",
        "instances: 3",
        "instances: 1",
        test_the_cloudnativepg_cluster_has_what_the_bus_relies_on,
    ),
    (
        "secrets.yaml",
        "url: postgresql+asyncpg://sbus:change-me@sbus-db-rw:",
        "url: postgresql+asyncpg://sbus:change-me@sbus-db-ro:",
        test_the_store_url_points_at_the_clusters_rw_service,
    ),
    (
        "kustomization.yaml",
        "  - hpa.yaml\n",
        "",
        test_the_folder_holds_exactly_the_known_files,
    ),
]


@pytest.mark.parametrize(
    ("name", "before", "after", "check"),
    BROKEN,
    ids=[f"{name}:{check.__name__}" for name, _, _, check in BROKEN],
)
def test_each_check_fails_on_a_broken_manifest(
    name: str,
    before: str,
    after: str,
    check: Callable[[], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = tmp_path / "k8s"
    shutil.copytree(K8S, broken)
    text = (broken / name).read_text(encoding="utf-8")
    assert text.count(before) == 1
    (broken / name).write_text(text.replace(before, after), encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "K8S", broken)
    _manifests.cache_clear()
    try:
        with pytest.raises(AssertionError):
            check()
    finally:
        _manifests.cache_clear()
