"""The filter of candidate selection (``Selector.order``): which members may serve, with pins
and forwarded requests, with no I/O."""

from __future__ import annotations

import random

import pytest

from quorum.errors import InvalidRequest, ModelNotFound, Unavailable
from quorum.routing.membership import Member
from quorum.routing.select import RoutingPolicy, Selector
from tests.helpers import member

VIEW = [
    member("a", ("chat",), free=4),
    member("b", ("chat", "code"), queue=2, free=4),
    member("c", ("chat", "code"), free=8),
    member("d", ("code",), state="dead"),
]


def order(view: list[Member], model: str, self_name: str = "a", **kw: object) -> list[str]:
    selector = Selector(self_name, RoutingPolicy(affinity=False), rng=random.Random(1))
    return [m.name for m in selector.order(view, model, **kw)]  # type: ignore[arg-type]


def test_every_routable_node_that_serves_the_model_is_a_candidate() -> None:
    assert sorted(order(VIEW, "chat")) == ["a", "b", "c"]
    assert sorted(order(VIEW, "code")) == ["b", "c"]


def test_dead_and_warming_nodes_are_not_candidates() -> None:
    view = [
        member("a", ()),
        member("b", ("x",), node_state="warming"),
        member("c", ("x",), state="dead"),
    ]
    with pytest.raises(Unavailable):
        order(view, "x")


def test_unknown_model_is_model_not_found() -> None:
    with pytest.raises(ModelNotFound) as info:
        order(VIEW, "nope")
    assert info.value.param == "model" and info.value.code == "model_not_found"


def test_forwarded_requests_are_only_served_locally() -> None:
    assert order(VIEW, "code", self_name="b", forwarded=True) == ["b"]
    with pytest.raises(Unavailable):
        order(VIEW, "code", self_name="a", forwarded=True)
    selector = Selector("a", RoutingPolicy())
    with pytest.raises(Unavailable, match="No node can serve"):
        selector.check_forwarded(VIEW, "code")
    Selector("b", RoutingPolicy()).check_forwarded(VIEW, "code")


def test_pin_names_a_member_that_can_serve() -> None:
    assert order(VIEW, "code", pin="b") == ["b"]
    with pytest.raises(InvalidRequest):
        order(VIEW, "code", pin="zz")
    with pytest.raises(InvalidRequest):  # a does not serve "code": the pin is wrong
        order(VIEW, "code", pin="a")
    with pytest.raises(Unavailable):
        order(VIEW, "code", pin="d")
