"""Stand-ins for EtcdStore in unit tests of the daemon's loops (leases and claims alike: each
class answers both kinds). Real etcd is in the integration tests."""

from __future__ import annotations

import asyncio

from overlay.errors import StoreUnavailable, WatchCompacted


class HeldBackListing:
    """Listings answered from a script; the first answer is held back until the test sets
    `deliver`, as a reply still on its way while the watch delivers."""

    def __init__(self, *listings):
        self.listings = list(listings)
        self.read = asyncio.Event()      # the first listing was taken
        self.deliver = asyncio.Event()   # ... and may now arrive
        self.calls = 0

    async def _list(self):
        self.calls += 1
        answer = self.listings.pop(0)
        if self.calls == 1:
            self.read.set()
            await self.deliver.wait()
        return answer

    list_leases = list_claims = _list


class CompactedAndUnreachable:
    """Every watch finds its revision compacted and every listing fails: the state a watch
    falls into when etcd goes away right after compacting."""

    def __init__(self):
        self.calls = 0

    async def _list(self):
        self.calls += 1
        await asyncio.sleep(0)   # a real request suspends: a loop without a pause spins, countably
        raise StoreUnavailable("no endpoint answers")

    async def _watch(self, start_revision: int):
        self.calls += 1
        await asyncio.sleep(0)
        raise WatchCompacted(start_revision + 10)
        yield   # an async generator, as the store's

    list_leases = list_claims = _list
    watch_leases = watch_claims = _watch


async def requests_in_a_second(loop_body, store) -> int:
    """How many requests `loop_body()` (a coroutine that loops forever) makes to store in 1 s."""
    looping = asyncio.create_task(loop_body())
    await asyncio.sleep(1.0)   # the span over which requests are counted, not a wait for a condition
    looping.cancel()
    await asyncio.gather(looping, return_exceptions=True)
    return store.calls
