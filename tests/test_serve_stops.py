"""Stop strings in linear time: the text held back (what may still become a stop string) and the text
released, against naive references that look at the whole text after every token."""

import random
import time

from llmkit.infer.completion import StopPrefixes, TextTracker

ALPHABET = "abé"  # few letters: prefixes and matches happen often; é spans two bytes


def naive_held_back(text: str, stops: list[str]) -> int:
    """The longest suffix of ``text`` that is a proper prefix of some stop string, by trying every length."""
    return max((size for stop in stops for size in range(1, len(stop)) if text.endswith(stop[:size])), default=0)


def random_text(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(size))


def test_held_back_text_equals_the_naive_reference():
    rng = random.Random(0)
    for _ in range(300):
        stops = [random_text(rng, rng.randint(1, 6)) for _ in range(rng.randint(1, 3))]
        prefixes, text = StopPrefixes(stops), ""
        while len(text) < 40:
            pending = random_text(rng, rng.randint(0, 2))
            if not any(stop in text + pending for stop in stops):
                assert prefixes.held_back(pending) == naive_held_back(text + pending, stops)
            piece = random_text(rng, rng.randint(1, 4))
            if any(stop in text + piece for stop in stops):
                break  # the tracker stops at a whole match: the text never holds one
            prefixes.extend(piece)
            text += piece
            assert prefixes.held_back() == naive_held_back(text, stops)


class ByteTokenizer:
    """One token per byte, decoded as llmkit's byte-level BPE decodes: a partial character is U+FFFD."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def naive_released(data: bytes, stops: list[str]) -> tuple[str, bool]:
    """What may be shown after ``data``: up to the first stop string (and stopped), else all but a final
    partial character and the longest end that may begin a stop string."""
    text = data.decode("utf-8", errors="replace")
    matches = [text.find(stop) for stop in stops if stop in text]
    if matches:
        return text[: min(matches)], True
    safe = text.rstrip("\ufffd")
    return safe[: len(safe) - naive_held_back(safe, stops)], False


def test_released_text_equals_the_naive_reference():
    rng = random.Random(1)
    for _ in range(300):
        stops = [random_text(rng, rng.randint(1, 5)) for _ in range(rng.randint(1, 3))]
        data = random_text(rng, 30).encode()
        tracker, released, stopped = TextTracker(ByteTokenizer(), stops), "", False
        for end in range(1, len(data) + 1):
            released += tracker.add(data[end - 1])
            expected, stopped = naive_released(data[:end], stops)
            assert (released, tracker.stopped) == (expected, stopped)
            if stopped:
                break
        assert released + tracker.finish() == (expected if stopped else data.decode())


def test_a_long_stop_string_costs_no_more_than_none():
    """The attack that made every step quadratic: a 10,000-character stop string the text keeps almost matching."""

    def seconds(stops: list[str]) -> float:
        tracker, started = TextTracker(ByteTokenizer(), stops), time.perf_counter()
        for _ in range(2048):
            tracker.add(ord("a"))
        return time.perf_counter() - started

    assert seconds(["a" * 10_000 + "b"]) < 0.5  # 1.9 s before; about 0.01 s without stop strings
