"""Continuous batching: one scheduler admits, decodes and retires requests between decode steps.

Every generation in llmkit (``Engine.generate``/``stream``, evaluation, RL rollouts, the HTTP server)
is a :class:`Request` submitted here. A :meth:`Scheduler.step`:

1. drops cancelled requests and admits waiting ones into free slots of one preallocated KV cache (Orca,
   Yu et al. 2022: requests join and leave a running batch between steps, so a short request never
   waits for a long one, and a new one never waits for the batch to drain);
2. prefills what each slot has not seen yet — a new prompt, or a tool result just injected — straight into
   its cache rows, without the output head: requests admitted together are laid out shortest prompt first,
   and pieces of similar length share one right-padded pass, rows at different positions included;
3. decodes every running request together: one forward pass of one token per row, each row at its own
   position with its own attention mask (``llmkit.model.kv_cache``), through the engine's
   :class:`~llmkit.infer.runner.ModelRunner` (eager, or one compiled graph);
4. samples each row under its own settings and random generator (``sample_rows``), and hands every token
   to its request's :class:`~llmkit.infer.completion.CompletionState` (text, stops, tool calls);
5. retires finished requests; the last running row moves into the hole, so the running rows stay the
   first rows of the cache and step 3 is one slice of it.

The invariant that keeps this simple: a running request's cache holds its ``sequence`` but the last
token, which the next decode step feeds. Requests that cannot share the batch run on their own when
admitted: beam search (``num_beams`` > 1, ``llmkit.infer.beam``) and ``use_cache=False`` (the reference
path, re-running the whole sequence each step, which still shares everything else of the step).

A greedy request running alone with ``prompt_lookup`` set decodes speculatively instead of step 3: a draft
continues its last n-gram from an earlier occurrence in its own sequence (``llmkit.infer.speculative``), one
forward pass scores the last token and the draft, and the request takes the model's own choices up to the
first one that differs from the draft, plus that one: the tokens of plain greedy decoding, several per pass
when the text repeats itself.

Requests are thread-safe to submit and cancel. Without :meth:`Scheduler.start`, whoever waits on a
request's events drives the steps; with it, a background thread does (the HTTP server, which gives each
request a listener instead: the thread calls it with each event, so no thread waits per request).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from llmkit.errors import InputError
from llmkit.infer.beam import beam_search
from llmkit.infer.completion import Completion, CompletionState, Tools, check_tools
from llmkit.infer.sampling import GenerationConfig, logprobs_of, sample_rows
from llmkit.infer.scoring import score_sequences
from llmkit.infer.speculative import prompt_lookup
from llmkit.model.kv_cache import KVCache

if TYPE_CHECKING:
    from llmkit.infer.engine import Engine


@dataclass
class Event:
    """What a step added to one request: final text (UTF-8 safe, stop strings held back) and the tokens
    behind it (sampled, then any injected), with log-probabilities when the request asked for them."""

    text: str
    token_ids: list[int]
    logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None
    finished: Completion | None = None  # set on the request's last event


class Request:
    """A submitted generation: its prompt and settings, a queue of its events, and a way to cancel it."""

    def __init__(
        self,
        scheduler: "Scheduler",
        prompt_ids: list[int],
        config: GenerationConfig,
        tools: Tools | None,
        on_event: Callable[[Event | BaseException], None] | None = None,
    ):
        self.prompt_ids, self.config, self.tools = prompt_ids, config, tools
        self.cancelled = False
        self.completion: Completion | None = None
        self._scheduler = scheduler
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._on_event = on_event
        self._closed = False  # the last event (or an error) has been taken
        self._error: BaseException | None = None

    def cancel(self) -> None:
        """Stop generating; the scheduler frees the request's slot at its next step and sends a last
        event with finish reason "cancelled"."""
        self.cancelled = True
        self._scheduler._wake()

    def events(self) -> Iterator[Event]:
        """Events as they happen, up to and including the last one (``finished`` set). Blocks; without a
        background thread, waiting drives the scheduler's steps."""
        while not self._closed:
            event = self._next_event()
            if isinstance(event, BaseException):
                self._closed, self._error = True, event
                raise event
            self._closed = event.finished is not None
            yield event

    def result(self) -> Completion:
        """The completion, once finished (waiting drives the steps as :meth:`events` does)."""
        for _ in self.events():
            pass
        if self.completion is None:
            raise self._error
        return self.completion

    def _put(self, event: Event | BaseException) -> None:
        """Hand over an event, or the error that failed a step: to the listener if there is one, else to
        the queue :meth:`events` reads."""
        if self._on_event is not None:
            self._on_event(event)
        else:
            self._events.put(event)

    def _next_event(self) -> Event | BaseException:
        while True:
            if self._scheduler.in_background:
                try:
                    return self._events.get(timeout=0.1)  # and look again whether the thread still runs
                except queue.Empty:
                    continue
            try:
                return self._events.get_nowait()
            except queue.Empty:
                if not self._scheduler.step() and self._events.empty():
                    raise RuntimeError("the scheduler has nothing to do but this request has not finished")


PREFILL_PADDING = 1.25  # pieces share a prefill pass while its padded size stays within this of their tokens


def doubled(size: int, needed: int, cap: int) -> int:
    """``size`` when it is at least ``needed``, else the larger of ``needed`` and twice ``size`` (at most ``cap``)."""
    return size if needed <= size else max(needed, min(2 * size, cap))


class Scheduler:
    """Continuous batching over the KV-cache slots of one engine's model (see the module docstring)."""

    def __init__(self, engine: "Engine", max_batch_size: int = 16):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model, self.tokenizer, self.device = engine.model, engine.tokenizer, engine.device
        self.runner = engine.runner
        self.max_batch_size = max_batch_size
        self.context_length = self.model.config.context_length
        self.cache: KVCache | None = None
        self._waiting: deque[Request] = deque()
        self._slots: list[tuple[Request, CompletionState]] = []  # index = cache row
        self._uncached: list[tuple[Request, CompletionState]] = []
        self._unfinished = 0  # submitted requests that have not had their last event (guarded by _wakeup)
        self._step_lock = threading.Lock()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------------------- requests
    def submit(
        self,
        prompt_ids: list[int],
        config: GenerationConfig | None = None,
        tools: Tools | None = None,
        on_event: Callable[[Event | BaseException], None] | None = None,
    ) -> Request:
        """Queue a request; it joins the running batch at the next step with a free slot. ``on_event``, if
        given, receives the request's events (and the error of a failed step) on the thread that runs the
        steps, instead of :meth:`Request.events`; it must neither block nor raise."""
        prompt_ids = [int(token) for token in prompt_ids]
        if not prompt_ids:
            raise InputError("a prompt needs at least one token (an empty text prompt starts with <|endoftext|>)")
        if len(prompt_ids) >= self.context_length:
            raise InputError(
                f"a prompt of {len(prompt_ids)} tokens leaves no room in the model's context of "
                f"{self.context_length} tokens"
            )
        vocab_size = self.model.config.vocab_size
        if not all(0 <= token < vocab_size for token in prompt_ids):
            raise InputError(f"prompt token ids must be in [0, {vocab_size}), got {min(prompt_ids)}..{max(prompt_ids)}")
        if tools is not None:
            check_tools(self.tokenizer)
        request = Request(self, prompt_ids, config or GenerationConfig(), tools, on_event)
        with self._wakeup:
            self._waiting.append(request)
            self._unfinished += 1
            self._wakeup.notify()
        return request

    @property
    def num_running(self) -> int:
        return len(self._slots) + len(self._uncached)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not finished: waiting, running, or cancelled and not dropped yet."""
        return self._unfinished

    @property
    def in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Drive the steps from a background thread (the HTTP server); waiting on events then blocks."""
        if self.in_background:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="llmkit-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current step; unfinished requests stay queued."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not (self.num_waiting or self.num_running):
                    self._wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:
                continue  # step() has handed the error to every request it affected; serve the next ones

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    # ----------------------------------------------------------------------------------- steps
    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests, then one decode step for every running one; False when there was
        nothing to do. An error fails every request in the scheduler (their events raise it) and is raised."""
        with self._step_lock:
            try:
                self._drop_cancelled()
                self._admit()
                running = self._slots + self._uncached
                if not running:
                    return False
                self._fit_cache()
                self._prefill()
                if not self._speculate():
                    self._decode(running, self._next_logits())
                self._retire()
                return True
            except BaseException as error:
                self._fail_all(error)
                raise

    def _drop_cancelled(self) -> None:
        with self._wakeup:
            cancelled = [request for request in self._waiting if request.cancelled]
            for request in cancelled:
                self._waiting.remove(request)
        for request in cancelled:
            state = CompletionState(
                request.prompt_ids, request.config, self.tokenizer, None, self.context_length, self.device
            )
            state.cancel()
            self._finish(request, state, Event("", []))
        for request, state in self._slots + self._uncached:
            if request.cancelled:
                state.cancel()
                self._finish(request, state, Event("", []))
        self._retire()

    def _admit(self) -> None:
        admitted_from = len(self._slots)
        try:
            while self.num_running < self.max_batch_size:
                with self._wakeup:
                    if not self._waiting:
                        return
                    request = self._waiting.popleft()
                try:
                    self._start(request)
                except BaseException:
                    with self._wakeup:
                        self._waiting.appendleft(request)  # where _fail_all finds it and sends it the error
                    raise
        finally:
            # The new slots' cache rows are empty: order them by prompt length, so that neighbours of
            # similar length share a prefill pass with little padding.
            self._slots[admitted_from:] = sorted(self._slots[admitted_from:], key=lambda slot: len(slot[1].sequence))

    def _start(self, request: Request) -> None:
        """Give an admitted request a slot, or run it to the end now (beam search)."""
        state = CompletionState(
            request.prompt_ids, request.config, self.tokenizer, request.tools, self.context_length, self.device
        )
        if request.config.echo:
            self._score_prompt(request, state)
        if request.config.num_beams > 1:
            self._beam_search(request, state)
        elif request.config.use_cache:
            # Tool results may lengthen the sequence beyond this: the cache then grows (_fit_cache) rather than
            # every request with tools holding the whole context (8,192 positions of a real model) from the start.
            room = len(request.prompt_ids) + request.config.max_new_tokens
            self._reserve(len(self._slots) + 1, min(room, self.context_length))
            self._slots.append((request, state))
        else:
            self._uncached.append((request, state))

    def _fit_cache(self) -> None:
        """Room in the cache for every running sequence, with the token this step adds (a tool result
        injected since the last step can have outgrown it)."""
        if self._slots:
            longest = max(len(state.sequence) for _, state in self._slots)
            if longest > self.cache.capacity:
                self._reserve(len(self._slots), min(longest, self.context_length))

    def _reserve(self, rows: int, capacity: int) -> None:
        """A cache with at least ``rows`` rows of ``capacity`` positions. A dimension that must grow is at
        least doubled (capped at the batch size and the context), so that a stream of requests reallocates
        the cache only a few times; the other keeps its size (doubling the positions with every new row
        gave 32 SmolLM2 answers of 300 tokens the whole 8,192-token context each: 12 GB of keys and values)."""
        weight = self.model.token_embedding.weight
        if self.runner.compile:
            rows = max(rows, 2)  # a compiled step then sees no cache of size 1, a size it would compile apart
        if self.cache is None or self.cache.keys.dtype != weight.dtype or self.cache.keys.device != weight.device:
            self.cache = self.model.new_cache(rows, capacity)
        else:
            self.cache.grow(
                doubled(self.cache.batch_size, rows, self.max_batch_size),
                doubled(self.cache.capacity, capacity, self.context_length),
            )

    def _prefill(self) -> None:
        """Bring every slot up to its sequence but the last token. Pieces of similar length share one
        right-padded pass while the padding stays small (``PREFILL_PADDING``), whatever their rows and
        positions: the prompts of requests admitted together, and the tool results that several rows
        received in the same step (64 SmolLM2 answers with the calculator had up to 26 at once). Only the
        cache is wanted, so a pass stops before the output head."""
        if not self._slots:
            return
        pending = sorted(
            (
                (row, filled, state.sequence[filled:-1])
                for row, (filled, (_, state)) in enumerate(zip(self.cache.lengths.tolist(), self._slots))
                if filled < len(state.sequence) - 1
            ),
            key=lambda item: len(item[2]),
        )
        while pending:
            size, total, furthest = 1, len(pending[0][2]), pending[0][1]
            while size < len(pending):
                _, filled, tokens = pending[size]  # the longest piece so far: shortest first
                if (
                    len(tokens) * (size + 1) > PREFILL_PADDING * (total + len(tokens))
                    or max(furthest, filled) + len(tokens) > self.cache.capacity
                ):
                    break
                size, total, furthest = size + 1, total + len(tokens), max(furthest, filled)
            group = pending[:size]
            self.runner.prefill(self.cache, [row for row, _, _ in group], [tokens for _, _, tokens in group])
            pending = pending[size:]

    def _next_logits(self) -> torch.Tensor:
        """(running, vocab) logits of every running request's next token."""
        logits = []
        if self._slots:
            last = torch.tensor([[state.sequence[-1]] for _, state in self._slots], device=self.device)
            logits.append(self.runner.decode(last, self.cache))
        if self._uncached:
            # Right-padded into one batch: under causal attention, padding after a row's tokens changes nothing
            # before it.
            sequences = [state.sequence for _, state in self._uncached]
            longest = max(len(sequence) for sequence in sequences)
            ids = torch.tensor(
                [sequence + [0] * (longest - len(sequence)) for sequence in sequences], device=self.device
            )
            last = torch.tensor([len(sequence) - 1 for sequence in sequences], device=self.device)
            logits.append(self.model(ids)[torch.arange(len(sequences), device=self.device), last])
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def _decode(self, running: list[tuple[Request, CompletionState]], logits: torch.Tensor) -> None:
        states = [state for _, state in running]
        tokens = sample_rows(
            logits,
            [state.config for state in states],
            [state.generator for state in states],
            [state.sequence for state in states],
        )
        chosen, top = self._logprobs(logits, tokens, states)
        for row, ((request, state), token) in enumerate(zip(running, tokens.tolist())):
            step = state.accept(token, chosen.get(row), top.get(row))
            event = Event(
                step.text,
                step.token_ids,
                step.logprobs if state.config.logprobs is not None else None,
                step.top_logprobs if state.config.logprobs else None,
            )
            if state.finished:
                self._finish(request, state, event)
            else:
                request._put(event)

    def _speculate(self) -> bool:
        """Prompt-lookup speculative decoding for a greedy request that runs alone (see the module
        docstring); False when it does not apply or finds no draft, and the step decodes as usual."""
        if len(self._slots) != 1 or self._uncached:
            return False
        request, state = self._slots[0]
        config = state.config
        if not config.prompt_lookup or config.temperature != 0:
            return False
        filled = int(self.cache.lengths[0])
        room = (
            min(
                config.max_new_tokens - state.sampled,
                self.cache.capacity - filled,
                self.context_length - len(state.sequence),
            )
            - 1
        )
        draft = prompt_lookup(state.sequence, min(config.prompt_lookup, room))
        if not draft:
            return False
        ids = torch.tensor([[state.sequence[-1], *draft]], device=self.device)
        logits = self.runner.verify(ids, self.cache, 0)
        event = Event("", [], [] if config.logprobs is not None else None, [] if config.logprobs else None)
        kept = 0  # draft tokens taken as they are: their keys and values in the cache stay valid
        for position in range(len(draft) + 1):
            row = logits[position : position + 1]
            token = sample_rows(row, [config], [state.generator], [state.sequence])
            chosen, top = self._logprobs(row, token, [state])
            length = len(state.sequence)
            step = state.accept(int(token), chosen.get(0), top.get(0))
            event.text += step.text
            event.token_ids += step.token_ids
            if event.logprobs is not None:
                event.logprobs += step.logprobs
                if event.top_logprobs is not None:
                    event.top_logprobs += step.top_logprobs
            # Go on only while the model chose the draft's token and the sequence took exactly that token.
            if (
                state.finished
                or position == len(draft)
                or int(token) != draft[position]
                or len(state.sequence) != length + 1
            ):
                break
            kept += 1
        self.cache.lengths[0] = min(filled + 1 + kept, len(state.sequence) - 1)
        if state.finished:
            self._finish(request, state, event)
        else:
            request._put(event)
        return True

    def _logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, states: list[CompletionState]
    ) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
        """Chosen-token log-probabilities and top alternatives of the rows that asked for them."""
        rows = [row for row, state in enumerate(states) if state.config.logprobs is not None]
        if not rows:
            return {}, {}
        top = max(states[row].config.logprobs for row in rows)
        index = torch.tensor(rows, device=logits.device)
        chosen, top_ids, top_logprobs = logprobs_of(logits[index], tokens[index], top)
        chosen_by_row = dict(zip(rows, chosen.tolist()))
        top_by_row = {}
        for row, ids, values in zip(rows, top_ids.tolist(), top_logprobs.tolist()):
            wanted = states[row].config.logprobs
            if wanted:
                top_by_row[row] = self._alternatives(ids[:wanted], values[:wanted])
        return chosen_by_row, top_by_row

    def _retire(self) -> None:
        """Remove finished requests; keep the running slots the first rows of the cache."""
        for row in range(len(self._slots) - 1, -1, -1):
            if self._slots[row][1].finished:
                last = len(self._slots) - 1
                self.cache.move(last, row)
                self._slots[row] = self._slots[last]
                self._slots.pop()
        self._uncached = [entry for entry in self._uncached if not entry[1].finished]

    def _finish(self, request: Request, state: CompletionState, event: Event) -> None:
        """Send the request's last event: ``event`` with any held-back text and the completion."""
        request.completion = state.completion()
        event.text += state.tracker.finish()
        event.finished = request.completion
        with self._wakeup:
            self._unfinished -= 1
        request._put(event)

    def _fail_all(self, error: BaseException) -> None:
        with self._wakeup:
            # A finished request may still hold its slot (retired after the step): it has had its last event.
            failed = [
                request
                for request in [*self._waiting, *(request for request, _ in self._slots + self._uncached)]
                if request.completion is None
            ]
            self._waiting.clear()
            self._unfinished -= len(failed)
        for request in failed:
            request._put(error)
        self._slots, self._uncached = [], []
        if self.cache is not None:
            self.cache.lengths.zero_()

    # ------------------------------------------------------------------ requests outside the batch
    def _score_prompt(self, request: Request, state: CompletionState) -> None:
        """Echo: the prompt tokens' log-probabilities, from one forward pass over the prompt."""
        top = request.config.logprobs or 0
        scores = score_sequences(self.model, [request.prompt_ids], top=top)[0]
        state.prompt_logprobs = [None] + scores.logprobs.tolist()
        if top:
            state.prompt_top_logprobs = [None] + [
                self._alternatives(ids, values)
                for ids, values in zip(scores.top_ids.tolist(), scores.top_logprobs.tolist())
            ]

    def _beam_search(self, request: Request, state: CompletionState) -> None:
        """Run a beam search to the end now (it needs num_beams rows of its own) and finish the request
        with its best hypothesis, passed through the same stop conditions as sampled tokens."""
        config = request.config
        end_ids = frozenset(state.end_ids) if config.stop_at_end_of_text else frozenset()
        best = beam_search(
            self.model, request.prompt_ids, config.num_beams, config.max_new_tokens, config.length_penalty, end_ids
        )[0]
        tokens = best.token_ids  # the end token that closed a "stop" hypothesis is not among them
        state.tools = None  # a beam is decided whole: no tool runs in the middle of it
        chosen, top = [None] * len(tokens), [None] * len(tokens)
        if config.logprobs is not None and tokens:
            scores = score_sequences(self.model, [request.prompt_ids + tokens], top=config.logprobs)[0]
            chosen = scores.logprobs[-len(tokens) :].tolist()
            if config.logprobs:
                top = [
                    self._alternatives(ids, values)
                    for ids, values in zip(
                        scores.top_ids[-len(tokens) :].tolist(), scores.top_logprobs[-len(tokens) :].tolist()
                    )
                ]
        event = Event("", [])
        for token, logprob, alternatives in zip(tokens, chosen, top):
            step = state.accept(token, logprob, alternatives)
            event.text += step.text
            if state.finished:
                break
        if not state.finished:
            state.finish_reason = best.finish_reason
        event.token_ids = state.token_ids
        if config.logprobs is not None:
            event.logprobs, event.top_logprobs = state.logprobs, state.top_logprobs if config.logprobs else None
        self._finish(request, state, event)

    def _alternatives(self, ids: list[int], values: list[float]) -> dict[str, float]:
        """Top alternatives as the OpenAI API reports them: token text -> log-probability."""
        return {self.tokenizer.decode([token]): value for token, value in zip(ids, values)}
