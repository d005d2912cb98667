"""Step-by-step solutions of the word problems, correct or with one injected error, labelled per step.

A solution is first *planned* (which steps, their templates, whether a step writes its computation or only
its result, the symbols) and then *written* with an optional error, so a correct solution and its one-slip
copy differ in that error alone. Steps after an error compute correctly from the wrong value they carry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from prmserve.bundled.word_problems import numbers, phrasing, step_grammar
from prmserve.bundled.word_problems.phrasing import STORIES, templates
from prmserve.bundled.word_problems.problems import Problem, apply

ERROR_KINDS = ("bad_operation", "slip", "wrong_carry", "wrong_final")
SYMBOLS = {"add": ("+",), "sub": ("-", "-", "−"), "mul": ("×", "*", "x"), "div": ("÷", "/")}
WRONG_KINDS = {"add": ("sub", "mul"), "sub": ("add",), "mul": ("add",), "div": ("mul", "sub")}


@dataclass
class Claim:
    """What a step computes, ``a op b = y`` in one of the ways people write it (``layout``)."""

    a: int
    kind: str  # add, sub, mul, div
    b: int
    y: int
    symbol: str
    layout: str = "{a} {op} {b} = {y}"

    def text(self) -> str:
        return self.layout.format(a=self.a, op=self.symbol, b=self.b, y=self.y)


@dataclass
class Solution:
    """A step-by-step solution with per-step labels (1 correct, 0 wrong) and its final answer."""

    steps: list[str]
    labels: list[int]
    final_answer: int
    first_error: int = -1  # index of the first wrong step, -1 if the solution is correct
    error_kind: str = ""
    error_offset: int = -1  # character in steps[first_error] where it first departs from the correct solution


@dataclass
class PlannedStep:
    """One step before it is written: what it does and its template."""

    role: str  # start, claim, restate, final
    template: str
    op_index: int = -1
    part: int = 0  # which claim of its operation (less_quarter makes two)
    show: bool = True  # a claim step writes its computation (else only the result)
    lead: str = ""  # a word it starts with ("So "), the template's first letter then lower case


@dataclass
class Plan:
    problem: Problem
    steps: list[PlannedStep]
    symbols: dict[str, str]
    spaced: bool
    fraction: dict[int, str] = field(default_factory=dict)  # op index -> layout of a half/quarter as a fraction


def plan_solution(rng: random.Random, p: Problem, step_grammar_share: float = step_grammar.STEP_GRAMMAR_SHARE,
                  value_grammar_share: float = 0.0) -> Plan:
    """Choose the steps of a solution to ``p`` and how each is worded (the split's templates; in training,
    ``step_grammar_share`` of the claim steps and ``value_grammar_share`` of the start, restate and final steps are
    worded by ``step_grammar`` instead)."""
    test, steps = p.test, []

    def worded(train: tuple, held_out: tuple, slot: str, role: str) -> str:
        """A template of the split; in training, now and then a frame of random words or a noisy template."""
        if value_grammar_share and not test and rng.random() < value_grammar_share:  # no draw when off: splits unchanged
            return step_grammar.value_template(rng, role)
        r = rng.random()
        if not test and r < 0.2:
            return phrasing.random_frame(rng, slot, ("item", "name"))
        template = rng.choice(templates(train, held_out, test))
        return phrasing.noisy(rng, template) if not test and r < 0.4 else template

    if rng.random() < 0.25:
        steps.append(PlannedStep("start", worded(phrasing.STARTS, phrasing.STARTS_HELD_OUT, "v", "start")))
    fraction = {}
    for i, op in enumerate(p.ops):
        story = STORIES[op.story]
        wordings = rng.choice(templates(story.steps, story.steps_held_out, test))
        terse = templates(phrasing.TERSE, phrasing.TERSE_HELD_OUT, test)
        for part, wording in enumerate(wordings):
            r = rng.random()
            if r < 0.25:
                steps.append(PlannedStep("claim", rng.choice(terse), i, part))
                continue
            lead = ""
            if rng.random() < 0.25 and not wording.startswith("{Name}") and not wording.startswith("{friend}"):
                lead = rng.choice(templates(phrasing.LEADS, phrasing.LEADS_HELD_OUT, test))
                wording = wording[0].lower() + wording[1:] if wording[0] != "{" else "{" + wording[1].lower() + wording[2:]
            r = rng.random()
            if not test and r < 0.2:
                wording, lead = phrasing.random_frame(rng, "calc", ("n", "item", "friend", "pron")), ""
            elif not test and r < 0.4:
                wording = phrasing.noisy(rng, wording)
            show = r < 0.8
            if step_grammar_share and not test and rng.random() < step_grammar_share:  # no draw when off: splits unchanged
                wording, lead, show = step_grammar.claim_template(rng, op.story, part), "", rng.random() < 0.8
                if rng.random() < 0.2:
                    wording = phrasing.noisy(rng, wording)
            steps.append(PlannedStep("claim", wording, i, part, show=show, lead=lead))
        if story.args and story.kind == "div" and rng.random() < 0.3:
            fraction[i] = rng.choice(["1/{b} × {a} = {y}", "{a} × 1/{b} = {y}"])
        if rng.random() < 0.1 and i < len(p.ops) - 1:
            steps.append(PlannedStep("restate", worded(phrasing.RESTATES, phrasing.RESTATES_HELD_OUT, "v", "restate")))
    steps.append(PlannedStep("final", worded(phrasing.FINALS, phrasing.FINALS_HELD_OUT, "v", "final")))
    symbols = {kind: rng.choice(options) for kind, options in SYMBOLS.items()}
    return Plan(p, steps, symbols, spaced=rng.random() < 0.9, fraction=fraction)


def eligible_steps(plan: Plan, error_kind: str) -> list[int]:
    """The steps where an error of this kind can be made."""
    roles = {"slip": ("claim",), "bad_operation": ("claim",), "wrong_carry": ("claim", "start", "restate"),
             "wrong_final": ("final",)}[error_kind]
    return [k for k, s in enumerate(plan.steps) if s.role in roles]


def write_solution(plan: Plan, rng: random.Random, error_kind: str = "", error_step: int = -1) -> Solution | None:
    """Write the planned solution, with ``error_kind`` at ``error_step`` (or none); None if that error can't fit."""
    p = plan.problem
    fields = p.fields()
    x, seen = p.start, [p.start]  # the value carried forward (as written), every number met so far
    before, quarter = p.start, 0  # less_quarter: the value before it, and its claimed quarter
    steps, offset = [], -1
    for k, step in enumerate(plan.steps):
        wrong = k == error_step
        if step.role in ("start", "restate", "final"):
            value = x
            if wrong:
                value = numbers.misremembered(rng, x, seen)
            text, at = _fill(step.template, fields, "v", str(value))
            if wrong:
                offset = at + _first_difference(str(value), str(x))
            x = value
            steps.append(text)
            continue
        op = p.ops[step.op_index]
        if step.part == 0:
            before = x
        kind, a, b = _claim_operands(op.kind, op.arg, step.part, before, quarter)
        if (kind == "div" and a % b) or (kind == "sub" and a < b):  # a wrong value carried into it
            return None
        right = _claim(plan, step, kind, a, b)
        claim = _inject(rng, plan, step, right, error_kind, seen) if wrong else right
        if claim is None:
            return None
        calc_right, calc = (right.text(), claim.text()) if step.show else (str(right.y), str(claim.y))
        text, at = _fill(step.lead + step.template, fields | {"n": str(op.arg), "friend": op.friend}, "calc", calc)
        if wrong:
            offset = at + _first_difference(calc, calc_right)
        steps.append(text)
        seen += [a, b, claim.y]
        if op.kind == "less_quarter" and step.part == 0:
            quarter = claim.y
        else:
            x = claim.y
    n = len(steps)
    first = error_step if error_kind else -1
    labels = [0 if first >= 0 and k >= first else 1 for k in range(n)]
    return Solution(steps, labels, x, first, error_kind, offset)


def _claim_operands(kind: str, arg: int, part: int, before: int, quarter: int) -> tuple[str, int, int]:
    """The operation a claim step computes, and its operands: less_quarter is x ÷ 4, then x − that quarter."""
    if kind == "less_quarter":
        return ("div", before, 4) if part == 0 else ("sub", before, quarter)
    return kind, before, arg


def _claim(plan: Plan, step: PlannedStep, kind: str, a: int, b: int) -> Claim:
    """The correct claim of a step, in the solution's symbols and layout."""
    layout = "{a} {op} {b} = {y}" if plan.spaced else "{a}{op}{b}={y}"
    if kind == "div" and step.op_index in plan.fraction and step.part == 0:
        layout = plan.fraction[step.op_index]
        return Claim(a, kind, b, apply(kind, a, b), "×", layout)
    return Claim(a, kind, b, apply(kind, a, b), plan.symbols[kind], layout)


def _inject(rng: random.Random, plan: Plan, step: PlannedStep, right: Claim, error_kind: str, seen: list[int]) -> Claim | None:
    """``right`` with one error of ``error_kind``; None if it can't fit here."""
    if error_kind == "slip":
        return Claim(right.a, right.kind, right.b, numbers.slipped(rng, right.y), right.symbol, right.layout)
    if error_kind == "bad_operation":
        kind = rng.choice(WRONG_KINDS[right.kind])
        if kind == "mul" and right.b > numbers.MAX_FACTOR:
            kind = "sub" if right.kind != "sub" else "add"
        y = apply(kind, right.a, right.b)
        if kind == right.kind or y < 0 or y == right.y:
            return None
        layout = "{a} {op} {b} = {y}" if plan.spaced else "{a}{op}{b}={y}"
        return Claim(right.a, kind, right.b, y, plan.symbols[kind], layout)
    if error_kind == "wrong_carry":
        a = numbers.misremembered(rng, right.a, seen)
        if a <= 0 or (right.kind == "div" and a % right.b) or (right.kind == "sub" and a < right.b):
            return None
        return Claim(a, right.kind, right.b, apply(right.kind, a, right.b), right.symbol, right.layout)
    raise ValueError(f"{error_kind!r} is not an error a claim step can make")


def _fill(template: str, fields: dict[str, str], slot: str, value: str) -> tuple[str, int]:
    """The template written out, and the character where ``slot``'s value starts in it."""
    head = template.split("{" + slot + "}", 1)[0]
    return template.format(**fields, **{slot: value}), len(head.format(**fields))


def _first_difference(a: str, b: str) -> int:
    """Index of the first character where ``a`` departs from ``b``."""
    return next((i for i, (ca, cb) in enumerate(zip(a, b)) if ca != cb), min(len(a), len(b)))
