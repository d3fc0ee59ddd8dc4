"""deploy/docker: the Dockerfile passes hadolint with no finding, the compose file passes
the compose specification's schema, and both hold what an operator relies on (three
token-mode replicas that start only after the key exists and the schema is migrated,
health checks, nginx forwarding Host and not buffering /watch). Each linter is also shown
a broken copy, so a linter that silently checks nothing fails here too.

The image itself is built and run by tests/deploy/test_docker_image.py (slow)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
NGINX = DOCKER / "nginx.conf"
KEY_PATH = "/var/lib/sbus/keys/signing.pem"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def tool(name: str) -> str:
    """A dev-extra command: beside this interpreter (the virtualenv), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed (make dev installs it)"
    return found


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    # The OCI labels are required and typed; any finding, even a style one, fails.
    return subprocess.run(
        [
            tool("hadolint"),
            "--no-color",
            "--failure-threshold",
            "style",
            "--require-label",
            "org.opencontainers.image.title:text",
            "--require-label",
            "org.opencontainers.image.version:semver",
            "--require-label",
            "org.opencontainers.image.licenses:spdx",
            str(dockerfile),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def compose() -> dict[str, Any]:
    loaded = YAML(typ="safe", pure=True).load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def default_of(value: str) -> str:
    """What ``${VAR-default}`` or ``${VAR:-default}`` becomes with VAR unset."""
    match = re.fullmatch(r"\$\{\w+:?-(.*)\}", value)
    assert match, f"{value!r} is not a variable with a default"
    return match.group(1)


# -- Dockerfile ------------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    assert not (ROOT / ".hadolint.yaml").exists()  # no blanket ignores
    done = hadolint(DOCKERFILE)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_hadolint_catches_a_broken_dockerfile(tmp_path: Path) -> None:
    text = DOCKERFILE.read_text()
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        text.replace("USER 10001:10001", "USER root").replace(
            "org.opencontainers.image.version", "org.opencontainers.image.revision"
        )
    )
    done = hadolint(broken)
    assert done.returncode == 1
    assert "DL3002" in done.stdout  # the last USER is root
    assert "org.opencontainers.image.version" in done.stdout  # required label missing


def test_dockerfile_stages_user_entrypoint_and_health_check() -> None:
    text = DOCKERFILE.read_text()
    python = PROJECT["tool"]["mypy"]["python_version"]
    assert f"ARG BASE_IMAGE=python:{python}-slim-bookworm" in text.splitlines()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.MULTILINE)
    assert stages == [("${BASE_IMAGE}", "build"), ("${BASE_IMAGE}", "runtime")]
    runtime = text.split("AS runtime", 1)[1]
    assert re.findall(r"^USER (.+)$", runtime, re.MULTILINE) == ["10001:10001"]
    assert "--mount=type=bind,from=build,source=/wheels" in runtime
    assert "--no-index" in runtime  # the runtime stage fetches nothing
    version = PROJECT["project"]["version"]
    assert f'org.opencontainers.image.version="{version}"' in runtime
    assert re.search(r"^HEALTHCHECK .*\n.*CMD \[\"python3\".*/livez", runtime, re.MULTILINE)
    assert 'ENTRYPOINT ["sbus"]' in runtime and 'CMD ["serve"]' in runtime
    assert "EXPOSE 7000" in runtime and "SBUS_HOST=0.0.0.0" in runtime


def test_dockerignore_lets_in_only_what_the_dockerfile_copies() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE):
        copied |= set(sources.split())
    assert copied == allowed == {"pyproject.toml", "README.md", "LICENSE", "service", "migrations"}
    assert "**/*.pem" in lines


# -- compose.yaml ----------------------------------------------------------------------


def test_compose_file_passes_the_compose_schema() -> None:
    done = compose_schema(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok -- validation done" in done.stdout


def test_compose_schema_catches_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    text = COMPOSE.read_text()
    assert text.count("condition: service_completed_successfully") == 2
    # A start condition the specification does not have.
    broken.write_text(text.replace("service_completed_successfully", "service_exited", 1))
    done = compose_schema(broken)
    assert done.returncode == 1
    assert "service_exited" in done.stdout


def test_three_token_mode_replicas_start_after_keygen_and_migrate() -> None:
    services = compose()["services"]
    bus = services["bus"]
    assert bus["deploy"]["replicas"] == 3
    assert bus["command"] == ["serve"]
    env = bus["environment"]
    assert env["SBUS_AUTH"] == "token"
    assert default_of(env["SBUS_SIGNING_KEY"]) == KEY_PATH
    assert bus["depends_on"] == {
        "keygen": {"condition": "service_completed_successfully"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    # Every replica reads the one key keygen writes, and cannot change it.
    assert bus["volumes"] == ["keys:/var/lib/sbus/keys:ro"]
    keygen = services["keygen"]
    assert keygen["volumes"] == ["keys:/var/lib/sbus/keys"]
    assert keygen["command"] == [f"test -e {KEY_PATH} || exec sbus token keygen {KEY_PATH}"]
    assert keygen["restart"] == "no"
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"] and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    # One image, one store and one key for the replicas and both one-shot services.
    for name in ("keygen", "migrate"):
        assert services[name]["image"] == bus["image"]
        assert services[name]["environment"] == env
    # replicas x workers x pool stays under PostgreSQL's default max_connections (100).
    workers, pool = (int(default_of(env[k])) for k in ("SBUS_WORKERS", "SBUS_PG_POOL_SIZE"))
    assert 3 * workers * pool + 1 <= 100


def test_every_long_running_service_has_a_health_check_nginx_waits_for() -> None:
    services = compose()["services"]
    for name in ("bus", "postgres", "redis", "nginx"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert "/admin/health" in " ".join(services["bus"]["healthcheck"]["test"])
    assert services["nginx"]["depends_on"] == {"bus": {"condition": "service_healthy"}}
    # Only nginx is published, and on loopback unless told otherwise: plain HTTP.
    published = {name for name, service in services.items() if "ports" in service}
    assert published == {"nginx"}
    assert services["nginx"]["ports"] == ["${SBUS_HTTP_BIND:-127.0.0.1}:${SBUS_HTTP_PORT:-8080}:80"]
    assert services["postgres"]["image"].startswith("postgres:")
    redis = services["redis"]
    assert redis["image"].startswith("redis:") and redis["profiles"] == ["redis"]
    assert redis["command"][-2:] == ["--maxmemory-policy", "noeviction"]


def test_nginx_forwards_host_and_client_and_streams_watch() -> None:
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in compose()["services"]["nginx"]["volumes"]
    text = NGINX.read_text()
    upstream = re.search(r"upstream sbus \{(.*?)\}", text, re.DOTALL)
    assert upstream and re.search(r"^\s*keepalive \d+;", upstream.group(1), re.MULTILINE)
    assert "server bus:7000 resolve;" in upstream.group(1)
    for line in (
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    ):
        assert line in text.splitlines() or f"        {line}" in text.splitlines(), line
    watch = re.search(r"location /watch \{(.*?)\}", text, re.DOTALL)
    assert watch and "proxy_buffering off;" in watch.group(1)


def test_the_env_file_with_the_password_is_never_committed() -> None:
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", "deploy/docker/.env"], cwd=ROOT, check=False
    )
    assert done.returncode == 0
    example = (DOCKER / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=\n" in example and "#SBUS_SECRET=" in example
