"""The SDK at its edges, as a careless or adversarial caller meets it: keys that URL
normalisation would rewrite, arguments of the wrong type, exceptions that cross process
boundaries. Each runs against the in-process bus (the real server app)."""

from __future__ import annotations

import pytest

from sbus_client import ShardNotFound, ValidationError
from tests.client.behaviour import BusFactory


@pytest.mark.parametrize("key", ["../admin/health", "a/../k", "./k", "a/.", "k/.."])
def test_dot_segments_reach_the_bus_as_written(make_bus: BusFactory, key: str) -> None:
    """A "." or ".." segment is refused by the bus (422), not resolved by the client
    into another path: "a/../k" must not read k, "../admin/health" must not reach the
    health route."""
    bus = make_bus()
    with bus.session() as s:
        s.create("k", "secret")
        for call in (
            lambda: s.read(key),
            lambda: s.read(key, record=False),
            lambda: s.history(key),
            lambda: s.delete(key, expected=0),
        ):
            with pytest.raises(ValidationError) as caught:
                call()
            assert caught.value.status == 422
            assert "'.' or '..'" in caught.value.detail
        assert s.read("k").version == 0  # the delete reached nothing


def test_a_key_that_is_not_a_str_is_a_type_error(make_bus: BusFactory) -> None:
    bus = make_bus()
    with bus.session() as s:
        with pytest.raises(TypeError, match="a key is a str, not int"):
            s.read(5)  # type: ignore[arg-type]
        with pytest.raises(ShardNotFound):
            s.read("a.b/c..d")  # dots inside a segment are plain key characters
