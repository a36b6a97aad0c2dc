"""SentinelWatcher.close() ends every task it started, even one that swallowed its first cancellation."""

from __future__ import annotations

import asyncio

from brokerproxy.sentinel import SentinelWatcher
from brokerproxy.sentinel_url import parse_sentinel_url


def test_close_ends_a_task_that_swallowed_a_cancellation() -> None:
    # On Python 3.11 asyncio.wait_for can swallow a cancellation that arrives as its inner wait completes; the
    # watcher's loops then run on. close() must still return (it hung a CI run for 300 s).
    async def main() -> None:
        watcher = SentinelWatcher(parse_sentinel_url("upstream", "sentinel://127.0.0.1:1/mymaster"))
        swallowed = asyncio.Event()

        async def stubborn() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                swallowed.set()  # and carry on, as a swallowed cancellation does
            await asyncio.sleep(30)

        task = watcher._spawn(stubborn(), "stubborn")
        await asyncio.sleep(0)
        await asyncio.wait_for(watcher.close(), 5)
        assert swallowed.is_set() and task.cancelled()

    asyncio.run(main())
