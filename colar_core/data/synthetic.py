"""Built-in multi-step arithmetic word problems in GSM8k-Aug form (no download needed).

Why this exists: the project needs a task that trains in minutes on a CPU and on which the
chain of thought clearly matters. docs/METHOD.md ("Measured here at tiny scale") found that a task
solvable in one or two operations is learned without any chain, while three *dependent*
operations break direct answering. So every problem here is a chain: a start value, then
operations each applied to the previous result (``4*7=28``, ``28-5=23``, ``23+9=32``), told as a
short story about one person and one kind of object. All values are non-negative integers
≤ 999 so a word-level tokenizer can keep every number as one token.

Difficulty presets (``difficulty=``):

========  =======  ================  ===============
preset    steps    operands up to    values up to
========  =======  ================  ===============
easy      2-3      50                200   (CPU demo; 3 steps twice as likely as 2)
medium    3-4      100               500
hard      3-6      999               999   (GPU benchmark)
int k     ⌈k/2⌉-k  100 (k≤4) / 999   500 / 999
========  =======  ================  ===============
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .records import Record

__all__ = ["generate_problems", "builtin_splits", "DifficultySpec", "difficulty_spec"]


@dataclass(frozen=True)
class DifficultySpec:
    """Bounds for one preset: step counts (with weights), operand and value ceilings."""

    min_steps: int
    max_steps: int
    max_operand: int
    max_value: int
    max_factor: int  # largest multiplier / divisor, keeps products inside max_value
    step_weights: tuple[float, ...] | None = None  # weights for min_steps..max_steps


_PRESETS = {
    # "tiny": the CPU demo's task: small facts a few-minute CPU run can learn, still 2-3 dependent steps
    "tiny": DifficultySpec(2, 3, 12, 60, 5, (1.0, 2.0)),
    "easy": DifficultySpec(2, 3, 50, 200, 9, (1.0, 2.0)),
    "medium": DifficultySpec(3, 4, 100, 500, 12),
    "hard": DifficultySpec(3, 6, 999, 999, 20),
}


def difficulty_spec(difficulty: str | int) -> DifficultySpec:
    """The :class:`DifficultySpec` for a preset name or an int (= maximum number of steps)."""
    if isinstance(difficulty, bool):
        raise ValueError("difficulty must be 'easy', 'medium', 'hard' or a positive int")
    if isinstance(difficulty, int) or (isinstance(difficulty, str) and difficulty.isdigit()):
        k = int(difficulty)
        if k < 1:
            raise ValueError("difficulty as an int is the maximum number of steps and must be >= 1")
        if k <= 4:
            return DifficultySpec(max(1, (k + 1) // 2), k, 100, 500, 12)
        return DifficultySpec((k + 1) // 2, k, 999, 999, 20)
    if difficulty not in _PRESETS:
        raise ValueError(f"unknown difficulty '{difficulty}'; expected tiny, easy, medium, hard or an int")
    return _PRESETS[difficulty]


# --------------------------------------------------------------------------- story material

_NAMES = [
    ("Mia", "she"), ("Liam", "he"), ("Olivia", "she"), ("Noah", "he"), ("Emma", "she"),
    ("James", "he"), ("Ava", "she"), ("Lucas", "he"), ("Sofia", "she"), ("Ethan", "he"),
    ("Zoe", "she"), ("Omar", "he"), ("Priya", "she"), ("Diego", "he"), ("Hana", "she"),
    ("Kofi", "he"), ("Lena", "she"), ("Mateo", "he"), ("Aisha", "she"), ("Ben", "he"),
    ("Chloe", "she"), ("Ravi", "he"), ("Nora", "she"), ("Sam", "he"), ("Yuki", "she"),
    ("Tom", "he"), ("Ines", "she"), ("Felix", "he"), ("Grace", "she"), ("Jamal", "he"),
    ("Elena", "she"), ("Marco", "he"), ("Leila", "she"), ("Hugo", "he"), ("Maya", "she"),
    ("Ivan", "he"), ("Rosa", "she"), ("Theo", "he"), ("Amara", "she"), ("Kenji", "he"),
]
_FRIENDS = ["a friend", "a neighbor", "a classmate", "a cousin", "a teacher", "a brother", "a sister"]
# (items, pack word) — packs hold a number of items each.
_OBJECTS = [
    ("pencils", "box"), ("marbles", "bag"), ("stickers", "sheet"), ("apples", "basket"),
    ("cookies", "tray"), ("books", "shelf"), ("coins", "jar"), ("stamps", "album"),
    ("shells", "bucket"), ("cards", "deck"), ("beads", "string"), ("balloons", "pack"),
    ("crayons", "box"), ("buttons", "tin"), ("seeds", "packet"), ("eggs", "carton"),
    ("cupcakes", "tray"), ("postcards", "bundle"), ("toy cars", "case"), ("paper cranes", "box"),
    ("oranges", "crate"), ("candles", "pack"), ("bottles", "crate"), ("flowers", "bunch"),
    ("muffins", "tray"), ("stones", "pouch"), ("ribbons", "roll"), ("puzzles", "stack"),
]
_OBJ = {"she": "her", "he": "him"}
_POSS = {"she": "her", "he": "his"}

# Openings that already perform the first operation: (op) -> phrasings.
_START = {
    "*": ["{N} buys {a} {packs} of {items} with {x} {items} in each {pack}.",
          "{N} has {a} {packs} of {items}, and each {pack} holds {x} {items}.",
          "There are {a} {packs} in {N}'s room with {x} {items} in every {pack}."],
    "+": ["{N} has {a} {items} and finds {x} more.",
          "{N} collects {a} {items} on Monday and {x} more on Tuesday.",
          "{N} starts with {a} {items}, then {friend} gives {n_obj} {x} more."],
    "-": ["{N} has {a} {items} and gives {x} of them to {friend}.",
          "{N} buys {a} {items} and loses {x} on the way home.",
          "{N} starts with {a} {items} and uses {x} of them."],
    "/": ["{N} has {a} {items} and splits them equally into {x} {packs}, keeping one {pack}.",
          "{N} shares {a} {items} equally among {x} people, {n_self} included, and keeps {n_poss} share.",
          "{N} picks {a} {items} and puts them into {x} equal piles, keeping only one pile."],
}
# Later operations act on what the person has now.
_NEXT = {
    "+": ["Then {p} buys {x} more.", "{Friend} gives {n_obj} {x} more {items}.",
          "Next, {p} finds another {x}.", "After that {p} gets {x} more {items} as a gift.",
          "Later {p} adds {x} more {items}."],
    "-": ["Then {p} gives {x} to {friend}.", "{P} loses {x} of them.",
          "{P} uses {x} {items} for a project.", "Next, {p} sells {x} {items}.",
          "After that {friend} takes {x} of them."],
    "*": ["Then {p} ends up with {x} times as many {items} as {p} had.",
          "{P} trades each of them for {x} new {items}.",
          "After a good week {p} has {x} times as many {items} as before.",
          "Next, {p} multiplies {n_poss} collection by {x}."],
    "/": ["Then {p} splits them into {x} equal groups and keeps only one group.",
          "{P} divides them equally among {x} {packs} and keeps one {pack}.",
          "Next, {p} keeps only one out of every {x} of them.",
          "{P} shares them equally among {x} people, {n_self} included, and keeps {n_poss} share."],
}
_QUESTION = ["How many {items} does {N} have now?", "How many {items} does {N} end up with?",
             "At the end, how many {items} does {N} have?", "How many {items} does {N} have left?"]
_PLURAL_PACK = {"box": "boxes", "shelf": "shelves", "bunch": "bunches", "pouch": "pouches"}


# --------------------------------------------------------------------------- generation


def _choose_operation(rng: random.Random, v: int, spec: DifficultySpec) -> tuple[str, int] | None:
    """A random feasible ``(op, operand)`` for current value ``v`` (exact, non-negative, bounded)."""
    options: list[tuple[str, int]] = []
    if v + 1 <= spec.max_value:
        options.append(("+", rng.randint(1, min(spec.max_operand, spec.max_value - v))))
    if v >= 2:
        options.append(("-", rng.randint(1, min(spec.max_operand, v - 1))))
    if 2 * v <= spec.max_value:
        top = min(spec.max_factor, spec.max_value // v) if v else spec.max_factor
        options.append(("*", rng.randint(2, top)))
    divisors = [d for d in range(2, spec.max_factor + 1) if v % d == 0 and v // d >= 1]
    if divisors:
        options.append(("/", rng.choice(divisors)))
    if not options:
        return None
    # Multiplication/division make direct answering hard; give them more weight.
    weights = [2.0 if op in "*/" else 1.0 for op, _ in options]
    return rng.choices(options, weights=weights)[0]


def _apply(v: int, op: str, x: int) -> int:
    return {"+": v + x, "-": v - x, "*": v * x, "/": v // x}[op]


def _one_problem(rng: random.Random, spec: DifficultySpec) -> tuple[str, list[str], int] | None:
    """One chained problem as (question, steps, answer), or None if this draw got stuck."""
    counts = list(range(spec.min_steps, spec.max_steps + 1))
    n_steps = rng.choices(counts, weights=spec.step_weights)[0] if spec.step_weights else rng.choice(counts)
    value = rng.randint(2, spec.max_operand if spec.max_operand < spec.max_value else spec.max_value // 2)
    name, p = rng.choice(_NAMES)
    items, pack = rng.choice(_OBJECTS)
    words = {"N": name, "p": p, "P": p.capitalize(), "n_obj": _OBJ[p], "n_poss": _POSS[p],
             "n_self": _OBJ[p] + "self", "items": items, "pack": pack,
             "packs": _PLURAL_PACK.get(pack, pack + "s")}
    sentences, steps, ops = [], [], []
    start = value
    for i in range(n_steps):
        choice = _choose_operation(rng, value, spec)
        if choice is None:
            return None
        op, x = choice
        new = _apply(value, op, x)
        if new < 1:
            return None
        friend = rng.choice(_FRIENDS)
        fill = dict(words, x=x, a=start, friend=friend, Friend=friend.capitalize())
        template = rng.choice(_START[op] if i == 0 else _NEXT[op])
        sentences.append(template.format(**fill))
        steps.append(f"{value}{op}{x}={new}")
        ops.append(op)
        value = new
    if n_steps >= 2 and not any(op in "*/" for op in ops):
        return None  # keep every multi-step chain non-trivial (at least one * or /)
    sentences.append(rng.choice(_QUESTION).format(**words))
    return " ".join(sentences), steps, value


def generate_problems(n: int, seed: int, difficulty: str | int = "easy", *,
                      exclude: set[str] | None = None, id_prefix: str = "syn") -> list[Record]:
    """``n`` distinct chained word problems, deterministic for ``(seed, difficulty)``.

    ``exclude`` holds question texts that must not be produced (they are also not added to it).
    Ids are ``f"{id_prefix}-{i}"``. Raises ``ValueError`` if the preset cannot yield ``n`` distinct
    questions (far beyond 100k for every preset).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    spec = difficulty_spec(difficulty)
    rng = random.Random(f"colar-synthetic:{seed}:{difficulty}")
    seen = set(exclude or ())
    out: list[Record] = []
    budget = 50 * n + 1000
    while len(out) < n:
        if budget == 0:
            raise ValueError(f"could not generate {n} distinct problems at difficulty {difficulty!r}")
        budget -= 1
        drawn = _one_problem(rng, spec)
        if drawn is None or drawn[0] in seen:
            continue
        question, steps, answer = drawn
        seen.add(question)
        out.append(Record(id=f"{id_prefix}-{len(out)}", question=question, steps=tuple(steps), answer=str(answer)))
    return out


def builtin_splits(n_train: int, n_val: int, n_test: int, seed: int = 0,
                   difficulty: str | int = "easy") -> dict[str, list[Record]]:
    """Train/val/test splits with no question repeated within or across splits.

    One stream of distinct problems is cut test first, then val, then train, so the evaluation
    sets do not change when only ``n_train`` grows. Ids are ``"{split}-{i}"``.
    """
    stream = generate_problems(n_test + n_val + n_train, seed=seed, difficulty=difficulty)
    cuts = {"test": stream[:n_test], "val": stream[n_test:n_test + n_val], "train": stream[n_test + n_val:]}
    return {split: [replace(r, id=f"{split}-{i}") for i, r in enumerate(cuts[split])]
            for split in ("train", "val", "test")}
