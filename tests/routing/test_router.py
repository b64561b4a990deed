"""Candidate selection from the membership view, with no I/O."""

from __future__ import annotations

import pytest

from quorum.errors import InvalidRequest, ModelNotFound, Unavailable
from quorum.routing.membership import Member, MemberLoad
from quorum.routing.router import candidates


def member(
    name: str,
    models: tuple[str, ...],
    *,
    state: str = "alive",
    node_state: str = "ready",
    queue: int = 0,
    free: int = 4,
) -> Member:
    return Member(
        name=name,
        url=f"http://{name}",
        state=state,
        node_state=node_state,
        models=models,
        load=MemberLoad(free_slots=free, queue_depth=queue),
    )


VIEW = [
    member("a", ("chat",)),
    member("b", ("chat", "code"), queue=2),
    member("c", ("chat", "code"), free=8),
    member("d", ("code",), state="dead"),
]


def test_local_node_first_when_it_serves_the_model() -> None:
    assert [m.name for m in candidates(VIEW, "chat", self_name="a")] == ["a", "c", "b"]


def test_remote_nodes_least_loaded_first() -> None:
    assert [m.name for m in candidates(VIEW, "code", self_name="a")] == ["c", "b"]


def test_dead_and_warming_nodes_are_not_candidates() -> None:
    view = [
        member("a", ()),
        member("b", ("x",), node_state="warming"),
        member("c", ("x",), state="dead"),
    ]
    with pytest.raises(Unavailable):
        candidates(view, "x", self_name="a")


def test_unknown_model_is_model_not_found() -> None:
    with pytest.raises(ModelNotFound) as info:
        candidates(VIEW, "nope", self_name="a")
    assert info.value.param == "model" and info.value.code == "model_not_found"


def test_forwarded_requests_are_only_served_locally() -> None:
    assert [m.name for m in candidates(VIEW, "code", self_name="b", forwarded=True)] == ["b"]
    with pytest.raises(Unavailable):
        candidates(VIEW, "code", self_name="a", forwarded=True)


def test_pin_names_a_member_that_can_serve() -> None:
    assert [m.name for m in candidates(VIEW, "code", self_name="a", pin="b")] == ["b"]
    with pytest.raises(InvalidRequest):
        candidates(VIEW, "code", self_name="a", pin="zz")
    with pytest.raises(Unavailable):
        candidates(VIEW, "code", self_name="a", pin="a")
    with pytest.raises(Unavailable):
        candidates(VIEW, "code", self_name="a", pin="d")
