"""asyncio on vmexec: await CPU-heavy calls without blocking the event loop.

``loop.run_in_executor(ex, fn, *args)`` and ``asyncio.wrap_future(ex.submit(...))``
turn vmexec futures into awaitables, so an async service (a web handler, a crawler)
can hand heavy work to machines and keep serving::

    python examples/asyncio_gather.py
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from vmexec import VMExecutor


def slow_hash(text: str, rounds: int = 20_000) -> str:
    """CPU-bound work: iterated SHA-256."""
    digest = text.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:16]


async def handle(ex: VMExecutor, request: str) -> str:
    loop = asyncio.get_running_loop()
    # The event loop stays free while a machine works.
    return await loop.run_in_executor(ex, slow_hash, request)


async def main() -> None:
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    with VMExecutor(max_workers=2, provider=provider) as ex:
        answers = await asyncio.gather(*(handle(ex, f"request-{i}") for i in range(8)))
        for i, answer in enumerate(answers[:3]):
            print(f"request-{i} -> {answer}")
        # A future from submit() can be awaited too.
        extra = await asyncio.wrap_future(ex.submit(slow_hash, "one more", 1000))
        print(f"wrapped future -> {extra}")
        # Results in completion order.
        pending = [loop_future for loop_future in
                   (asyncio.wrap_future(ex.submit(slow_hash, str(n), 500 * n))
                    for n in (3, 1, 2))]
        finished = [await f for f in asyncio.as_completed(pending)]
    print(f"{len(answers)} requests served, {len(finished)} more in completion order")


if __name__ == "__main__":
    asyncio.run(main())
