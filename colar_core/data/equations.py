"""Checking GSM8k-Aug equation steps and parsing numeric answers.

A step is ``lhs=rhs`` where both sides are arithmetic expressions (``+ - * /``, parentheses,
unary minus, decimals such as ``.5``). We evaluate both sides with a tiny ``ast`` walker (never
``eval``) and accept the step if they agree up to rounding, because the real data rounds
(``<<10/3=3.33>>``) and sometimes leaves the right side unevaluated (``<<3/4=3/4>>``).
"""
from __future__ import annotations

import ast
import math
import operator
import re

__all__ = ["check_equation", "evaluate", "parse_number", "REL_TOL"]

#: Float-noise tolerance between the two sides: ``|lhs - rhs| <= REL_TOL * max(1, |rhs|)``.
#: (The real GSM8k-Aug valid/test files agree to ~1e-16.)
REL_TOL = 1e-6

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_ALLOWED_CHARS = re.compile(r"^[0-9.+\-*/() ]+$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)$")
_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")  # "08" is a SyntaxError for ast


def evaluate(expr: str) -> float:
    """Value of an arithmetic expression; ``ValueError`` if it is not one (or divides by zero)."""
    text = expr.strip()
    if not text:
        raise ValueError("empty expression")
    if not _ALLOWED_CHARS.match(text):
        bad = sorted({c for c in text if not _ALLOWED_CHARS.match(c)})
        raise ValueError(f"expression '{expr}' has unsupported characters {''.join(bad)!r}")
    try:
        tree = ast.parse(_LEADING_ZEROS.sub("", text), mode="eval")
    except SyntaxError:
        raise ValueError(f"expression '{expr}' does not parse") from None
    return _walk(tree.body, expr)


def _walk(node: ast.AST, expr: str) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _walk(node.operand, expr)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _walk(node.left, expr), _walk(node.right, expr)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError(f"expression '{expr}' divides by zero")
        value = _BINOPS[type(node.op)](left, right)
        if not math.isfinite(value):
            raise ValueError(f"expression '{expr}' overflows")
        return value
    raise ValueError(f"expression '{expr}' does not parse")


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
        raise ValueError(f"equation '{eq}' must contain exactly one '='")
    lhs, rhs = eq.split("=")
    try:
        left, right = evaluate(lhs), evaluate(rhs)
    except ValueError as err:
        raise ValueError(f"equation '{eq}': {err}") from None
    if not _agrees(left, right, rhs):
        raise ValueError(f"equation '{eq}' evaluates to {_fmt(left)}, not {_fmt(right)}")


def parse_number(s: str) -> float | None:
    """Float value of an answer string such as ``"1,450,000"``, ``" 18."`` or ``"-3.5"``; else ``None``.

    Commas and spaces are dropped and one trailing ``.`` is ignored; ``nan``/``inf`` are rejected.
    """
    if not isinstance(s, str):
        return None
    text = s.replace(",", "").replace(" ", "").strip()
    if text.endswith(".") and len(text) > 1:
        text = text[:-1]
    if not _NUMBER.match(text):
        return None
    return float(text)
