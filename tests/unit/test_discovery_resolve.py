"""ZeroconfBrowser's resolutions per service name: a flood of announcements for one name (a
rogue flipping its TXT record) makes one more pass after the running one, never a queue.
The mDNS resolution itself is replaced by a slow stand-in: the test is about the scheduling."""

from __future__ import annotations

import asyncio

from marco.discovery import ZeroconfBrowser
from marco.nodes import NodeRegistry


def test_announcements_during_a_resolution_make_one_more_pass() -> None:
    browser = ZeroconfBrowser(NodeRegistry(), ["127.0.0.1"])
    passes: list[str] = []
    release = asyncio.Event()

    async def slow_resolve(name: str) -> bool:  # stands in for an unanswered 2 s probe
        passes.append(name)
        await release.wait()
        return True

    browser._resolve_one = slow_resolve  # type: ignore[method-assign]

    async def scenario() -> None:
        first = asyncio.ensure_future(browser._resolve("rogue._marco._tcp.local."))
        await asyncio.sleep(0)
        flood = [asyncio.ensure_future(browser._resolve("rogue._marco._tcp.local."))
                 for _ in range(500)]
        await asyncio.gather(*flood)  # each returns at once: nothing waits behind the lock
        assert passes == ["rogue._marco._tcp.local."]
        release.set()
        await first
        assert len(passes) == 2  # the flood's one pass, after the first
        assert browser._resolving == {}

    asyncio.run(scenario())
