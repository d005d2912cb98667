"""Tests for the synthetic arithmetic problems: determinism and consistency of step labels."""

import random
import re

import pytest

from prmserve.bundled import synthetic

EXPR = re.compile(r"(\d+) ([+\-×÷]) (\d+) = (\d+)")
BOXED = re.compile(r"\\boxed\{(\d+)\}")
OPS = {"+": "add", "-": "sub", "×": "mul", "÷": "div"}


def evaluate(a: int, sym: str, b: int) -> float:
    """Exact value of ``a sym b`` (true division, so inexact quotients show up)."""
    return {"+": a + b, "-": a - b, "×": a * b, "÷": a / b}[sym]


def parse(step: str) -> tuple[int, str, int, int]:
    """The single ``a sym b = c`` claim written in a compute step."""
    (m,) = EXPR.findall(step)
    return int(m[0]), m[1], int(m[2]), int(m[3])


@pytest.fixture(scope="module")
def data():
    return synthetic.generate(600, seed=11)


def test_deterministic_for_a_seed():
    a, b = synthetic.generate(40, seed=5), synthetic.generate(40, seed=5)
    assert [(p.text, s.steps, s.labels) for p, s in a] == [(p.text, s.steps, s.labels) for p, s in b]
    c = synthetic.generate(40, seed=6)
    assert [p.text for p, _ in a] != [p.text for p, _ in c]
    k1, k2 = synthetic.generate_candidates(5, seed=3), synthetic.generate_candidates(5, seed=3)
    assert [[s.steps for s in sols] for _, sols in k1] == [[s.steps for s in sols] for _, sols in k2]


def test_mix_of_correct_and_every_error_kind(data):
    kinds = {s.error_kind for _, s in data}
    assert kinds == {"", *synthetic.ERROR_KINDS}
    n_correct = sum(s.first_error < 0 for _, s in data)
    assert 0.4 < n_correct / len(data) < 0.6


def test_steps_never_contain_step_token(data):
    assert all("<extra_0>" not in step for _, s in data for step in s.steps)


def test_correct_solutions_compute_the_answer(data):
    for p, s in (x for x in data if x[1].first_error < 0):
        assert s.labels == [1] * len(s.steps)
        assert s.final_answer == p.answer == p.values()[-1]
        assert BOXED.findall(s.steps[-1]) == [str(p.answer)]
        x = p.start
        for step, op in zip(s.steps[:-1], p.ops):
            a, sym, b, c = parse(step)
            assert (a, OPS[sym], b) == (x, op.kind, op.arg)
            assert evaluate(a, sym, b) == c
            x = c
        assert str(p.start) in p.text and f"{p.start}" in s.steps[0]


def test_labels_are_zero_from_the_first_error_on(data):
    for _, s in (x for x in data if x[1].first_error >= 0):
        e = s.first_error
        assert s.labels == [1] * e + [0] * (len(s.steps) - e)


def test_first_wrong_step_is_really_wrong(data):
    for p, s in (x for x in data if x[1].first_error >= 0):
        e, truth = s.first_error, p.values()
        if e == len(p.ops):  # boxed step carries a wrong value forward
            assert s.error_kind == "wrong_carry"
            assert int(BOXED.findall(s.steps[-1])[0]) != truth[-1]
            assert parse(s.steps[-2])[3] == truth[-1]
            continue
        a, sym, b, c = parse(s.steps[e])
        op = p.ops[e]
        assert c != truth[e + 1]  # the claimed value is wrong
        if s.error_kind == "slip":
            assert (a, OPS[sym], b) == (truth[e], op.kind, op.arg) and evaluate(a, sym, b) != c
        elif s.error_kind == "bad_operation":
            assert a == truth[e] and OPS[sym] != op.kind and evaluate(a, sym, b) == c
        else:
            assert a != truth[e] and OPS[sym] == op.kind and evaluate(a, sym, b) == c


def test_steps_before_the_error_are_right_and_later_steps_build_on_it(data):
    for p, s in (x for x in data if x[1].first_error >= 0):
        e, truth = s.first_error, p.values()
        for k in range(min(e, len(p.ops))):
            assert parse(s.steps[k])[3] == truth[k + 1]
        claimed = [parse(step) for step in s.steps[:-1]]
        for k in range(e + 1, len(p.ops)):
            a, sym, b, c = claimed[k]
            assert a == claimed[k - 1][3] and evaluate(a, sym, b) == c
        assert s.final_answer != p.answer  # operations are injective, so the error reaches the answer
        assert BOXED.findall(s.steps[-1]) == [str(s.final_answer)]


def test_error_offset_points_at_the_first_wrong_character(data):
    for p, s in (x for x in data if x[1].first_error >= 0):
        step, c = s.steps[s.first_error], s.error_offset
        assert step[c] in "0123456789+-×÷" or step[c - 1].isdigit()  # a wrong symbol, or a number ending early
        if s.error_kind == "slip":  # inside the claimed result, after "= "
            assert step[:c].rsplit("= ", 1)[1].isdigit() or step[c - 2 : c] == "= "
        elif s.error_kind == "bad_operation":
            assert step[c] in "+-×÷" and step[c] != synthetic.SYMBOL[p.ops[s.first_error].kind]


def test_chain_offset_is_where_it_departs_from_the_correct_chain() -> None:
    """Drill chains: the reported offset is the first character that differs from the chain recomputed from its start."""
    rng = random.Random(5)
    n_wrong = 0
    for _ in range(300):
        text, offset = synthetic.make_chain(rng)
        carried, last, pieces = int(text.split(" ", 1)[0]), 0, []
        for m in EXPR.finditer(text):  # every claim rewritten from the correct carried value
            _, sym, a, _ = m.groups()
            y = int(evaluate(carried, sym, int(a)))
            pieces += [text[last : m.start()], f"{carried} {sym} {a} = {y}"]
            carried, last = y, m.end()
        correct = "".join(pieces) + text[last:]
        expected = next((i for i, (g, w) in enumerate(zip(text, correct)) if g != w),
                        -1 if len(text) == len(correct) else min(len(text), len(correct)))
        assert offset == expected, (text, offset, expected)
        n_wrong += offset >= 0
    assert 100 < n_wrong < 200
