"""What search's ``filter`` and list_namespaces' conditions select, as LangGraph's
``BaseStore.search`` and ``list_namespaces`` document them (the reference store,
``InMemoryStore``, is the oracle of the parity tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langgraph.store.base import MatchCondition

_ORDER = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


def _operator(value: Any, name: str, operand: Any) -> bool:
    if name == "$eq":
        return bool(value == operand)
    if name == "$ne":
        return bool(value != operand)
    compare = _ORDER.get(name)
    if compare is None:
        raise ValueError(f"unsupported filter operator: {name}")
    # Comparisons are numeric, as in the reference store (a missing field fails them).
    return bool(compare(float(value), float(operand)))


def matches(value: Any, wanted: Any) -> bool:
    """Does ``value`` satisfy the filter ``wanted``? A dict with ``$`` keys applies
    operators; another dict matches field by field (nested); a list or tuple matches
    element-wise with the same length; anything else by equality."""
    if isinstance(wanted, Mapping):
        if any(str(k).startswith("$") for k in wanted):
            return all(_operator(value, str(k), v) for k, v in wanted.items())
        if not isinstance(value, Mapping):
            return False
        return all(matches(value.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, list | tuple):
        return (
            isinstance(value, list | tuple)
            and len(value) == len(wanted)
            and all(matches(v, w) for v, w in zip(value, wanted, strict=True))
        )
    return bool(value == wanted)


def passes(item: Mapping[str, Any], filter_: Mapping[str, Any] | None) -> bool:
    return not filter_ or all(matches(item.get(k), v) for k, v in filter_.items())


def namespace_matches(condition: MatchCondition, namespace: Sequence[str]) -> bool:
    """A prefix or suffix condition, ``*`` matching any one label."""
    path = condition.path
    if len(namespace) < len(path):
        return False
    if condition.match_type == "prefix":
        pairs = zip(namespace, path, strict=False)
    elif condition.match_type == "suffix":
        pairs = zip(reversed(namespace), reversed(path), strict=False)
    else:
        raise ValueError(f"unsupported match type: {condition.match_type}")
    return all(want == "*" or got == want for got, want in pairs)
