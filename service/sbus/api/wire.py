"""Request bodies on the wire: strict pydantic models (no ``false`` for an integer, no
number for a string), unknown fields ignored (compat; ``sbus.api.ignored`` names them
in a response header), aliases resolved before validation, and a field sent together
with its alias refused as AmbiguousField."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from fastapi import Body
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from sbus.core.keys import MAX_INT, json_problem, key_problem, prefix_problem, text_problem


def _text(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise PydanticCustomError("invalid_text", problem)
    return value


def _key(value: str) -> str:
    problem = key_problem(value)
    if problem:
        raise PydanticCustomError("invalid_key", problem)
    return value


def _prefix(value: str) -> str:
    problem = prefix_problem(value)
    if problem:
        raise PydanticCustomError("invalid_prefix", problem)
    return value


def _identifier(field: str) -> Callable[[str], str]:
    """The rule of agent and session ids (protocol.md section 1), naming its field."""

    def check(value: str) -> str:
        _text(value)
        if len(value) > 256:
            raise PydanticCustomError(
                f"invalid_{field}", f"{field}_id must be at most 256 characters"
            )
        return value

    return check


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    problem = json_problem(value)
    if problem:
        raise PydanticCustomError("invalid_json", problem)
    return value


Text = Annotated[str, AfterValidator(_text)]
Key = Annotated[str, AfterValidator(_key)]
KeyPrefix = Annotated[str, AfterValidator(_prefix)]
AgentId = Annotated[str, AfterValidator(_identifier("agent"))]
SessionId = Annotated[str, AfterValidator(_identifier("session"))]
Version = Annotated[int, Field(ge=0, le=MAX_INT)]
# Free-form JSON (a mandate context): any object that follows the input rules.
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]

# Plain ASCII decimal digits, at most 16 (2^53-1 has 16). Not str.isdigit(), which also
# takes superscripts (U+00B2, which int() then refuses with an exception) and other
# scripts' digits (U+0663, which int() reads as 3).
DIGITS = re.compile(r"[0-9]{1,16}")


def _query_digits(value: object) -> object:
    """Query strings are text, so FastAPI parses them leniently ("1.0" -> 1); the
    protocol.md's strict typing wants plain decimal digits, as in a JSON body."""
    if isinstance(value, str) and not DIGITS.fullmatch(value):
        raise PydanticCustomError("int_parsing", "must be a non-negative decimal integer")
    return value


QueryInt = Annotated[int, BeforeValidator(_query_digits)]


def _resolve_alias(data: Any, name: str, alias: str) -> Any:
    if isinstance(data, dict) and alias in data:
        if name in data:
            raise PydanticCustomError("ambiguous_field", f"send either {name} or {alias}, not both")
        data = {**data, name: data[alias]}
        del data[alias]
    return data


class WireModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    # Compat aliases, alias -> field name, resolved before validation.
    wire_aliases: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        for alias, name in cls.wire_aliases.items():
            data = _resolve_alias(data, name, alias)
        return data


class Policy(WireModel):
    require_mandate: bool = Field(
        False,
        description="Commits, rollbacks and deletes of the shard need a mandate. A re-create "
        "over a tombstone that required one requires one whatever this says.",
    )


class CreateShardBody(WireModel):
    key: Key
    content: Text
    goal_tag: Text = ""
    policy: Policy = Policy()
    agent_id: AgentId | None = None


class ReadSetItem(WireModel):
    key: Key
    version_at_read: Version


def _unique_read_set(items: list[ReadSetItem] | None) -> list[ReadSetItem] | None:
    if items:
        keys = [i.key for i in items]
        if len(set(keys)) != len(keys):
            raise PydanticCustomError("duplicate_key", "read_set lists a key more than once")
    return items


ReadSet = Annotated[list[ReadSetItem] | None, AfterValidator(_unique_read_set)]


class MandateFields(WireModel):
    mandate: Text | None = None
    context: JsonObject | None = None


class CommitBody(MandateFields):
    key: Key
    expected_version: Version | None = Field(
        None, description="Required unless If-Match is sent. Alias: expected_ver."
    )
    delta: Text = Field(description="The new content. Alias: content.")
    agent_id: AgentId | None = None
    session_id: SessionId | None = None
    read_set: ReadSet = None
    rationale: Text | None = None

    wire_aliases = {"expected_ver": "expected_version", "content": "delta"}


class MultiWrite(WireModel):
    """One write of a multi-commit, of one of three kinds (protocol.md §3.1): a commit
    `{key, expected_version, delta}`, a create `{key, create: true, delta, goal_tag?,
    policy?}` (version 0, or tombstone + 1; 409 ShardAlreadyExists if the key is live)
    or a delete `{key, delete: true, expected_version}` (a tombstone at
    expected_version + 1). A field the write's kind does not take is 422."""

    key: Key
    expected_version: Version | None = Field(
        None,
        description="A commit's and a delete's precondition (required); a create takes "
        "none. Alias: expected_ver.",
    )
    delta: Text | None = Field(
        None,
        description="The new content of a commit or a create (required); a delete takes "
        "none. Alias: content.",
    )
    create: bool = Field(False, description="true: create the key (as POST /shard).")
    delete: bool = Field(False, description="true: delete the key (as DELETE /shard/{key}).")
    goal_tag: Text | None = Field(None, description="A create's goal_tag (default: empty).")
    policy: Policy | None = Field(None, description="A create's policy (as POST /shard).")

    wire_aliases = {"expected_ver": "expected_version", "content": "delta"}


def _unique_writes(writes: list[MultiWrite]) -> list[MultiWrite]:
    if not writes:
        raise PydanticCustomError("too_short", "writes must name at least one key")
    keys = [w.key for w in writes]
    if len(set(keys)) != len(keys):
        raise PydanticCustomError("duplicate_key", "writes lists a key more than once")
    return writes


class MultiCommitBody(MandateFields):
    agent_id: AgentId | None = None
    session_id: SessionId | None = None
    writes: Annotated[list[MultiWrite], AfterValidator(_unique_writes)]
    read_set: ReadSet = None
    rationale: Text | None = None


class RollbackBody(MandateFields):
    key: Key
    target_version: Version
    agent_id: AgentId | None = None
    session_id: SessionId | None = None
    expected_version: Version | None = None
    read_set: ReadSet = None

    wire_aliases = {"expected_ver": "expected_version"}


class SessionBody(WireModel):
    agent_id: AgentId | None = None
    session_id: SessionId | None = None


def _unique_keys(keys: list[str]) -> list[str]:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise PydanticCustomError("duplicate_key", f"keys lists {key!r} more than once")
        seen.add(key)
    return keys


class ReadBody(WireModel):
    """POST /read. At most SBUS_MAX_READ_KEYS keys (422 beyond); the agent and session
    are resolved as for GET /shard/{key}."""

    keys: Annotated[
        list[Key],
        Field(min_length=1, json_schema_extra={"uniqueItems": True}),
        AfterValidator(_unique_keys),
    ]
    agent_id: AgentId | None = None
    session_id: SessionId | None = None
    record: bool = Field(True, description="false: serve without recording")


class RegisterBody(WireModel):
    agent_id: AgentId
    shards_used: list[Text]
    session_id: Text | None = Field(
        None, description="Ignored: the session comes from X-SBus-Session-Id."
    )
    source: Text | None = None


# A route that reads no field still declares this body, so its body is parsed like any
# other: malformed JSON is 400 and a JSON value that is not an object 422, with nothing
# done (a broken body used to go through as if it were empty), and unknown members are
# named like everywhere else. The docstring is the OpenAPI description.
class NoFields(WireModel):
    """No fields: send nothing or {} (with Content-Type: application/json, as every
    POST and DELETE). Members of an object sent here are ignored and named in
    SBus-Ignored-Fields; malformed JSON is 400 MalformedJSON, any JSON value other
    than an object 422 ValidationError."""

    model_config = ConfigDict(json_schema_extra={"example": {}})


# The default when no body is sent (FastAPI validates the body only when there is one).
NO_FIELDS = NoFields()
OptionalNoFields = Annotated[NoFields, Body(description="Optional: nothing, or {}.")]


class ConfigBody(WireModel):
    ori_enabled: bool


class InjectStaleBody(WireModel):
    agent_id: AgentId
    key: Key
    stale_version: Version
    session_id: SessionId | None = None


class AdvanceClockBody(WireModel):
    ms: Version


class ScopeIn(WireModel):
    pattern: str
    rights: list[str]


class MandateBody(WireModel):
    """POST /mandates. ``keys`` are patterns (the scope syntax); ``context`` is any JSON
    object, bound by its sha256 (sorted keys, compact)."""

    holder: AgentId
    keys: Annotated[list[Text], Field(min_length=1, max_length=256)]
    context: JsonObject = Field(default_factory=dict)
    ttl_s: Annotated[int, Field(ge=1, le=MAX_INT)]
    agent_id: AgentId | None = None


class RevokeBody(WireModel):
    """POST /admin/tokens/revoke. ``exp`` (epoch seconds) bounds how long the jti is
    kept; without it the deployment's SBUS_TOKEN_MAX_TTL from now is used, which
    outlives any token that could carry the jti."""

    jti: Annotated[Text, Field(min_length=1, max_length=256)]
    exp: Version | None = None


class TokenBody(WireModel):
    """POST /admin/tokens. Patterns and rights are checked by ``sbus.security``."""

    agent: str
    scopes: list[ScopeIn] = Field(max_length=256)
    ttl_s: int
