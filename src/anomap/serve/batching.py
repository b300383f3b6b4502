"""Micro-batching: concurrent requests share forward passes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Groups items submitted concurrently into batches for one scoring function.

    One worker (`run`) takes the oldest waiting item, gathers up to `max_batch` items, waiting at
    most `max_wait` seconds for more, scores them in `executor` and resolves each submitter's
    future. Batches run one at a time; while one runs, the next one fills up.

    Args:
        score: list of n items -> list of n results, in order.
        max_batch: most items per call of `score`.
        max_wait: seconds the worker waits for more items once it has one.
        executor: where `score` runs (None: the event loop's default executor).
    """

    def __init__(
        self,
        score: Callable[[list[Item]], list[Result]],
        max_batch: int,
        max_wait: float = 0.005,
        executor: Executor | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.score, self.max_batch, self.max_wait, self.executor = score, max_batch, max_wait, executor
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] = asyncio.Queue()

    async def submit(self, item: Item) -> Result:
        """Score one item with whatever else is waiting; raises what `score` raised."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def run(self) -> None:
        """The worker loop; runs until cancelled."""
        while True:
            batch = await self._gather()
            live = [(item, future) for item, future in batch if not future.done()]
            if not live:
                continue
            try:
                items = [item for item, _ in live]
                results = await asyncio.get_running_loop().run_in_executor(self.executor, self.score, items)
            except Exception as err:  # noqa: BLE001 - handed to every waiting request, which answers with it
                for _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(live, results):
                if not future.done():
                    future.set_result(result)

    async def _gather(self) -> list[tuple[Item, asyncio.Future]]:
        """The oldest waiting item and up to max_batch - 1 more, arriving within max_wait of it."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.sleep(min(left, 0.001))
        return batch
