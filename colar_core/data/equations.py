"""Checking GSM8k-Aug equation steps and parsing numeric answers.

A step is ``lhs=rhs`` where both sides are arithmetic expressions (``+ - * /`` and ``//`` floor
division, parentheses, unary minus, decimals such as ``.5``): every operator GSM8K's calculator
annotations use. We evaluate both sides with a tiny ``ast`` walker (never ``eval``) and accept
the step if they agree up to rounding, because the real data rounds (``<<10/3=3.33>>``) and
sometimes leaves the right side unevaluated (``<<3/4=3/4>>``).
(GSM8K train uses ``//`` twice: ``<<560//10=56>>``, ``<<180//3=60>>``; no annotation of train or
test uses ``%`` or ``**``, which stay refused. All 27,998 annotations agree within ``REL_TOL``:
none needs the rounding rule.)
"""
from __future__ import annotations

import ast
import math
import operator
import re

__all__ = ["check_equation", "evaluate", "parse_number", "answer_value", "REL_TOL", "MAX_OPERATORS", "MAX_ANSWER"]

#: Float-noise tolerance between the two sides: ``|lhs - rhs| <= REL_TOL * max(1, |rhs|)``.
#: (The real GSM8k-Aug valid/test files agree to ~1e-16.)
REL_TOL = 1e-6
#: Most operators and parentheses in one side of a step. A real step has a handful; thousands would
#: only exhaust the parser's recursion (a bad record, not a crash).
MAX_OPERATORS = 200
#: Largest answer magnitude accepted: up to here a float holds every integer exactly (2**53 ~ 9e15),
#: so scoring a prediction is not decided by rounding.
MAX_ANSWER = 1e15

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_DIVISIONS = (ast.Div, ast.FloorDiv)
_ALLOWED_CHARS = re.compile(r"^[0-9.+\-*/() ]+$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)$")
_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")  # "08" is a SyntaxError for ast


def _short(text: str, limit: int = 60) -> str:
    """``text`` cut for an error message (a runaway expression is not quoted in full)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def evaluate(expr: str) -> float:
    """Value of an arithmetic expression; ``ValueError`` if it is not one, divides by zero, or is too
    large to evaluate (over ``MAX_OPERATORS`` operators, a number beyond float range)."""
    text = expr.strip()
    if not text:
        raise ValueError("empty expression")
    if not _ALLOWED_CHARS.match(text):
        bad = sorted({c for c in text if not _ALLOWED_CHARS.match(c)})
        raise ValueError(f"expression '{_short(expr)}' has unsupported characters {''.join(bad)!r}")
    operators = sum(text.count(c) for c in "+-*/(")
    if operators > MAX_OPERATORS:
        raise ValueError(f"expression '{_short(expr)}' has {operators:,} operators and parentheses, "
                         f"over the limit of {MAX_OPERATORS}")
    try:
        return _walk(ast.parse(_LEADING_ZEROS.sub("", text), mode="eval").body, expr)
    except SyntaxError:
        raise ValueError(f"expression '{_short(expr)}' does not parse") from None
    except (RecursionError, MemoryError):
        raise ValueError(f"expression '{_short(expr)}' is nested too deeply to evaluate") from None


def _walk(node: ast.AST, expr: str) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        try:
            value = float(node.value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ValueError(f"expression '{_short(expr)}' has a number beyond float range")
        return value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _walk(node.operand, expr)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _walk(node.left, expr), _walk(node.right, expr)
        if isinstance(node.op, _DIVISIONS) and right == 0:
            raise ValueError(f"expression '{_short(expr)}' divides by zero")
        value = _BINOPS[type(node.op)](left, right)
        if not math.isfinite(value):
            raise ValueError(f"expression '{_short(expr)}' overflows")
        return value
    raise ValueError(f"expression '{_short(expr)}' does not parse")


def _fmt(x: float) -> str:
    """Short human form of a value for error messages (``4`` not ``4.0``)."""
    return str(int(x)) if x == int(x) and abs(x) < 1e15 else f"{x:.6g}"


def _agrees(left: float, right: float, rhs_text: str) -> bool:
    """Equal up to float noise, or ``rhs`` is a plain number that is ``lhs`` rounded or truncated
    to the decimals it shows (``10/3=3.33``, ``2/3=.66``, ``100/3=33``): within one unit of its
    last digit. ``2+2=5`` is off by a whole unit and fails; ``990+10=1010`` fails too (a flat
    relative tolerance of 1% would wrongly accept it)."""
    diff = abs(left - right)
    if diff <= REL_TOL * max(1.0, abs(right)):
        return True
    text = rhs_text.strip()
    if not _NUMBER.match(text):
        return False
    decimals = len(text.split(".", 1)[1]) if "." in text else 0
    return diff < 10.0 ** -decimals


def check_equation(eq: str) -> None:
    """Raise ``ValueError`` (with a readable reason) unless ``eq`` is ``lhs=rhs`` with equal sides."""
    if not isinstance(eq, str):
        raise ValueError(f"equation must be a string, got {type(eq).__name__}")
    if eq.count("=") != 1:
        raise ValueError(f"equation '{_short(eq)}' must contain exactly one '='")
    lhs, rhs = eq.split("=")
    try:
        left, right = evaluate(lhs), evaluate(rhs)
    except ValueError as err:
        raise ValueError(f"equation '{_short(eq)}': {err}") from None
    if not _agrees(left, right, rhs):
        raise ValueError(f"equation '{eq}' evaluates to {_fmt(left)}, not {_fmt(right)}")


def _number_text(s: object) -> str | None:
    """An answer string reduced to a plain number (commas, spaces and one trailing ``.`` dropped);
    None for anything else, a non-string included."""
    if not isinstance(s, str):
        return None
    text = s.replace(",", "").replace(" ", "").strip()
    if text.endswith(".") and len(text) > 1:
        text = text[:-1]
    return text if _NUMBER.match(text) else None


def parse_number(s: str) -> float | None:
    """Float value of an answer string such as ``"1,450,000"``, ``" 18."`` or ``"-3.5"``; else ``None``.

    Commas and spaces are dropped and one trailing ``.`` is ignored; ``nan``/``inf`` are rejected, and
    so is a number too long for a float (it would be ``inf``).
    """
    text = _number_text(s)
    value = None if text is None else float(text)
    return value if value is not None and math.isfinite(value) else None


def answer_value(s: str) -> float:
    """Value of a record's answer; ``ValueError`` saying why it is refused: not a number, or out of
    range (non-finite, or beyond ``MAX_ANSWER`` in magnitude)."""
    text = _number_text(s)
    if text is None:
        raise ValueError(f"answer '{_short(str(s))}' is not a number")
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_ANSWER:
        raise ValueError(f"answer '{_short(str(s))}' is out of range (beyond +-{MAX_ANSWER:.0e})")
    return value
