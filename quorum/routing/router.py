"""Choosing the node that serves a request, from the membership view.

Pure: ``candidates`` reads a list of ``Member`` records and returns them in the order to try.
"""

from __future__ import annotations

from collections.abc import Sequence

from quorum.errors import InvalidRequest, ModelNotFound, Unavailable
from quorum.routing.membership import Member

__all__ = ["candidates"]


def _score(member: Member) -> tuple[int, int, int]:
    load = member.load
    return (load.queue_depth, -load.free_slots, load.in_flight)


def candidates(
    members: Sequence[Member],
    model: str,
    *,
    self_name: str,
    pin: str | None = None,
    forwarded: bool = False,
) -> list[Member]:
    """The members to try for ``model``, best first.

    ``members``: the cluster view, this node included. ``pin``: a node name the client asked
    for (``x-quorum-pin``). ``forwarded``: the request was forwarded here by another node, so it
    is only served locally (a request is never forwarded twice).

    The local node comes first when it can serve (no hop); remote nodes follow, least loaded
    first (fewest queued, then most free slots, then fewest in flight).

    Raises ``ModelNotFound`` when no member lists the model, ``InvalidRequest`` for a pin that
    names no member, and ``Unavailable`` when members list the model but none can take it now.
    """
    serving = [m for m in members if model in m.models and m.state not in ("dead", "left")]
    if pin is not None:
        by_name = {m.name: m for m in members}
        if pin not in by_name:
            names = ", ".join(sorted(by_name))
            raise InvalidRequest(
                f"x-quorum-pin names node '{pin}', which is not a member of this cluster "
                f"(members: {names})."
            )
        node = by_name[pin]
        if model not in node.models:
            raise Unavailable(
                f"x-quorum-pin: node '{pin}' does not serve model '{model}' "
                f"(it serves: {', '.join(node.models) or 'nothing'})."
            )
        if not node.routable:
            raise Unavailable(
                f"x-quorum-pin: node '{pin}' cannot take requests now "
                f"(state {node.state}, {node.node_state})."
            )
        if forwarded and node.name != self_name:
            raise Unavailable(f"this node is not '{pin}' and does not forward twice.")
        return [node]
    if not serving and not any(model in m.models for m in members):
        raise ModelNotFound(
            f"The model '{model}' does not exist on any node of this cluster. "
            "GET /v1/models lists the models served.",
            param="model",
        )
    if forwarded:
        serving = [m for m in serving if m.name == self_name]
    ready = [m for m in serving if m.routable]
    if not ready:
        states = ", ".join(f"{m.name}: {m.state}/{m.node_state}" for m in serving) or "none alive"
        raise Unavailable(f"No node can serve model '{model}' now ({states}). Retry shortly.")
    local = [m for m in ready if m.name == self_name]
    remote = sorted((m for m in ready if m.name != self_name), key=_score)
    return local + remote
