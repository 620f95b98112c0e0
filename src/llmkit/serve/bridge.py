"""From the scheduler's thread to the server's event loop.

The scheduler (``llmkit.infer.scheduler``) decodes on one background thread. The server must never block
its event loop, nor start a thread per job (one request of many prompts would start as many), so every
job is submitted with a listener: the scheduler's thread calls it with each event, and it passes the
event to the loop with ``loop.call_soon_threadsafe`` into the group's ``asyncio.Queue``, which only the
loop awaits.

:class:`RequestGroup` holds the jobs of one HTTP call (``n`` choices of each prompt) and merges
their events into one stream; :meth:`RequestGroup.cancel` cancels every job not yet finished, and
the server calls it however a call ends (finished, failed, or the client gone), so the batch slots are
free at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

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
        """Submit every job; called on the event loop. A refused job (a prompt the scheduler rejects)
        cancels the ones already submitted and raises."""
        loop = asyncio.get_running_loop()
        try:
            for index, (prompt_ids, config) in enumerate(self.jobs):
                self.requests.append(self.scheduler.submit(prompt_ids, config, on_event=self._listener(index, loop)))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel every request not finished yet (the scheduler frees their slots at its next step)."""
        for request in self.requests:
            if request.completion is None:
                request.cancel()

    def _listener(self, index: int, loop: asyncio.AbstractEventLoop) -> Callable[[Event | BaseException], None]:
        def deliver(event: Event | BaseException) -> None:  # on the scheduler's thread
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed (server shutdown): nobody listens any more
                self.requests[index].cancel()

        return deliver

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
