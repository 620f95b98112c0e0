"""Multi-step arithmetic word problems (GSM8K style) with worked solutions that call the calculator.

Each problem comes from one of several templates (shopping, sharing, travel, savings, printing,
gardens, collections, ticket sales), with small integers drawn from a seeded generator, and is
solved in 2 to 4 steps. A step is one binary operation on numbers from the question or on earlier
results, so its arithmetic is checkable and a solution can be corrupted in meaningful ways.

The worked solution follows GSM8K (Cobbe et al. 2021): one line per step and a final ``#### N``. In
the tool form each step's arithmetic is a calculator call in the compact payload ``calculator(4*3)``,
one call per assistant message, the result coming back as a tool message, exactly the token stream
the inference engine produces when it runs the call (see :mod:`llmkit.chat`)::

    <|assistant|>Cost of the pens: <|tool_call|>calculator(4*3)<|end|><|tool_result|>12<|end|>
    Total cost: <|tool_call|>calculator(12+10)<|end|><|tool_result|>22<|end|>
    #### 22<|end|>

The plain form writes the arithmetic inline (``Cost of the pens: 4*3 = 12``). Intermediate results
are whole and non-negative by construction, and computed exactly here (``fractions.Fraction``), not by
the calculator: the tests hold the two against each other. :func:`gsm8k_record` writes a problem as a
GSM8K record (``Cost of the pens: 4*3 = <<4*3=12>>12.`` ... ``#### 22``) for ``llmkit eval``'s generative
tasks.

Splits: the hash of a problem's text places it in one of four, disjoint whatever the seeds: ``heldout``
(the first ``HELDOUT_FRACTION`` of the hash range: the test problems every table reports), ``validation``
(for choosing among checkpoints, never the test), ``prompts`` (RL prompts, whose solutions no stage
shows: InstructGPT's PPO prompts without demonstrations) and ``train`` (worked solutions for SFT and
the preference pairs).

Preference pairs put the correct solution against a plausible wrong one (Lightman et al. 2023 call
such process errors "first wrong steps"): an operand off by one, a wrong operation, or a dropped step,
with every later step recomputed from the wrong value, so the calculator calls still evaluate to
their results and only the reasoning is wrong.
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction
from typing import Callable

from llmkit.chat import Conversation, Preference
from llmkit.config import check

HELDOUT_FRACTION = 0.1
# Upper ends of the other splits in the hash range (heldout's bucket is unchanged by them).
SPLIT_BOUNDS = {"heldout": HELDOUT_FRACTION, "validation": 0.15, "prompts": 0.6, "train": 1.0}
SPLITS = tuple(SPLIT_BOUNDS)
TOOL_NAME = "calculator"
TOOL_SYSTEM_PROMPT = (
    "Solve the problem step by step. Use calculator(expression) for arithmetic. End with '#### ' and the answer."
)
PLAIN_SYSTEM_PROMPT = "Solve the problem step by step. End with '#### ' and the answer."
_OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
ANSWER_MARKER = "####"
# The answer is the number right after the last marker: a strict format, so a reward cannot be had by
# scattering numbers through the text.
_NUMBER = re.compile(r"\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


@dataclass(frozen=True)
class Previous:
    """An operand that is the result of an earlier step."""

    index: int


@dataclass(frozen=True)
class Step:
    label: str
    operator: str
    left: int | Previous
    right: int | Previous


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[Step, ...]
    answer: int
    template: str


def step_values(steps: tuple[Step, ...] | list[Step]) -> list[Fraction]:
    """The exact result of every step."""
    values: list[Fraction] = []

    def operand(value: int | Previous) -> Fraction:
        return values[value.index] if isinstance(value, Previous) else Fraction(value)

    for step in steps:
        values.append(_OPERATIONS[step.operator](operand(step.left), operand(step.right)))
    return values


def expressions(steps: tuple[Step, ...] | list[Step]) -> list[str]:
    """Each step's arithmetic as written in its calculator call, e.g. ``12+10``."""
    values = step_values(steps)

    def text(value: int | Previous) -> str:
        return str(values[value.index].numerator) if isinstance(value, Previous) else str(value)

    return [f"{text(step.left)}{step.operator}{text(step.right)}" for step in steps]


def _whole_and_non_negative(steps) -> bool:
    try:
        return all(value.denominator == 1 and value >= 0 for value in step_values(steps))
    except ZeroDivisionError:
        return False


# ----------------------------------------------------------------------------------- templates
NAMES = [
    ("Maya", "she"),
    ("Leo", "he"),
    ("Aisha", "she"),
    ("Tom", "he"),
    ("Priya", "she"),
    ("Diego", "he"),
    ("Sofia", "she"),
    ("Kenji", "he"),
    ("Nora", "she"),
    ("Omar", "he"),
    ("Lena", "she"),
    ("Sam", "he"),
    ("Zara", "she"),
    ("Ivan", "he"),
    ("Chloe", "she"),
    ("Ravi", "he"),
]
ITEMS = ["notebook", "pen", "apple", "sticker", "candle", "mug", "ticket", "comic", "plant", "sandwich"]
FOODS = ["cookies", "muffins", "dumplings", "pancakes", "tarts"]
VEHICLES = ["train", "bus", "truck", "ferry", "car"]
THINGS = ["marbles", "stamps", "cards", "shells", "beads"]
PURCHASES = ["game", "jacket", "bike lamp", "book set", "pair of shoes"]
P0, P1, P2 = Previous(0), Previous(1), Previous(2)


def _shopping(rng: random.Random) -> tuple[str, list[Step]]:
    (name, _), (first, second) = rng.choice(NAMES), rng.sample(ITEMS, 2)
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 12)
    bill = next(bill for bill in (20, 50, 100, 200, 500) if bill >= a * p + b * q)  # the cost is at most 2 * 9 * 12
    question = (
        f"{name} buys {a} {first}s at ${p} each and {b} {second}s at ${q} each. "
        f"{name} pays with a ${bill} bill. How much change does {name} get?"
    )
    return question, [
        Step(f"Cost of the {first}s", "*", a, p),
        Step(f"Cost of the {second}s", "*", b, q),
        Step("Total cost", "+", P0, P1),
        Step("Change", "-", bill, P2),
    ]


def _sharing(rng: random.Random) -> tuple[str, list[Step]]:
    (name, pronoun), food = rng.choice(NAMES), rng.choice(FOODS)
    trays, per, friends, each = rng.randint(2, 6), rng.randint(4, 12), rng.randint(2, 8), rng.randint(2, 9)
    kept = trays * per - friends * each
    if kept < 1:
        return _sharing(rng)
    question = (
        f"{name} bakes {trays} trays of {per} {food}. {pronoun.capitalize()} keeps {kept} {food} and shares "
        f"the rest equally among {friends} friends. How many {food} does each friend get?"
    )
    return question, [
        Step(f"{food.capitalize()} baked", "*", trays, per),
        Step(f"{food.capitalize()} to share", "-", P0, kept),
        Step(f"{food.capitalize()} per friend", "/", P1, friends),
    ]


def _travel(rng: random.Random) -> tuple[str, list[Step]]:
    vehicle = rng.choice(VEHICLES)
    s1, h1, s2, h2 = rng.randint(3, 12) * 10, rng.randint(2, 5), rng.randint(3, 12) * 10, rng.randint(2, 5)
    question = f"A {vehicle} travels at {s1} km per hour for {h1} hours and then at {s2} km per hour for {h2} hours. "
    steps = [Step("First part", "*", s1, h1), Step("Second part", "*", s2, h2), Step("Total distance", "+", P0, P1)]
    if rng.random() < 0.5:
        return question + "How many kilometers does it travel in total?", steps
    trip = (s1 * h1 + s2 * h2) // 100 * 100 + rng.randint(1, 4) * 100
    return (
        question + f"How many kilometers are left of its {trip} km trip?",
        steps + [Step("Distance left", "-", trip, P2)],
    )


def _savings(rng: random.Random) -> tuple[str, list[Step]]:
    (name, pronoun), purchase = rng.choice(NAMES), rng.choice(PURCHASES)
    weekly, weeks = rng.randint(3, 15), rng.randint(3, 12)
    spent = rng.randint(5, weekly * weeks - 1)
    question = (
        f"{name} saves ${weekly} every week for {weeks} weeks. Then {pronoun} spends ${spent} on a {purchase}. "
        f"How much money does {name} have left?"
    )
    return question, [Step("Money saved", "*", weekly, weeks), Step("Money left", "-", P0, spent)]


def _printing(rng: random.Random) -> tuple[str, list[Step]]:
    copies, pages = rng.randint(2, 12), rng.randint(3, 20)
    rates = [rate for rate in range(2, 13) if copies * pages % rate == 0 and rate < copies * pages]
    if not rates:
        return _printing(rng)
    rate = rng.choice(rates)
    question = (
        f"A printer prints {rate} pages per minute. How many minutes does it take to print "
        f"{copies} copies of a {pages}-page report?"
    )
    return question, [Step("Pages to print", "*", copies, pages), Step("Minutes", "/", P0, rate)]


def _garden(rng: random.Random) -> tuple[str, list[Step]]:
    length, width, density = rng.randint(4, 15), rng.randint(3, 12), rng.randint(2, 6)
    path = rng.randint(2, length * width - 1)
    question = (
        f"A rectangular garden is {length} meters long and {width} meters wide. A path covers {path} square "
        f"meters of it, and the rest is planted with {density} flowers per square meter. How many flowers are planted?"
    )
    return question, [
        Step("Garden area", "*", length, width),
        Step("Planted area", "-", P0, path),
        Step("Flowers", "*", P1, density),
    ]


def _collection(rng: random.Random) -> tuple[str, list[Step]]:
    ((name, pronoun), (friend, _)), things = rng.sample(NAMES, 2), rng.choice(THINGS)
    have, packs, per = rng.randint(10, 60), rng.randint(2, 6), rng.randint(3, 12)
    given = rng.randint(1, have - 1)
    question = (
        f"{name} has {have} {things}. {pronoun.capitalize()} gives {given} to {friend} and then buys {packs} packs "
        f"of {per} {things}. How many {things} does {name} have now?"
    )
    return question, [
        Step(f"{things.capitalize()} after giving", "-", have, given),
        Step(f"{things.capitalize()} bought", "*", packs, per),
        Step(f"{things.capitalize()} now", "+", P0, P1),
    ]


def _tickets(rng: random.Random) -> tuple[str, list[Step]]:
    rows, seats, price = rng.randint(4, 15), rng.randint(6, 20), rng.randint(3, 12)
    taken = rng.randint(1, rows * seats - 1)
    question = (
        f"A hall has {rows} rows of {seats} seats, and {taken} seats are already sold. The remaining seats "
        f"cost ${price} each. How much money is made if every remaining seat is sold?"
    )
    return question, [
        Step("Seats in the hall", "*", rows, seats),
        Step("Remaining seats", "-", P0, taken),
        Step("Money made", "*", P1, price),
    ]


TEMPLATES: dict[str, Callable[[random.Random], tuple[str, list[Step]]]] = {
    "shopping": _shopping,
    "sharing": _sharing,
    "travel": _travel,
    "savings": _savings,
    "printing": _printing,
    "garden": _garden,
    "collection": _collection,
    "tickets": _tickets,
}


# ----------------------------------------------------------------------------------- problems
def split_of(question: str) -> str:
    """One of :data:`SPLITS`, a fixed function of the problem text."""
    digest = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return next(split for split, bound in SPLIT_BOUNDS.items() if digest < bound * 2**64)


def generate_problems(count: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """``count`` distinct problems of ``split``, a pure function of ``seed``."""
    check(split in SPLITS, "split", split, f"must be one of {', '.join(SPLITS)}")
    check(count >= 0, "count", count, "must be >= 0")
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    while len(problems) < count:
        template = rng.choice(sorted(TEMPLATES))
        question, steps = TEMPLATES[template](rng)
        if question in problems or split_of(question) != split:
            continue
        problems[question] = Problem(question, tuple(steps), int(step_values(steps)[-1]), template)
    return list(problems.values())


def final_answer(text: str) -> Decimal | None:
    """The number after the last ``####`` (thousands commas and a dollar sign allowed), else None."""
    marker = text.rfind(ANSWER_MARKER)
    match = _NUMBER.match(text, marker + len(ANSWER_MARKER)) if marker >= 0 else None
    return Decimal(match.group(1).replace(",", "")) if match else None


def check_answer(problem: Problem, text: str) -> bool:
    """Whether ``text`` ends its solution with ``#### N`` for exactly the right N."""
    answer = final_answer(text)
    return answer is not None and answer == problem.answer


# ----------------------------------------------------------------------------------- solutions
def solution_messages(steps: tuple[Step, ...] | list[Step], with_tools: bool = True) -> list[dict]:
    """The assistant's worked solution: calculator calls and their results, or inline arithmetic."""
    values, written = step_values(steps), expressions(steps)
    final = f"{ANSWER_MARKER} {values[-1].numerator}"
    if not with_tools:
        lines = [
            f"{step.label}: {expression} = {value.numerator}" for step, expression, value in zip(steps, written, values)
        ]
        return [{"role": "assistant", "content": "\n".join(lines + [final])}]
    messages: list[dict] = []
    for index, (step, expression, value) in enumerate(zip(steps, written, values)):
        call = {"type": "custom", "custom": {"name": TOOL_NAME, "input": expression}}
        messages.append(
            {"role": "assistant", "content": ("\n" if index else "") + f"{step.label}: ", "tool_calls": [call]}
        )
        messages.append({"role": "tool", "content": str(value.numerator)})
    messages.append({"role": "assistant", "content": "\n" + final})
    return messages


def gsm8k_record(problem: Problem) -> dict[str, str]:
    """The problem in GSM8K's format (Cobbe et al. 2021): ``{"question", "answer"}``, the answer one line per
    step with the step's arithmetic as a calculator annotation, then ``#### N``::

        Cost of the pens: 4*3 = <<4*3=12>>12.
        ...
        #### 22

    so :func:`llmkit.eval.generative.load_gsm8k` and its ``rationale()`` read it as they read GSM8K: with
    the calculator every annotation becomes the call ``calculator(4*3)`` and its result, without it the
    line reads ``Cost of the pens: 4*3 = 12.`` (the plain form of :func:`solution_messages`)."""
    values, written = step_values(problem.steps), expressions(problem.steps)
    lines = [
        f"{step.label}: {expression} = <<{expression}={value.numerator}>>{value.numerator}."
        for step, expression, value in zip(problem.steps, written, values)
    ]
    return {"question": problem.question, "answer": "\n".join(lines + [f"{ANSWER_MARKER} {problem.answer}"])}


def prompt_messages(problem: Problem, with_tools: bool = True) -> list[dict]:
    system = TOOL_SYSTEM_PROMPT if with_tools else PLAIN_SYSTEM_PROMPT
    return [{"role": "system", "content": system}, {"role": "user", "content": problem.question}]


def to_conversation(problem: Problem, with_tools: bool = True) -> Conversation:
    return Conversation(
        prompt_messages(problem, with_tools) + solution_messages(problem.steps, with_tools), task="arithmetic"
    )


def corruptions(steps: tuple[Step, ...]) -> list[tuple[str, list[Step]]]:
    """Every plausible wrong solution ``(kind, steps)``: whole non-negative intermediate results and a
    final answer other than the right one."""
    candidates: list[tuple[str, list[Step]]] = []
    for index, step in enumerate(steps):
        for side in ("left", "right"):
            literal = getattr(step, side)
            if isinstance(literal, int):
                candidates += [
                    ("off_by_one", _with_step(steps, index, replace(step, **{side: literal + delta})))
                    for delta in (-1, 1)
                    if literal + delta > 0
                ]
        candidates += [
            ("wrong_operation", _with_step(steps, index, replace(step, operator=symbol)))
            for symbol in _OPERATIONS
            if symbol != step.operator
        ]
        if len(steps) > 1:
            candidates.append(("dropped_step", _without_step(steps, index)))
    answer = step_values(steps)[-1]
    return [
        (kind, wrong)
        for kind, wrong in candidates
        if _whole_and_non_negative(wrong) and step_values(wrong)[-1] != answer
    ]


def _with_step(steps: tuple[Step, ...], index: int, new: Step) -> list[Step]:
    return [new if position == index else step for position, step in enumerate(steps)]


def _without_step(steps: tuple[Step, ...], dropped: int) -> list[Step]:
    """Skip one step: whatever used its result uses the step's first operand instead (the quantity it
    would have changed), as a solver who forgot that step would."""

    def moved(operand: int | Previous) -> int | Previous:
        if not isinstance(operand, Previous):
            return operand
        if operand.index == dropped:
            return moved(steps[dropped].left)
        return Previous(operand.index - (operand.index > dropped))

    return [
        replace(step, left=moved(step.left), right=moved(step.right))
        for position, step in enumerate(steps)
        if position != dropped
    ]


def preference_pairs(problems: list[Problem], seed: int = 0, with_tools: bool = True) -> list[Preference]:
    """(correct solution, plausible wrong solution) for every problem that has a wrong variant."""
    rng = random.Random(seed)
    pairs = []
    for problem in problems:
        options = corruptions(problem.steps)
        if not options:
            continue
        # Pick the kind first so the three kinds are equally common whatever their candidate counts.
        kind = rng.choice(sorted({kind for kind, _ in options}))
        wrong = rng.choice([steps for option_kind, steps in options if option_kind == kind])
        pairs.append(
            Preference(
                prompt_messages(problem, with_tools),
                solution_messages(problem.steps, with_tools),
                solution_messages(wrong, with_tools),
            )
        )
    return pairs
