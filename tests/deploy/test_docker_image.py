"""The image of deploy/docker/Dockerfile, built and run here (slow: ``make test-slow``).

No image registry is reachable from these machines, so the base is made locally:
mmdebstrap writes a Debian bookworm root file system with Debian's python3 and
python3-venv (the Dockerfile's other supported kind of base, beside the official slim
image) to a tarball, cached between runs (``SBUS_IMAGE_CACHE``, default
``/var/tmp/sbus-image-cache``, keyed by the recipe), and ``podman import`` makes it
``localhost/sbus-base:bookworm-<key>``. podman then builds the image with
``--build-arg BASE_IMAGE=`` that base, and the test runs what compose.yaml runs: the
keygen command, ``sbus migrate`` against the suite's PostgreSQL, and ``sbus serve`` in
token mode on the host network, then checks /livez, the image's own health check, the
non-root user, a token minted with ``sbus token issue`` in the image, one create and
one commit.

podman, runc and mmdebstrap are installed with apt when missing. A machine that cannot
build or run the image fails this test with podman's own words; nothing is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from sbus.storage.sql.postgres import asyncpg_dsn
from tests import backends
from tests.sse import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SBUS_IMAGE_CACHE", "/var/tmp/sbus-image-cache"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Certificates the machine added to its trust store (a TLS-inspecting egress proxy's,
# for one) go into the base too, so that pip in the build trusts what the host trusts.
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
IMAGE = "localhost/sbus:slow-test"
KEYS = "/var/lib/sbus/keys"
KEY = f"{KEYS}/signing.pem"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def capped(limit: int, most: int) -> int:
    hard = resource.getrlimit(limit)[1]
    return most if hard == resource.RLIM_INFINITY else min(most, hard)


# podman asks the OCI runtime to raise RLIMIT_NOFILE to 1048576, which needs
# CAP_SYS_RESOURCE ("setrlimit `RLIMIT_NOFILE`: Operation not permitted" in a sandbox
# without it): ask for no more than this process has. crun refuses a hybrid cgroup
# hierarchy ("cgroups in hybrid mode not supported"); runc runs on every kind.
RUNTIME = ["--runtime", "runc"]
LIMITS = [
    "--ulimit",
    f"nofile={capped(resource.RLIMIT_NOFILE, 8192)}:{capped(resource.RLIMIT_NOFILE, 8192)}",
    "--ulimit",
    f"nproc={capped(resource.RLIMIT_NPROC, 4096)}:{capped(resource.RLIMIT_NPROC, 4096)}",
]


def run(
    args: list[str], *, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    if check and done.returncode != 0:
        pytest.fail(
            f"{' '.join(args[:3])} ... exited {done.returncode}:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
            pytrace=False,
        )
    return done


def podman(
    *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], timeout=timeout, check=check)


def ensure_tools() -> None:
    missing = [name for name in ("podman", "runc", "mmdebstrap") if shutil.which(name) is None]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for args in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
            done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
            assert done.returncode == 0, f"{' '.join(args)}:\n{done.stderr[-3000:]}"


def base_tarball() -> Path:
    """The mmdebstrap root file system, made once per recipe and kept in CACHE."""
    local = sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []
    recipe = hashlib.sha256(
        json.dumps([SUITE, MIRROR, PACKAGES, [p.read_bytes().hex() for p in local]]).encode()
    ).hexdigest()[:12]
    tarball = CACHE / f"sbus-base-{SUITE}-{recipe}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob(f"sbus-base-{SUITE}-*.tar"):
        stale.unlink()
    partial = tarball.with_suffix(".partial.tar")
    hooks = []
    if local:
        hooks = [
            f"--customize-hook=copy-in {' '.join(str(p) for p in local)} {LOCAL_CAS}",
            '--customize-hook=chroot "$1" update-ca-certificates',
        ]
    run(
        [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            *hooks,
            SUITE,
            str(partial),
            MIRROR,
        ],
        timeout=900,
    )
    partial.rename(tarball)
    return tarball


def base_image() -> str:
    tarball = base_tarball()
    tag = f"localhost/sbus-base:{tarball.stem.removeprefix('sbus-base-')}"
    if podman("image", "exists", tag, check=False).returncode != 0:
        podman("import", str(tarball), tag)
    return tag


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    ensure_tools()
    started = time.monotonic()
    base = base_image()
    based = time.monotonic()
    before = podman("image", "inspect", IMAGE, "--format", "{{.Id}}", check=False).stdout.strip()
    podman(
        "build",
        *RUNTIME,
        *LIMITS,
        "--network=host",
        "--format=docker",  # keeps HEALTHCHECK, which the OCI format has no field for
        f"--build-arg=BASE_IMAGE={base}",
        "--file=deploy/docker/Dockerfile",
        f"--tag={IMAGE}",
        ".",
        timeout=1200,
    )
    done = time.monotonic()
    if before and before != podman("image", "inspect", IMAGE, "--format", "{{.Id}}").stdout.strip():
        podman("rmi", before, check=False)  # the image this build replaced under the tag
    size = podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip()
    print(
        f"\ndocker image: base {based - started:.1f} s, podman build {done - based:.1f} s, "
        f"{int(size) / 1e6:.0f} MB ({IMAGE} on {base})"
    )
    yield IMAGE


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A database of its own on the suite's PostgreSQL, dropped afterwards."""
    await backends.require("postgres")
    name = f"sbus_docker_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(backends.POSTGRES_URL))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield re.sub(r"/[^/?]*(\?|$)", rf"/{name}\1", backends.POSTGRES_URL, count=1)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """The keys volume: a directory only the image's user (10001) may enter."""
    path = tmp_path / "keys"
    path.mkdir(mode=0o700)
    os.chown(path, 10001, 10001)
    return path


def wait_for(url: str, name: str, status: int) -> httpx.Response:
    """Poll ``url`` until it answers ``status``; fail with the container's log if the
    container stops or a minute passes."""
    deadline = time.monotonic() + 60
    while True:
        try:
            answer = httpx.get(url, timeout=5)
            if answer.status_code == status:
                return answer
        except httpx.TransportError:
            pass
        state = podman("inspect", name, "--format", "{{.State.Status}}", check=False).stdout
        if state.strip() != "running" or time.monotonic() > deadline:
            log = podman("logs", name, check=False)
            pytest.fail(f"{url} never answered {status} ({state.strip()}):\n{log.stderr[-3000:]}")
        time.sleep(0.5)


async def test_image_migrates_serves_and_commits_in_token_mode(
    image: str, database: str, keys: Path
) -> None:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["sbus"] and config["Cmd"] == ["serve"]
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION
    assert "/livez" in " ".join(inspected["Healthcheck"]["Test"])
    assert "7000/tcp" in config["ExposedPorts"]
    assert podman("run", "--rm", *RUNTIME, *LIMITS, image, "--version").stdout == f"{VERSION}\n"

    # compose.yaml's keygen command: writes the key once, leaves it alone afterwards.
    volume = ["--volume", f"{keys}:{KEYS}"]
    keygen = [
        "--entrypoint",
        "/bin/sh",
        image,
        "-c",
        f"test -e {KEY} || exec sbus token keygen {KEY}",
    ]
    podman("run", "--rm", *RUNTIME, *LIMITS, *volume, *keygen)
    written = (keys / "signing.pem").read_bytes()
    assert (keys / "signing.pem").stat().st_mode & 0o777 == 0o600
    assert (keys / "signing.pem").stat().st_uid == 10001
    podman("run", "--rm", *RUNTIME, *LIMITS, *volume, *keygen)
    assert (keys / "signing.pem").read_bytes() == written

    store = ["--network=host", "--env", f"SBUS_STORE={database}"]
    migrated = podman("run", "--rm", *RUNTIME, *LIMITS, *store, image, "migrate")
    assert "is at the newest revision" in migrated.stderr

    port = free_port()
    name = f"sbus-slow-{uuid.uuid4().hex[:8]}"
    signing = ["--env", f"SBUS_SIGNING_KEY={KEY}", "--volume", f"{keys}:{KEYS}:ro"]
    podman(
        "run", "--detach", "--name", name, *RUNTIME, *LIMITS, *store, *signing,
        "--env", f"SBUS_PORT={port}", "--env", "SBUS_WORKERS=2", "--env", "SBUS_PG_POOL_SIZE=2",
        "--health-interval=disable",  # no systemd timers here; run it by hand below
        image,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(f"{base}/livez", name, 200).status_code == 200
        ready = wait_for(f"{base}/admin/health", name, 200).json()
        assert ready["status"] == "ok", ready
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        state = podman("inspect", name, "--format", "{{.State.Health.Status}}").stdout
        assert state.strip() == "healthy"
        assert podman("exec", name, "id", "-u").stdout == "10001\n"
        log = podman("logs", name).stderr
        assert f"sbus {VERSION}: token mode, store postgresql+asyncpg://" in log
        assert f"http://0.0.0.0:{port} (2 workers)" in log

        token = podman(
            "run", "--rm", *RUNTIME, *LIMITS, *signing, image,
            "token", "issue", "--agent", "smoke", "--allow", "read,write,create:smoke/**",
        ).stdout.strip()  # fmt: skip
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            refused = await client.post("/shard", json={"key": "smoke/a", "content": "v0"})
            assert (refused.status_code, refused.json()["error"]) == (401, "Unauthorized")
            created = await client.post(
                "/shard", json={"key": "smoke/a", "content": "v0"}, headers=auth
            )
            assert created.status_code == 201, created.text
            assert created.json()["version"] == 0
            committed = await client.post(
                "/commit",
                json={"key": "smoke/a", "expected_version": 0, "delta": "v1"},
                headers=auth,
            )
            assert committed.status_code == 200, committed.text
            assert committed.json()["new_version"] == 1
            read = await client.get("/shard/smoke/a", headers=auth)
            assert (read.status_code, read.json()["content"], read.json()["version"]) == (
                200,
                "v1",
                1,
            )
        # `docker stop`: SIGTERM to sbus as the container's process 1, which ignores any
        # signal it has no handler for; the graceful stop runs and the status is 0.
        podman("stop", "--time=30", name)
        state = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout
        assert state.strip() == "0", podman("logs", name).stderr
        stopped = podman("logs", name).stderr
        assert "SIGTERM: shutting down" in stopped, stopped
    finally:
        podman("rm", "--force", "--time=10", name, check=False)
