"""Locust scenarios against a running S-Bus (open mode by default).

    .venv/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:7000
    .venv/bin/locust -f loadtest/locustfile.py --host URL --headless -u 20 -r 10 -t 30s
    SBUS_LOCUST_TOKEN=<jwt> .venv/bin/locust -f loadtest/locustfile.py --host URL --tags token

Scenarios (one User class each, tagged with its name): ``dedicated`` (each user reads its
own key, then commits it at the version read), ``hot`` (every user on one shared key),
``readheavy`` (90% GETs of a shared key, 10% read+commit of the user's own key),
``multikey`` (three own keys read, then committed together by ``POST /commit/multi``) and
``mandates`` (a key that requires a mandate: ``POST /mandates``, read, commit with it).
They need no admin right and create their keys under a per-run prefix
(``SBUS_LOCUST_PREFIX``, default ``locust/<random>/``), so runs never collide.

``token`` runs only when selected with ``--tags token``: every request carries the bearer
token in ``SBUS_LOCUST_TOKEN``; its agent needs the create, read and write rights on the
prefix (set ``SBUS_LOCUST_PREFIX`` inside the token's scopes). Each user is its own
session of that agent.

Outcomes: any 2xx is a success; a 409 is a success too, reported under the request's name
with `` [409]`` appended (a conflict is the protocol working, not an error); any other
status, or an exception (status 0), is a failure. Locust exits 1 when anything failed.
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Any
from urllib.parse import quote

from locust import FastHttpUser, constant, events, tag, task
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment

PREFIX = os.environ.get("SBUS_LOCUST_PREFIX") or f"locust/{uuid.uuid4().hex[:10]}/"
TOKEN_ENV = "SBUS_LOCUST_TOKEN"
CONTENT = "x" * 64
JSON = {"Content-Type": "application/json"}
_numbers = itertools.count()


def _scenario_tags(user: type[Any]) -> set[str]:
    return set(getattr(user, "scenario_tags", ()))


def _select_users(environment: Environment, **_: Any) -> None:
    """Keep the User classes the tags select. Locust filters tasks, not users: a user
    whose every task was filtered out would fail when spawned, and the token user must
    not run unless ``--tags token`` names it."""
    options = environment.parsed_options
    tags = set(getattr(options, "tags", None) or ())
    excluded = set(getattr(options, "exclude_tags", None) or ())
    kept = []
    for user in environment.user_classes:
        own = _scenario_tags(user)
        if tags and not own & tags:
            continue
        if not tags and "token" in own:
            continue
        if own & excluded:
            continue
        kept.append(user)
    if not kept:
        raise SystemExit("locustfile: the tags select no scenario")
    if "token" in {t for u in kept for t in _scenario_tags(u)} and not os.environ.get(TOKEN_ENV):
        raise SystemExit(f"locustfile: --tags token needs a bearer token in {TOKEN_ENV}")
    environment.user_classes[:] = kept


events.init.add_listener(_select_users)  # type: ignore[no-untyped-call]


def judge(response: ResponseContextManager) -> bool:
    """Mark the outcome (see the module docstring); True for a 2xx."""
    status = response.status_code
    if 200 <= status < 300:
        response.success()  # type: ignore[no-untyped-call]
        return True
    if status == 409:
        response.request_meta["name"] = f"{response.request_meta['name']} [409]"
        response.success()  # type: ignore[no-untyped-call]
        return False
    detail = (response.text or "")[:200] if status else repr(getattr(response, "error", None))
    response.failure(f"{status}: {detail}")  # type: ignore[no-untyped-call]
    return False


class SBusUser(FastHttpUser):
    """One agent (open mode: a fresh agent id per user) and its helpers."""

    abstract = True
    wait_time = constant(0)
    scenario_tags: tuple[str, ...] = ()

    def on_start(self) -> None:
        self.number = next(_numbers)
        self.agent = f"lc-{uuid.uuid4().hex[:12]}"
        self.session = "default"
        self.headers = dict(JSON)

    @property
    def name(self) -> str:
        return self.scenario_tags[0]

    def identity(self) -> dict[str, str]:
        """Who this request is from, as body fields."""
        return {"agent_id": self.agent}

    def query(self) -> str:
        return f"?agent_id={quote(self.agent, safe='')}"

    def create(self, key: str, **extra: Any) -> None:
        """Create ``key``; a key another user created first (409) is fine."""
        body = {"key": key, "content": CONTENT, **self.identity(), **extra}
        with self.client.post(
            "/shard",
            json=body,
            headers=self.headers,
            name=f"{self.name}: POST /shard",
            catch_response=True,
        ) as r:
            judge(r)

    def read(self, key: str) -> int | None:
        """GET the key with this agent's identity (a recorded read); its version."""
        with self.client.get(
            f"/shard/{quote(key, safe='/')}{self.query()}",
            headers=self.headers,
            name=f"{self.name}: GET /shard",
            catch_response=True,
        ) as r:
            if judge(r):
                version: int = r.json()["version"]
                return version
        return None

    def commit(self, key: str, version: int, **extra: Any) -> bool:
        body = {"key": key, "expected_version": version, "delta": CONTENT, **extra}
        body.update(self.identity())
        with self.client.post(
            "/commit",
            json=body,
            headers=self.headers,
            name=f"{self.name}: POST /commit",
            catch_response=True,
        ) as r:
            return judge(r)

    def cycle(self, key: str) -> None:
        version = self.read(key)
        if version is not None:
            self.commit(key, version)


class DedicatedKeys(SBusUser):
    """Each user reads its own key, then commits it at the version read."""

    scenario_tags = ("dedicated",)

    def on_start(self) -> None:
        super().on_start()
        self.key = f"{PREFIX}dedicated/{self.agent}"
        self.create(self.key)

    @tag("dedicated")
    @task
    def read_commit(self) -> None:
        self.cycle(self.key)


class HotKey(SBusUser):
    """Every user reads and commits one shared key: most commits are 409s."""

    scenario_tags = ("hot",)

    def on_start(self) -> None:
        super().on_start()
        self.key = f"{PREFIX}hot"
        self.create(self.key)

    @tag("hot")
    @task
    def read_commit(self) -> None:
        self.cycle(self.key)


class ReadHeavy(SBusUser):
    """90% GETs of a shared key, 10% read+commit of the user's own key."""

    scenario_tags = ("readheavy",)

    def on_start(self) -> None:
        super().on_start()
        self.shared = f"{PREFIX}readheavy/shared"
        self.key = f"{PREFIX}readheavy/{self.agent}"
        self.create(self.shared)
        self.create(self.key)
        self.turn = 0

    @tag("readheavy")
    @task
    def step(self) -> None:
        self.turn += 1
        if self.turn % 10:
            self.read(self.shared)
        else:
            self.cycle(self.key)


class MultiKey(SBusUser):
    """Three own keys read, then committed in one ``POST /commit/multi``."""

    scenario_tags = ("multikey",)

    def on_start(self) -> None:
        super().on_start()
        self.keys = [f"{PREFIX}multikey/{self.agent}/{i}" for i in range(3)]
        for key in self.keys:
            self.create(key)

    @tag("multikey")
    @task
    def read_commit_all(self) -> None:
        versions = [self.read(key) for key in self.keys]
        writes = [
            {"key": key, "expected_version": v, "delta": CONTENT}
            for key, v in zip(self.keys, versions, strict=True)
            if v is not None
        ]
        if len(writes) != len(self.keys):
            return
        with self.client.post(
            "/commit/multi",
            json={"writes": writes, **self.identity()},
            headers=self.headers,
            name="multikey: POST /commit/multi",
            catch_response=True,
        ) as r:
            judge(r)


class Mandates(SBusUser):
    """A key that requires a mandate: issue one to itself, read, commit with it."""

    scenario_tags = ("mandates",)

    def on_start(self) -> None:
        super().on_start()
        self.key = f"{PREFIX}mandates/{self.agent}"
        self.create(self.key, policy={"require_mandate": True})

    @tag("mandates")
    @task
    def mandated_commit(self) -> None:
        context = {"order": self.number, "turn": uuid.uuid4().hex[:8]}
        issue = {"holder": self.agent, "keys": [self.key], "context": context, "ttl_s": 60}
        with self.client.post(
            "/mandates",
            json={**issue, **self.identity()},
            headers=self.headers,
            name="mandates: POST /mandates",
            catch_response=True,
        ) as r:
            if not judge(r):
                return
            mandate = r.json()["mandate"]
        version = self.read(self.key)
        if version is not None:
            self.commit(self.key, version, mandate=mandate, context=context)


class TokenMode(SBusUser):
    """Token mode: the agent is the bearer token's; each user is a session of it."""

    scenario_tags = ("token",)

    def on_start(self) -> None:
        super().on_start()
        self.session = f"lc-{uuid.uuid4().hex[:12]}"
        self.headers["Authorization"] = f"Bearer {os.environ.get(TOKEN_ENV, '')}"
        self.key = f"{PREFIX}token/{self.session}"
        self.create(self.key)

    def identity(self) -> dict[str, str]:
        return {"session_id": self.session}

    def query(self) -> str:
        return f"?session_id={quote(self.session, safe='')}"

    @tag("token")
    @task
    def read_commit(self) -> None:
        self.cycle(self.key)
