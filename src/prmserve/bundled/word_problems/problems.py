"""Word problems: one person's quantity through 1-4 operations (buy, give away, double, share, lose a quarter...),
drawn with the numbers of ``numbers`` and worded with the templates of ``phrasing``."""

from __future__ import annotations

import random
from dataclasses import dataclass

from prmserve.bundled.word_problems import grammar, numbers, phrasing
from prmserve.bundled.word_problems.phrasing import STORIES, templates

POSSESSIVE = {"she": "her", "he": "his"}
OBJECT = {"she": "her", "he": "him"}


@dataclass(frozen=True)
class Op:
    """One operation on the tracked quantity: its story (``phrasing.STORIES``), given number and friend."""

    story: str
    arg: int
    friend: str

    @property
    def kind(self) -> str:
        return STORIES[self.story].kind


@dataclass
class Problem:
    """A word problem: its text, who and what it is about, the operations it describes and the true answer."""

    text: str
    name: str
    pronoun: str
    item: str
    start: int
    ops: list[Op]
    answer: int
    test: bool  # worded with held-out templates and numbers

    def fields(self) -> dict[str, str]:
        """The template fields this problem fills (``phrasing``'s names)."""
        return {"name": self.name, "Name": self.name, "pron": self.pronoun, "Pron": self.pronoun.capitalize(),
                "poss": POSSESSIVE[self.pronoun], "obj": OBJECT[self.pronoun], "item": self.item}

    def values(self) -> list[int]:
        """The true running values: the start, then the value after each operation."""
        vals = [self.start]
        for op in self.ops:
            vals.append(apply(op.kind, vals[-1], op.arg))
        return vals


def apply(kind: str, x: int, arg: int) -> int:
    """An operation's exact result (divisions are only drawn where they are exact)."""
    if kind == "add":
        return x + arg
    if kind == "sub":
        return x - arg
    if kind == "mul":
        return x * arg
    if kind == "div":
        return x // arg
    if kind == "less_quarter":
        return x - x // 4
    raise ValueError(f"unknown operation kind {kind!r}")


def _fits(story: str, x: int, money: bool, top: int) -> bool:
    """Whether the story can happen to ``x`` items of this kind with every value at most ``top``."""
    s = STORIES[story]
    if s.money is not None and s.money != money:
        return False
    if s.kind == "add":
        return x <= top - 2
    if s.kind == "sub":
        return x >= 4
    if s.kind == "mul":
        return x * (s.args[0] if s.args else 2) <= top
    if s.kind == "div":
        return any(x % d == 0 and x > d for d in (s.args or range(2, numbers.MAX_FACTOR + 1)))
    return x % 4 == 0 and x >= 4  # less_quarter


def _draw_op(rng: random.Random, x: int, money: bool, friends: tuple[str, ...], test: bool, scale: int) -> Op | None:
    """An operation that fits ``x`` (kinds weighted as word problems use them), or None if the draw misses.

    Given numbers are at most ``scale`` and results at most ten times that.
    """
    top = 10 * scale
    kind = rng.choice(["add", "add", "sub", "sub", "mul", "div", "less_quarter"])
    stories = [name for name, s in STORIES.items() if s.kind == kind and _fits(name, x, money, top)]
    if not stories:
        return None
    story = STORIES[name := rng.choice(stories)]
    friend = rng.choice(friends)
    if story.args:
        return Op(name, story.args[0], friend)
    if kind == "add":
        arg = numbers.given(rng, 2, min(scale, top - x), test)
    elif kind == "sub":
        arg = numbers.given(rng, 2, min(scale, x - 2), test)
    elif kind == "mul":
        most = min(numbers.MAX_FACTOR, top // x)
        arg = numbers.factor(rng, most) if most >= 2 else None
    else:
        divisors = [d for d in range(2, numbers.MAX_FACTOR + 1) if x % d == 0 and x > d]
        arg = rng.choice(divisors) if divisors else None
    return None if arg is None else Op(name, arg, friend)


def make_problem(rng: random.Random, test: bool = False, n_ops: int | None = None,
                 scale: int = numbers.MAX_GIVEN, grammar_share: float = grammar.GRAMMAR_SHARE) -> Problem:
    """A word problem with ``n_ops`` operations (1-4 at random), worded for the test split or for training.

    ``scale`` caps its given numbers (results: ten times it); training's curriculum starts it small.
    ``grammar_share`` of training problems are worded by ``grammar``, the rest by the templates.
    """
    n_ops = n_ops or rng.choice([1, 2, 2, 3, 3, 4])
    name, pronoun = rng.choice(templates(phrasing.NAMES, phrasing.NAMES_HELD_OUT, test))
    money = rng.random() < 0.2
    item = rng.choice(phrasing.MONEY) if money else rng.choice(templates(phrasing.OBJECTS, phrasing.OBJECTS_HELD_OUT, test))
    friends = templates(phrasing.FRIENDS, phrasing.FRIENDS_HELD_OUT, test)
    if not test and rng.random() < 0.3:  # made-up names and items, so unknown ones are nothing new
        name, friends = phrasing.pseudo_word(rng).capitalize(), (phrasing.pseudo_word(rng).capitalize(),)
        item = item if money else phrasing.pseudo_word(rng) + "s"
    while True:  # a test problem has at least one given number from a held-out band
        start = numbers.given(rng, 2, scale, test and rng.random() < 0.5)
        ops, x = [], start
        while len(ops) < n_ops:
            op = _draw_op(rng, x, money, friends, test and rng.random() < 0.5, scale)
            if op is None:
                if rng.random() < 0.05:  # this start admits too few operations: draw another
                    break
                continue
            ops.append(op)
            x = apply(op.kind, x, op.arg)
        if len(ops) == n_ops and (not test or any(numbers.held_out(g) for g in [start] + [op.arg for op in ops])):
            break
    problem = Problem("", name, pronoun, item, start, ops, x, test)
    problem.text = _problem_text(rng, problem, grammar_share)
    return problem


def _problem_text(rng: random.Random, p: Problem, grammar_share: float) -> str:
    """The problem statement: an opening with the start, a sentence per operation (the first may join it), a question.

    A share of training problems is worded by ``grammar`` instead of the templates."""
    fields, test = p.fields(), p.test
    if not test and rng.random() < grammar_share:
        return grammar.problem_text(rng, p)
    clauses = []
    for op in p.ops:
        story = STORIES[op.story]
        clause = rng.choice(templates(story.clauses, story.clauses_held_out, test))
        if not test:  # training's clauses vary beyond their templates: a made-up verb, extra words, a place or time
            if rng.random() < 0.15:
                clause = phrasing.disguised(rng, clause)
            if rng.random() < 0.35:
                clause = phrasing.noisy(rng, clause, phrasing.FILLER_WORDS)
            if rng.random() < 0.3:
                clause += " " + rng.choice(phrasing.CLAUSE_TAILS)
        clauses.append(clause.format(n=op.arg, friend=op.friend, **fields))
    openings = templates(phrasing.OPENINGS, phrasing.OPENINGS_HELD_OUT, test)
    opening = (phrasing.random_frame(rng, "v", vocab=phrasing.FILLER_WORDS) + " {item}." if not test and rng.random() < 0.25 else rng.choice(openings))
    opening = opening.replace(":.", ".").format(v=p.start, **fields)
    sentences = []
    if not test and rng.random() < 0.4 and opening.startswith(p.name + " has "):  # "Ava has 12 apples and finds 7 more."
        opening = opening[:-1] + " and " + clauses.pop(0) + "."
    joins = templates(phrasing.JOINS, phrasing.JOINS_HELD_OUT, test)
    pairs = templates(phrasing.PAIRS, phrasing.PAIRS_HELD_OUT, test)
    while clauses:
        if len(clauses) >= 2 and rng.random() < 0.3:
            sentences.append(rng.choice(pairs).format(c=clauses.pop(0), d=clauses.pop(0), **fields))
        else:
            join = joins[0] if not sentences and not test else rng.choice(joins)
            if not test and rng.random() < 0.2:
                join = phrasing.random_lead(rng) + "{pron} {c}."
            sentences.append(join.format(c=clauses.pop(0), **fields))
    questions = templates(phrasing.QUESTIONS, phrasing.QUESTIONS_HELD_OUT, test)
    if p.ops[-1].kind in ("sub", "less_quarter") and not test:
        questions = questions + phrasing.QUESTIONS_LEFT
    question = rng.choice(questions)
    question = (phrasing.noisy(rng, question, phrasing.FILLER_WORDS) if not test and rng.random() < 0.2 else question).format(**fields)
    return " ".join([opening, *sentences, question])
