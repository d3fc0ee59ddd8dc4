"""Rights, scopes and capability sets (protocol.md §5).

A :class:`Scope` grants some rights on the keys matching one pattern; a
:class:`Capabilities` value is what one request may do. Rights are independent: ``admin``
implies no other right, and no right lets one agent act as another. ``admin`` is only
valid with the pattern ``**`` because it guards endpoints, not keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from sbus.core.errors import ValidationFailed
from sbus.core.patterns import (
    MAX_PATTERNS,
    Matcher,
    check_pattern_budget,
    compile_pattern,
    pattern_set,
    validate_pattern,
)

ADMIN_PATTERN = "**"
MAX_SCOPES = MAX_PATTERNS


class Right(StrEnum):
    READ = "read"
    WRITE = "write"
    CREATE = "create"
    DELETE = "delete"
    MANDATE = "mandate"
    ADMIN = "admin"


ALL_RIGHTS = frozenset(Right)


def parse_right(name: str, *, loc: list[str | int] | None = None) -> Right:
    try:
        return Right(name)
    except ValueError:
        known = ", ".join(r.value for r in Right)
        raise ValidationFailed(f"unknown right {name!r} (known: {known})", loc=loc) from None


@dataclass(frozen=True, slots=True)
class Scope:
    """``rights`` on every key matching ``pattern``. Validated on construction
    (:class:`ValidationFailed` / :class:`InvalidPattern`, both 422)."""

    pattern: str
    rights: frozenset[Right]

    def __post_init__(self) -> None:
        validate_pattern(self.pattern, loc=["pattern"])
        if not self.rights:
            raise ValidationFailed("a scope needs at least one right", loc=["rights"])
        if not all(isinstance(r, Right) for r in self.rights):
            raise ValidationFailed("rights must be Right values", loc=["rights"])
        if Right.ADMIN in self.rights and self.pattern != ADMIN_PATTERN:
            raise ValidationFailed(
                f"the admin right is only valid with the pattern {ADMIN_PATTERN!r}",
                loc=["rights"],
            )

    @classmethod
    def of(cls, pattern: str, *rights: Right | str) -> Scope:
        return cls(pattern, frozenset(parse_right(str(r)) for r in rights))

    def covers(self, right: Right, key: str) -> bool:
        return right in self.rights and compile_pattern(self.pattern)(key)

    def to_json(self) -> dict[str, Any]:
        """The wire form inside a token's ``scopes`` claim: rights in a stable order."""
        return {"pattern": self.pattern, "rights": [r.value for r in Right if r in self.rights]}

    @classmethod
    def from_json(cls, value: object, *, loc: list[str | int] | None = None) -> Scope:
        """Strict inverse of :meth:`to_json`: exactly ``pattern`` (string) and ``rights``
        (non-empty list of known right names); raises :class:`ValidationFailed`."""
        where = loc or []
        if not isinstance(value, Mapping) or set(value) != {"pattern", "rights"}:
            raise ValidationFailed("a scope is exactly {pattern, rights}", loc=where)
        pattern, rights = value["pattern"], value["rights"]
        if not isinstance(pattern, str):
            raise ValidationFailed("pattern must be a string", loc=[*where, "pattern"])
        if not isinstance(rights, list) or not all(isinstance(r, str) for r in rights):
            raise ValidationFailed("rights must be a list of strings", loc=[*where, "rights"])
        parsed = frozenset(parse_right(r, loc=[*where, "rights"]) for r in rights)
        return cls(pattern, parsed)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a request may do: the union of its scopes."""

    scopes: tuple[Scope, ...] = ()
    # right -> one matcher over every pattern holding it (a multi checks 128 keys),
    # built on first use: most requests need one or two rights.
    _matchers: dict[Right, Matcher] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def allows(self, right: Right, key: str) -> bool:
        matcher = self._matchers.get(right)
        if matcher is None:
            matcher = self._matchers[right] = pattern_set(self.patterns_with(right))
        return matcher(key)

    @property
    def is_admin(self) -> bool:
        return any(Right.ADMIN in scope.rights for scope in self.scopes)

    def patterns_with(self, right: Right) -> tuple[str, ...]:
        """The patterns this capability set holds ``right`` on, in scope order."""
        return tuple(scope.pattern for scope in self.scopes if right in scope.rights)

    def to_json(self) -> list[dict[str, Any]]:
        return [scope.to_json() for scope in self.scopes]


def open_capabilities(*, admin_enabled: bool) -> Capabilities:
    """Open mode: every right on every key, admin only when ``SBUS_ADMIN_ENABLED``."""
    rights = ALL_RIGHTS if admin_enabled else ALL_RIGHTS - {Right.ADMIN}
    return Capabilities((Scope(ADMIN_PATTERN, rights),))


class Principal(Protocol):
    """Who acts and with what rights: :class:`sbus.security.tokens.Claims` in token mode,
    :class:`Identity` in open mode."""

    @property
    def agent(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...


@dataclass(frozen=True, slots=True)
class Identity:
    agent: str
    capabilities: Capabilities


def parse_allow(spec: str) -> Scope:
    """The CLI's ``--allow`` syntax: ``RIGHTS:PATTERN`` with RIGHTS comma-separated, e.g.
    ``read:plan/*`` or ``write,create:code/A/*``. Only the first ``:`` separates (keys may
    contain ``:``). Raises :class:`ValidationFailed`."""
    rights_part, sep, pattern = spec.partition(":")
    if not sep or not rights_part.strip() or not pattern:
        raise ValidationFailed(f"--allow {spec!r}: expected RIGHTS:PATTERN, e.g. 'read:plan/*'")
    names = [name.strip() for name in rights_part.split(",")]
    if any(not name for name in names):
        raise ValidationFailed(f"--allow {spec!r}: empty right name")
    return Scope(pattern, frozenset(parse_right(name) for name in names))


def scopes_from_json(value: object) -> tuple[Scope, ...]:
    """A ``scopes`` claim or request field: a list of at most :data:`MAX_SCOPES` scopes."""
    if not isinstance(value, list):
        raise ValidationFailed("scopes must be a list", loc=["scopes"])
    if len(value) > MAX_SCOPES:
        raise ValidationFailed(f"at most {MAX_SCOPES} scopes", loc=["scopes"])
    return check_scopes(Scope.from_json(item, loc=["scopes", i]) for i, item in enumerate(value))


def check_scopes(scopes: Iterable[Scope]) -> tuple[Scope, ...]:
    out = tuple(scopes)
    if len(out) > MAX_SCOPES:
        raise ValidationFailed(f"at most {MAX_SCOPES} scopes", loc=["scopes"])
    if not all(isinstance(s, Scope) for s in out):
        raise ValidationFailed("scopes must be Scope values", loc=["scopes"])
    check_pattern_budget([s.pattern for s in out], what="scopes", loc=["scopes"])
    return out


__all__ = [
    "ADMIN_PATTERN",
    "ALL_RIGHTS",
    "Capabilities",
    "Identity",
    "Principal",
    "Right",
    "Scope",
    "check_scopes",
    "open_capabilities",
    "parse_allow",
    "parse_right",
    "scopes_from_json",
]
