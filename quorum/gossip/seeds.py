"""Seeds by name: turning ``host:port`` seeds into the addresses to join through.

A seed may be a DNS name rather than an address: a Kubernetes headless Service
(``quorum-gossip.quorum.svc.cluster.local``) answers with one A/AAAA record per pod, and
those change as pods come and go. So the runner resolves a named seed again on every join
attempt (memberlist ``Join`` resolves each time too, and tries every address it gets), and a
node that starts before its peers finds them once DNS lists them.

A resolver is any callable ``(host, port) -> [(ip, port), ...]`` raising ``OSError`` when the
name does not resolve: blocking (run in a worker thread by :func:`resolve_seed`), or an
``async`` one (awaited on the event loop, for resolvers that do not block, like a test's
in-memory DNS: a worker thread would race trio's virtual clock). :func:`system_resolver`
(``socket.getaddrinfo``) is the real one; tests inject their own.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Awaitable, Callable

import trio

from .messages import Addr

__all__ = ["BlockingResolver", "Resolver", "resolve_seed", "system_resolver"]

BlockingResolver = Callable[[str, int], list[Addr]]
"""``(host, port) -> addresses``, blocking; raises ``OSError`` when ``host`` does not resolve.
An address literal resolves to itself."""

Resolver = BlockingResolver | Callable[[str, int], Awaitable[list[Addr]]]
"""A :data:`BlockingResolver`, or the same as an ``async`` callable."""


def system_resolver(host: str, port: int) -> list[Addr]:
    """Every A and AAAA record of ``host`` (an address literal gives itself), each with
    ``port``, in the system resolver's order without duplicates.

    Uses ``socket.getaddrinfo`` (so ``/etc/hosts`` and the resolv.conf search domains apply,
    as for any program in the pod). Blocks; raises ``socket.gaierror`` (an ``OSError``) when
    the name does not resolve, e.g. a headless Service with no pod yet (NXDOMAIN)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    found: list[Addr] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            addr = (str(sockaddr[0]), port)
            if addr not in found:
                found.append(addr)
    return found


async def resolve_seed(resolver: Resolver, seed: Addr, *, within_s: float) -> list[Addr]:
    """``resolver(*seed)``, abandoned after ``within_s`` seconds: a blocking resolver runs in a
    worker thread (which finishes on its own; its answer is dropped), an ``async`` one is
    awaited. Raises the resolver's ``OSError`` when the name does not resolve, and
    ``TimeoutError`` (an ``OSError`` too) when it takes longer."""
    with trio.move_on_after(within_s):
        call = type(resolver).__call__ if not inspect.isfunction(resolver) else resolver
        if inspect.iscoroutinefunction(resolver) or inspect.iscoroutinefunction(call):
            return await resolver(*seed)  # type: ignore[no-any-return,misc]
        return await trio.to_thread.run_sync(resolver, *seed, abandon_on_cancel=True)  # type: ignore[arg-type]
    raise TimeoutError(f"resolving {seed[0]!r} took longer than {within_s} s")
