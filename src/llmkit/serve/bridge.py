"""From the scheduler's threads to the server's event loop.

The scheduler (``llmkit.infer.scheduler``) decodes on a background thread and hands each request its
events through a blocking iterator. The server must never block its event loop, so every request gets
a small pump thread that waits on ``Request.events()`` and passes each event to the loop with
``loop.call_soon_threadsafe`` into an ``asyncio.Queue``: the loop only ever awaits that queue. A thread
per request is cheap next to a decode step, and the number of requests in flight is bounded by the
server's concurrency limit.

:class:`RequestGroup` holds the requests of one HTTP call (``n`` choices of each prompt) and merges
their events into one stream; :meth:`RequestGroup.cancel` cancels every request not yet finished, and
the server calls it however a call ends (finished, failed, or the client gone), so the batch slots are
free at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from llmkit.infer.completion import Completion
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.scheduler import Event, Request, Scheduler


class RequestGroup:
    def __init__(self, scheduler: Scheduler, jobs: list[tuple[list[int], GenerationConfig]]):
        """``jobs``: (prompt ids, generation config) per choice; event indices follow their order."""
        self.scheduler, self.jobs = scheduler, jobs
        self.requests: list[Request] = []
        self.completions: list[Completion | None] = [None] * len(jobs)
        self._queue: asyncio.Queue = asyncio.Queue()

    def start(self) -> None:
        """Submit every job and start its pump; called on the event loop. A refused job (a prompt the
        scheduler rejects) cancels the ones already submitted and raises."""
        loop = asyncio.get_running_loop()
        try:
            for index, (prompt_ids, config) in enumerate(self.jobs):
                request = self.scheduler.submit(prompt_ids, config)
                self.requests.append(request)
                threading.Thread(target=self._pump, args=(index, request, loop), daemon=True,
                                 name=f"llmkit-serve-pump-{index}").start()
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel every request not finished yet (the scheduler frees their slots at its next step)."""
        for request in self.requests:
            if request.completion is None:
                request.cancel()

    def _pump(self, index: int, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        def deliver(item) -> bool:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
                return True
            except RuntimeError:  # the event loop has closed (server shutdown): nobody listens any more
                request.cancel()
                return False

        try:
            for event in request.events():
                if not deliver((index, event)):
                    return
        except BaseException as error:  # the scheduler's step failed: the consumer re-raises it
            deliver((index, error))

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """``(choice index, event)`` as they happen, until every choice has finished."""
        unfinished = len(self.jobs)
        while unfinished:
            index, event = await self._queue.get()
            if isinstance(event, BaseException):
                raise event
            if event.finished is not None:
                self.completions[index] = event.finished
                unfinished -= 1
            yield index, event

    async def results(self) -> list[Completion]:
        """Wait for every choice; completions in job order."""
        async for _ in self.events():
            pass
        return self.completions
