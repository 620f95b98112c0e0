"""A safe arithmetic evaluator: the ``calculator`` tool's engine.

The expression is parsed with Python's own grammar (``ast.parse(mode="eval")``) and
the tree is walked by hand; nothing is ever passed to ``eval``. Only these nodes are
accepted: numeric literals, ``+ - * / // % **``, unary ``+``/``-``, parentheses (implicit
in the tree) and calls of ``sqrt``, ``abs``, ``round``, ``min``, ``max`` by name. Any
other node (a name, an attribute, a subscript, a lambda, a comprehension, a string,
...) is refused with a message that says what it was.

Arithmetic is exact where it can be: literals become ``fractions.Fraction`` (``0.1`` is
one tenth, not the nearest binary float), so ``0.1 + 0.2`` is ``0.3`` and ``7 / 2 * 2`` is
``7``. Only irrational operations (``sqrt`` of a non-square, a fractional power) drop to
``float``. Results print the way a person writes them: ``12`` not ``12.0``, ``2.5`` for
``5/2``, at most 12 significant digits for a value with no finite decimal form.

The calculator runs inside the chat and RL processes, in their threads, so nothing it is
given may take long. Exact integers can grow without bound, so every value is held to
``MAX_DIGITS``; the operands of ``+ - * / // %`` are therefore at most that size too, and
those operations take microseconds (``<<``, string repetition and factorials are not
available at all). The two operations whose result can dwarf their operands are refused
*before* they are computed: a power whose size (exponent times the bits of the base) would
pass the limit (``9**9**9`` would take gigabytes), and ``round(x, digits)`` with more than
``MAX_DIGITS`` digits (it computes ``10**digits`` first, so ``round(1/3, 10**9)`` would take
hours). ``MAX_EXPRESSION_CHARS`` bounds the number of operations, and ``TIME_LIMIT_S``,
checked at every node of the walk (a thread cannot be interrupted from outside), bounds
their total.
"""

from __future__ import annotations

import ast
import decimal
import math
import time
from fractions import Fraction

MAX_DIGITS = 1000  # far beyond any word problem, and small enough that every operation on such values is instant
_TOO_LARGE = 10**MAX_DIGITS
_TOO_LARGE_BITS = _TOO_LARGE.bit_length()  # 2**_TOO_LARGE_BITS is past MAX_DIGITS
MAX_EXPRESSION_CHARS = 2000  # bounds the number of operations: each node of the tree takes at least one character
# Operations inside operations: a sum of 500 terms, far more than any word problem, and few enough Python frames
# for the walk to stay under the interpreter's default recursion limit. Without it the refusal of a deep
# expression depended on that limit, which torch.compile raises.
MAX_NESTING = 500
TIME_LIMIT_S = 1.0  # a backstop for a long expression on a busy machine; typical calls take well under a millisecond
_SIGNIFICANT_DIGITS = 12

Number = int | Fraction | float


class CalculatorError(ValueError):
    """An expression that is not arithmetic, or whose value cannot be computed."""


def _sqrt(value: Number) -> Number:
    if value < 0:
        raise CalculatorError("square root of a negative number")
    if isinstance(value, Fraction):
        numerator_root, denominator_root = math.isqrt(value.numerator), math.isqrt(value.denominator)
        if numerator_root**2 == value.numerator and denominator_root**2 == value.denominator:
            return Fraction(numerator_root, denominator_root)
    return math.sqrt(value)


def _round(value: Number, digits: Number | None = None) -> Number:
    if digits is None:
        return round(value)
    if not (isinstance(digits, Fraction) and digits.denominator == 1):
        raise CalculatorError("round(x, digits) needs a whole number of digits")
    if abs(digits) > MAX_DIGITS:  # round() computes 10**digits first, before any result check could apply
        raise CalculatorError(f"round(x, digits) takes digits from -{MAX_DIGITS} to {MAX_DIGITS}")
    return round(value, int(digits))


FUNCTIONS = {"sqrt": _sqrt, "abs": abs, "round": _round, "min": min, "max": max}

_BINARY = {
    ast.Add: lambda left, right: left + right,
    ast.Sub: lambda left, right: left - right,
    ast.Mult: lambda left, right: left * right,
    ast.Div: lambda left, right: left / right,
    ast.FloorDiv: lambda left, right: left // right,
    ast.Mod: lambda left, right: left % right,
}

_DESCRIPTIONS = {
    ast.Name: "a name",
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Lambda: "a lambda",
    ast.ListComp: "a list comprehension",
    ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.Compare: "a comparison",
    ast.BoolOp: "and/or",
    ast.IfExp: "a conditional expression",
    ast.Tuple: "a tuple",
    ast.List: "a list",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.JoinedStr: "a string",
    ast.NamedExpr: "an assignment",
    ast.Starred: "unpacking",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.BitXor: "'^' (bitwise xor)",
    ast.BitAnd: "'&'",
    ast.BitOr: "'|'",
    ast.LShift: "'<<'",
    ast.RShift: "'>>'",
    ast.MatMult: "'@'",
    ast.Invert: "'~'",
    ast.Not: "'not'",
}
# What a person (or model) writing arithmetic most likely meant.
_HINTS = {ast.Tuple: "; write 1000, not 1,000", ast.BitXor: "; write ** for a power"}


def _refuse(node: ast.AST, expression: str) -> CalculatorError:
    description = _DESCRIPTIONS.get(type(node), type(node).__name__)
    segment = ast.get_source_segment(expression, node) if hasattr(node, "lineno") else None
    where = f" ({segment!r})" if segment else ""
    hint = _HINTS.get(type(node), "")
    return CalculatorError(f"{description}{where} is not allowed: the calculator only evaluates arithmetic{hint}")


def _checked(value) -> Number:
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large")
    if isinstance(value, int):
        value = Fraction(value)
    if isinstance(value, Fraction) and (abs(value.numerator) >= _TOO_LARGE or value.denominator >= _TOO_LARGE):
        raise CalculatorError(f"the result is too large (more than {MAX_DIGITS} digits)")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(exponent, Fraction) and exponent.denominator == 1:
        # Exact: the larger of numerator and denominator, m >= 2**(bits - 1), becomes m**|exponent|, so a lower
        # bound on the result's size refuses it before computing, in integers that cannot overflow; what passes
        # has at most twice the limit's bits and _checked then applies the exact limit.
        if isinstance(base, Fraction) and abs(base) not in (0, 1):
            bits = max(abs(base.numerator), base.denominator).bit_length()
            if abs(exponent.numerator) * (bits - 1) >= _TOO_LARGE_BITS:
                raise CalculatorError(f"the result is too large (more than {MAX_DIGITS} digits)")
        return base ** int(exponent)
    if base < 0:
        raise CalculatorError("a negative number to a fractional power is not a real number")
    return float(base) ** float(exponent)


class _Walk:
    """One evaluation: the source text (for messages) and the deadline that every node checks."""

    def __init__(self, expression: str, time_limit_s: float):
        self.expression, self.time_limit_s = expression, time_limit_s
        self.deadline = time.monotonic() + time_limit_s

    def value(self, node: ast.AST, depth: int = 0) -> Number:
        if depth > MAX_NESTING:
            raise CalculatorError(f"the expression is nested too deeply (over {MAX_NESTING} operations within others)")
        if time.monotonic() > self.deadline:
            raise CalculatorError(f"the expression took longer than the calculator's {self.time_limit_s} s")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = _checked(node.value)
            # repr() is the float's shortest round-trip decimal, i.e. the literal as written.
            return _checked(Fraction(repr(value))) if isinstance(value, float) else value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self.value(node.operand, depth + 1)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Pow)):
            left, right = self.value(node.left, depth + 1), self.value(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                return _checked(_power(left, right))
            return _checked(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        if isinstance(node, ast.Constant):
            raise CalculatorError(f"{node.value!r} is not a number")
        raise _refuse(node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node, self.expression)

    def call(self, node: ast.Call, depth: int) -> Number:
        if not isinstance(node.func, ast.Name):
            raise _refuse(node.func, self.expression)
        if node.func.id not in FUNCTIONS:
            raise CalculatorError(
                f"function '{node.func.id}' is not available; the functions are {', '.join(FUNCTIONS)}"
            )
        if node.keywords:
            raise CalculatorError(f"{node.func.id}() takes positional arguments only")
        arguments = [self.value(argument, depth + 1) for argument in node.args]
        try:
            return _checked(FUNCTIONS[node.func.id](*arguments))
        except TypeError:
            raise CalculatorError(f"{node.func.id}() cannot take {len(arguments)} argument(s)") from None


def evaluate(expression: str, time_limit_s: float = TIME_LIMIT_S) -> Number:
    """The value of an arithmetic expression: a ``Fraction`` when exact, else a ``float``; refused past
    ``time_limit_s``."""
    expression = expression.strip()
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    if not expression:
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as error:
        raise CalculatorError(f"not a valid expression ({error.msg})") from None
    except (RecursionError, MemoryError):
        raise CalculatorError("the expression is nested too deeply") from None
    try:
        return _Walk(expression, time_limit_s).value(tree.body)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large for a floating-point number") from None
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None


def format_number(value: Number) -> str:
    """``12`` for twelve, ``2.5`` for five halves, 12 significant digits when no short exact form exists."""
    if value == 0:
        return "0"  # also for -0.0
    if isinstance(value, Fraction):
        if value.denominator == 1:
            return str(value.numerator)
        # A finite decimal exists when the denominator divides a power of ten (only factors 2 and 5).
        for places in range(1, _SIGNIFICANT_DIGITS + 4):
            if 10**places % value.denominator == 0:
                digits = str(abs(value.numerator) * (10**places // value.denominator)).rjust(places + 1, "0")
                sign = "-" if value < 0 else ""
                return f"{sign}{digits[:-places]}.{digits[-places:]}"
        with decimal.localcontext() as context:  # a float would overflow or underflow past 1e±308
            context.prec = _SIGNIFICANT_DIGITS
            return format(decimal.Decimal(value.numerator) / value.denominator, "g")
    return format(value, f".{_SIGNIFICANT_DIGITS}g")


def calculate(expression: str) -> str:
    """Evaluate ``expression`` and format the result (the ``calculator`` tool's function)."""
    return format_number(evaluate(expression))
