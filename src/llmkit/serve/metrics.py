"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: a few counters,
two gauges read from the scheduler, and latency histograms.

Names follow Prometheus conventions (``_total`` for counters, ``_seconds`` for durations, cumulative
``_bucket{le=...}`` series plus ``_sum`` and ``_count`` for histograms), so a stock Prometheus scrape
or ``prometheus_client.parser`` reads them. Everything is updated on the event loop thread only, so
no lock is needed; the gauges are read from the scheduler when scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Callable

# Time to first token and request latency on one machine span milliseconds to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return lines + [f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        self.running, self.waiting = running, waiting
        self.requests: Counter = Counter()  # (endpoint, status code) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.in_flight = 0
        self.time_to_first_token = Histogram()
        self.request_latency = Histogram()

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def render(self) -> str:
        lines = [
            "# HELP llmkit_requests_total HTTP requests answered, by endpoint and status code.",
            "# TYPE llmkit_requests_total counter",
        ]
        lines += [
            f'llmkit_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
            for (endpoint, status), count in sorted(self.requests.items())
        ]
        scalars = [
            ("llmkit_prompt_tokens_total", "counter", "Prompt tokens of generation requests.", self.prompt_tokens),
            ("llmkit_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
            ("llmkit_http_requests_in_flight", "gauge", "Generation requests being answered now.", self.in_flight),
            ("llmkit_scheduler_running", "gauge", "Requests decoding in the scheduler's batch.", self.running()),
            ("llmkit_scheduler_waiting", "gauge", "Requests waiting for a batch slot.", self.waiting()),
        ]
        for name, kind, help_text, value in scalars:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for name, help_text, histogram in (
            (
                "llmkit_time_to_first_token_seconds",
                "Time from a request's arrival to its first generated text.",
                self.time_to_first_token,
            ),
            (
                "llmkit_request_latency_seconds",
                "Time from a generation request's arrival to its last byte.",
                self.request_latency,
            ),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *histogram.lines(name)]
        return "\n".join(lines) + "\n"
