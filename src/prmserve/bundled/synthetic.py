"""Synthetic arithmetic word problems with step-labelled solutions: the first bundled PRM's task (`prmserve evaluate --task synthetic`).

Each problem tracks one quantity through 2-4 operations (+, -, x, /) on small numbers
(every value in 1..30, at most 9 bought or given away at once).
A solution has one step per operation plus a final ``\\boxed{}`` step. Corrupted
solutions contain one injected error (a bad operation, a slip in a result, or a wrong
carried-forward value); later steps compute correctly from the wrong value.

Label convention (as in ProcessBench / PRM800K): a step is correct (1) only if it and
every step before it are correct, so every step from the first wrong one on is 0.
Since every operation is injective, a solution is correct iff its final answer is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ERROR_KINDS = ("bad_operation", "slip", "wrong_carry")
SYMBOL = {"add": "+", "sub": "-", "mul": "×", "div": "÷"}
MAX_VALUE = 30  # every running value stays in 1..MAX_VALUE
MAX_OPERAND = 9  # at most this many bought or given away at once
MAX_START = 20  # a problem starts with 4..MAX_START items

NAMES = [
    ("Mia", "she", "her"), ("Tom", "he", "his"), ("Ava", "she", "her"), ("Leo", "he", "his"),
    ("Zoe", "she", "her"), ("Sam", "he", "his"), ("Lily", "she", "her"), ("Ben", "he", "his"),
    ("Emma", "she", "her"), ("Noah", "he", "his"), ("Ella", "she", "her"), ("Max", "he", "his"),
    ("Nora", "she", "her"), ("Owen", "he", "his"), ("Ruby", "she", "her"), ("Jack", "he", "his"),
]
FRIENDS = ["Anna", "Carl", "Dina", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jill", "Kai"]
ITEMS = [
    "apples", "marbles", "stickers", "cookies", "pencils", "coins", "stamps", "books",
    "cards", "shells", "candies", "beads", "oranges", "balloons", "toy cars", "flowers",
]
MULTIPLIERS = {2: ("doubles", "Doubling"), 3: ("triples", "Tripling")}
BOXED_STEPS = [
    "So the answer is \\boxed{{{v}}}.",
    "Therefore, the final answer is \\boxed{{{v}}}.",
    "So {name} has \\boxed{{{v}}} {item} now.",
    "In the end {name} has \\boxed{{{v}}} {item}.",
]


@dataclass
class Op:
    """One operation on the tracked quantity: kind in {add, sub, mul, div} and its operand."""

    kind: str
    arg: int
    friend: str = ""


@dataclass
class Claim:
    """What one step computes: ``x sym arg = y`` (x is the value it carries in)."""

    x: int
    sym: str
    arg: int
    y: int

    def text(self) -> str:
        """The expression as written in a step."""
        return f"{self.x} {self.sym} {self.arg} = {self.y}"


@dataclass
class Problem:
    """A word problem: its text, the operations it describes and the true answer."""

    text: str
    name: str
    pronoun: str
    item: str
    start: int
    ops: list[Op]
    answer: int

    def values(self) -> list[int]:
        """The true running values: start, then the value after each operation."""
        vals = [self.start]
        for op in self.ops:
            vals.append(apply(op.kind, vals[-1], op.arg))
        return vals


@dataclass
class Solution:
    """A step-by-step solution with per-step labels (1 correct, 0 wrong) and its final answer."""

    steps: list[str]
    labels: list[int]
    final_answer: int
    first_error: int = -1  # index of the first wrong step, -1 if the solution is correct
    error_kind: str = ""
    error_offset: int = -1  # character in steps[first_error] where the solution first departs from a correct one


def apply(kind: str, x: int, arg: int) -> int:
    """Apply one operation exactly (division is only used where it is exact)."""
    if kind == "add":
        return x + arg
    if kind == "sub":
        return x - arg
    if kind == "mul":
        return x * arg
    if kind == "div":
        return x // arg
    raise ValueError(kind)


def _pick_op(rng: random.Random, x: int) -> Op:
    """Choose a valid operation for the current value, keeping all values in 1..MAX_VALUE."""
    choices = []
    if x <= MAX_VALUE - 2:
        choices += ["add", "add"]
    if x >= 3:
        choices += ["sub", "sub"]
    if x <= MAX_VALUE // 3:  # doubling or tripling stays in range
        choices.append("mul")
    divisors = [d for d in (2, 3, 4) if x % d == 0 and x // d >= 2]
    if divisors:
        choices.append("div")
    kind = rng.choice(choices)
    friend = rng.choice(FRIENDS)
    if kind == "add":
        return Op("add", rng.randint(2, min(MAX_OPERAND, MAX_VALUE - x)), friend)
    if kind == "sub":
        return Op("sub", rng.randint(2, min(MAX_OPERAND, x - 1)), friend)
    if kind == "mul":
        return Op("mul", rng.choice([k for k in MULTIPLIERS if k * x <= MAX_VALUE]), friend)
    return Op("div", rng.choice(divisors), friend)


def _problem_clause(op: Op, item: str) -> str:
    """Describe one operation inside the problem statement."""
    if op.kind == "add":
        return f"buys {op.arg} more {item}"
    if op.kind == "sub":
        return f"gives {op.arg} {item} to {op.friend}"
    if op.kind == "mul":
        return f"{MULTIPLIERS[op.arg][0]} the number of {item}"
    return f"shares them equally among {op.arg} bags and keeps one bag"


def make_problem(rng: random.Random) -> Problem:
    """Generate one word problem with 2-4 operations."""
    name, pronoun, _ = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    start = rng.randint(4, MAX_START)
    ops, x = [], start
    for _ in range(rng.randint(2, 4)):
        op = _pick_op(rng, x)
        ops.append(op)
        x = apply(op.kind, x, op.arg)
    clauses = [_problem_clause(op, item) for op in ops]
    body = ", then ".join(clauses[:-1]) + ", and then " + clauses[-1]
    text = (
        f"{name} has {start} {item}. {pronoun.capitalize()} {body}. "
        f"How many {item} does {name} have now?"
    )
    return Problem(text, name, pronoun, item, start, ops, x)


def _step_text(rng: random.Random, p: Problem, i: int, op: Op, claim: Claim) -> str:
    """Write the step for operation i, stating ``claim``."""
    expr = claim.text()
    it, pr, nm = p.item, p.pronoun, p.name
    if i == 0:
        lead = rng.choice([f"{nm} starts with {p.start} {it}", f"At first {nm} has {p.start} {it}"])
        if op.kind == "add":
            return rng.choice([
                f"{lead} and buys {op.arg} more, so {pr} has {expr} {it}.",
                f"{lead}. After buying {op.arg} more, {pr} has {expr} {it}.",
            ])
        if op.kind == "sub":
            return rng.choice([
                f"{lead} and gives {op.arg} to {op.friend}, so {pr} has {expr} {it} left.",
                f"{lead}. After giving {op.arg} away, {pr} has {expr} {it}.",
            ])
        if op.kind == "mul":
            return f"{lead}, and the number {MULTIPLIERS[op.arg][0]}, so {pr} has {expr} {it}."
        return f"{lead} and shares them among {op.arg} bags, so one bag has {expr} {it}."
    if op.kind == "add":
        return rng.choice([
            f"After buying {op.arg} more, {pr} has {expr} {it}.",
            f"Buying {op.arg} more {it} gives {expr} {it}.",
            f"Then {pr} buys {op.arg} more, so {pr} has {expr} {it}.",
        ])
    if op.kind == "sub":
        return rng.choice([
            f"After giving {op.arg} to {op.friend}, {pr} has {expr} {it}.",
            f"Giving away {op.arg} {it} leaves {expr} {it}.",
            f"Then {pr} gives {op.arg} to {op.friend}, so {pr} has {expr} {it} left.",
        ])
    if op.kind == "mul":
        return rng.choice([
            f"{MULTIPLIERS[op.arg][1]} the number of {it} gives {expr} {it}.",
            f"Then the number {MULTIPLIERS[op.arg][0]}, so {pr} has {expr} {it}.",
        ])
    return rng.choice([
        f"Sharing them equally among {op.arg} bags gives {expr} {it} per bag.",
        f"Then {pr} splits them into {op.arg} bags, so one bag has {expr} {it}.",
    ])


def _wrong_value(rng: random.Random, true: int) -> int:
    """A plausible wrong number near ``true`` (off by a small amount or by ten)."""
    while True:
        v = true + rng.choice([-10, -2, -1, 1, 2, 10])
        if v >= 0 and v != true:
            return v


def _bad_operation(rng: random.Random, op: Op, x: int) -> Claim | None:
    """A wrong operator applied to the right operands, with its (correct) result; None if none fits."""
    options = {"add": ["sub", "mul"], "sub": ["add"], "mul": ["add"], "div": ["sub", "mul"]}[op.kind]
    kind = rng.choice(options)
    if kind == "mul" and op.arg > 10:
        kind = "sub"
    y = apply(kind, x, op.arg)
    if y < 0 or y == apply(op.kind, x, op.arg):
        return None
    return Claim(x, SYMBOL[kind], op.arg, y)


def _continues(p: Problem, start_index: int, value: int) -> bool:
    """Whether the remaining operations stay exact and non-negative from a (wrong) value."""
    for op in p.ops[start_index:]:
        if op.kind == "div" and value % op.arg:
            return False
        value = apply(op.kind, value, op.arg)
        if value < 0:
            return False
    return True


def _inject(rng: random.Random, error_kind: str, op: Op, right: Claim) -> Claim | None:
    """``right`` with one error of ``error_kind``; None if that error can't fit here."""
    if error_kind == "bad_operation":
        return _bad_operation(rng, op, right.x)
    if error_kind == "slip":
        return Claim(right.x, right.sym, op.arg, _wrong_value(rng, right.y))
    if error_kind == "wrong_carry":
        x = _wrong_value(rng, right.x)
        if op.kind == "div" and x % op.arg:
            return None
        y = apply(op.kind, x, op.arg)
        return None if y < 0 else Claim(x, right.sym, op.arg, y)
    raise ValueError(error_kind)


def make_claims(rng: random.Random, p: Problem, error_kind: str = "", error_step: int = -1) -> tuple[list[Claim], int] | None:
    """One claim per operation, ``error_kind`` injected at ``error_step`` (< len(p.ops)); None if it can't fit.

    Steps after the error compute correctly from the wrong value they carry in. Also returns the
    character of the wrong claim's text where it departs from the correct one (-1 if none is wrong).
    """
    claims: list[Claim] = []
    x, departure = p.start, -1
    for i, op in enumerate(p.ops):
        claim = right = Claim(x, SYMBOL[op.kind], op.arg, apply(op.kind, x, op.arg))
        if i == error_step:
            claim = _inject(rng, error_kind, op, right)
            if claim is None or not _continues(p, i + 1, claim.y):
                return None
            departure = _first_difference(claim.text(), right.text())
        claims.append(claim)
        x = claim.y
    return claims, departure


def make_solution(rng: random.Random, p: Problem, error_kind: str = "", error_step: int = -1) -> Solution | None:
    """Write a solution; inject ``error_kind`` at ``error_step`` (or none). None if the error can't fit.

    ``error_step == len(p.ops)`` is a wrong carried-forward value in the boxed answer.
    """
    n = len(p.ops)
    made = make_claims(rng, p, error_kind, error_step) if error_step < n else make_claims(rng, p)
    if made is None:
        return None
    claims, departure = made
    steps = [_step_text(rng, p, i, op, c) for i, (op, c) in enumerate(zip(p.ops, claims))]
    offset = steps[error_step].index(claims[error_step].text()) + departure if 0 <= error_step < n else -1
    final = claims[-1].y
    if error_step == n:
        final = _wrong_value(rng, final)
    steps.append(rng.choice(BOXED_STEPS).format(v=final, name=p.name, item=p.item))
    if error_step == n:
        offset = steps[-1].index("\\boxed{") + len("\\boxed{") + _first_difference(str(final), str(claims[-1].y))
    first = error_step if error_kind else -1
    labels = [0 if first >= 0 and k >= first else 1 for k in range(n + 1)]
    return Solution(steps, labels, final, first, error_kind, offset)


def make_chain(rng: random.Random, p_error: float = 0.5, p_slip: float = 0.5) -> tuple[str, int]:
    """A problem's computation as bare claims, for training only: ``"12 coins. 12 + 5 = 17 coins. 17 × 2 = 34 coins."``

    With probability ``p_error`` one claim has a slip (``p_slip`` of those) or else a wrong
    carried-forward value: the errors that need arithmetic, not wording, to catch. Returns the
    text and the character where it departs from the correct chain (-1 if it is correct).
    Drills on these give the bundled PRM far more arithmetic checks per token than solutions do.
    """
    while True:
        p = make_problem(rng)
        step = rng.randrange(len(p.ops)) if rng.random() < p_error else -1
        made = make_claims(rng, p, "slip" if rng.random() < p_slip else "wrong_carry", step)
        if made is not None:
            break
    claims, departure = made
    texts = [f"{p.start} {p.item}."] + [f"{c.text()} {p.item}." for c in claims]
    offset = sum(len(t) + 1 for t in texts[: step + 1]) + departure if step >= 0 else -1
    return " ".join(texts), offset


def _first_difference(a: str, b: str) -> int:
    """Index of the first character where ``a`` departs from ``b``."""
    return next((i for i, (ca, cb) in enumerate(zip(a, b)) if ca != cb), min(len(a), len(b)))


def corrupt(rng: random.Random, p: Problem) -> Solution:
    """A solution with exactly one injected error at a random step, of a random kind."""
    while True:
        step = rng.randint(0, len(p.ops))
        kind = "wrong_carry" if step == len(p.ops) else rng.choice(ERROR_KINDS)
        sol = make_solution(rng, p, kind, step)
        if sol is not None:
            return sol


def generate(n: int, seed: int, p_correct: float = 0.5) -> list[tuple[Problem, Solution]]:
    """``n`` (problem, solution) pairs; each solution is correct with probability ``p_correct``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = make_problem(rng)
        sol = make_solution(rng, p) if rng.random() < p_correct else corrupt(rng, p)
        out.append((p, sol))
    return out


def generate_candidates(n: int, seed: int, k: int = 4, p_correct: float = 0.4) -> list[tuple[Problem, list[Solution]]]:
    """``n`` problems with ``k`` candidate solutions each, for best-of-k evaluation."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = make_problem(rng)
        sols = [make_solution(rng, p) if rng.random() < p_correct else corrupt(rng, p) for _ in range(k)]
        out.append((p, sols))
    return out
