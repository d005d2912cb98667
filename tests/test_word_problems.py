"""The synthetic word problems: determinism, the template and number hold-out, and labels re-derived from the text."""

from __future__ import annotations

import random
import re

import pytest

from prmserve.bundled import word_problems
from prmserve.errors import InvalidInputError
from prmserve.bundled.word_problems import numbers, phrasing
from prmserve.bundled.word_problems.solutions import eligible_steps, plan_solution, write_solution

NUMBER = r"(\d+)"
CLAIM = re.compile(r"(\d+) ?([+\-−×*x÷/]) ?(\d+) ?= ?(\d+)")
FRACTION = re.compile(r"1/(\d) × (\d+) = (\d+)|(\d+) × 1/(\d) = (\d+)")
KIND_OF = {"+": "add", "-": "sub", "−": "sub", "×": "mul", "*": "mul", "x": "mul", "÷": "div", "/": "div"}


def value(kind: str, a: int, b: int) -> float:
    """``a kind b`` exactly (true division, so an inexact quotient shows)."""
    return {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b}[kind]


def claims(step: str) -> list[tuple[int, str, int, int]]:
    """Every computation a step writes, as (a, kind, b, result); a fraction 1/2 × 120 = 60 is 120 ÷ 2."""
    found = []
    for m in FRACTION.finditer(step):
        b, a, y = (m[1], m[2], m[3]) if m[1] else (m[5], m[4], m[6])
        found.append((int(a), "div", int(b), int(y)))
    for m in CLAIM.finditer(FRACTION.sub("", step)):
        found.append((int(m[1]), KIND_OF[m[2]], int(m[3]), int(m[4])))
    return found


def numbers_in(text: str) -> list[int]:
    return [int(n) for n in re.findall(NUMBER, text)]


def words_of(parts) -> set[str]:
    """The lower-cased words of templates (nested tuples, lists or strings), their ``{fields}`` left out."""
    return {w.lower() for w in re.findall(r"[A-Za-z]+", re.sub(r"\{[^}]*\}", " ", repr(parts)))}


@pytest.fixture(scope="module")
def train():
    """Training pairs, a third of them with every claim step worded by ``step_grammar``, and 300 more with every
    start, restate and final step worded by it too."""
    return (word_problems.generate(800, seed=11) + word_problems.generate(400, seed=12, step_grammar_share=1.0)
            + word_problems.generate(300, seed=13, step_grammar_share=1.0, value_grammar_share=1.0))


@pytest.fixture(scope="module")
def test_split():
    return word_problems.generate(800, seed=11, split="test")


def test_deterministic_for_a_seed_and_split():
    a, b = word_problems.generate(40, seed=5), word_problems.generate(40, seed=5)
    assert [(p.text, s.steps, s.labels) for p, s in a] == [(p.text, s.steps, s.labels) for p, s in b]
    assert [p.text for p, _ in a] != [p.text for p, _ in word_problems.generate(40, seed=6)]
    assert [p.text for p, _ in a] != [p.text for p, _ in word_problems.generate(40, seed=5, split="validation")]
    k1, k2 = word_problems.generate_candidates(5, seed=3), word_problems.generate_candidates(5, seed=3)
    assert [[s.steps for s in sols] for _, sols in k1] == [[s.steps for s in sols] for _, sols in k2]


def test_an_unknown_split_is_a_typed_error():
    with pytest.raises(InvalidInputError, match="unknown split 'dev'"):
        word_problems.generate(3, seed=1, split="dev")


def test_mix_of_correct_and_every_error_kind(train, test_split):
    for data in (train, test_split):
        assert {s.error_kind for _, s in data} == {"", *word_problems.ERROR_KINDS}
        assert 0.4 < sum(s.first_error < 0 for _, s in data) / len(data) < 0.6


def test_numbers_stay_in_range_and_held_out_bands_only_reach_the_test_split(train, test_split):
    for p, _ in train:
        givens = [p.start] + [op.arg for op in p.ops]
        assert all(2 <= g <= numbers.MAX_GIVEN for g in givens)
        assert not any(numbers.held_out(g) for g in givens if g > numbers.MAX_FACTOR), p.text
        assert all(1 <= v <= numbers.MAX_VALUE for v in p.values())
    assert all(any(numbers.held_out(g) for g in [p.start] + [op.arg for op in p.ops]) for p, _ in test_split)
    assert 0.3 < sum(numbers.held_out(p.start) for p, _ in test_split) / len(test_split) < 0.7
    assert max(v for p, _ in train for v in p.values()) > 5000  # the range is used, not only allowed


def test_the_test_split_is_worded_only_with_held_out_templates(train, test_split):
    """Names, items, openings and final answers: training never writes the test split's, and the test split only those."""
    held_names = {n for n, _ in phrasing.NAMES_HELD_OUT}

    def held_out_opening(p) -> bool:
        return any(p.text.startswith(t.format(v=p.start, **p.fields())[:-1]) for t in phrasing.OPENINGS_HELD_OUT)

    for p, s in test_split:
        assert p.name in held_names and (p.item in phrasing.OBJECTS_HELD_OUT or p.item in phrasing.MONEY)
        assert held_out_opening(p), p.text
    for p, s in train:
        assert p.name not in held_names and p.item not in phrasing.OBJECTS_HELD_OUT
        assert not held_out_opening(p), p.text
        assert s.steps[-1] not in _held_out_finals(p, s)
    assert all(s.steps[-1] in _held_out_finals(p, s) for p, s in test_split)


def _held_out_finals(p, s) -> set[str]:
    """The final steps the held-out templates write for this solution's final answer."""
    return {t.format(v=s.final_answer, **p.fields()) for t in phrasing.FINALS_HELD_OUT}


def test_steps_never_contain_the_step_token(train, test_split):
    assert all("<extra_0>" not in step for data in (train, test_split) for _, s in data for step in s.steps)


def test_correct_solutions_compute_the_answer(train, test_split):
    for p, s in (x for data in (train, test_split) for x in data if x[1].first_error < 0):
        assert s.labels == [1] * len(s.steps)
        assert s.final_answer == p.answer == p.values()[-1]
        assert numbers_in(s.steps[-1])[-1] == p.answer
        for step in s.steps:
            for a, kind, b, y in claims(step):
                assert value(kind, a, b) == y, step


def test_labels_are_zero_from_the_first_error_on(train):
    for _, s in (x for x in train if x[1].first_error >= 0):
        e = s.first_error
        assert s.labels == [1] * e + [0] * (len(s.steps) - e)
        assert s.error_kind != "wrong_final" or e == len(s.steps) - 1


def test_every_error_reaches_the_final_answer(train):
    for p, s in (x for x in train if x[1].first_error >= 0):
        assert s.final_answer != p.answer and numbers_in(s.steps[-1])[-1] == s.final_answer


def _twins(rng: random.Random, kind: str) -> tuple:
    """A solution with one error of ``kind`` and its correct twin, written from one plan."""
    while True:
        p = word_problems.make_problem(rng, test=rng.random() < 0.5)
        plan = plan_solution(rng, p, step_grammar_share=0.5)
        wrong = write_solution(plan, rng, kind, rng.choice(eligible_steps(plan, kind)))
        if wrong is not None:
            return p, wrong, write_solution(plan, rng)


@pytest.mark.parametrize("kind", word_problems.ERROR_KINDS)
def test_the_first_wrong_step_is_wrong_in_its_own_way(kind: str):
    """Against its correct twin: a slip keeps the operands and writes a false result; a bad operation a true
    result of another operator; a wrong carry a true result from another carried value; a wrong final
    answer another number after the same steps."""
    rng = random.Random(3)
    for _ in range(150):
        p, wrong, right = _twins(rng, kind)
        e = wrong.first_error
        assert wrong.error_kind == kind and wrong.steps[:e] == right.steps[:e]
        if kind == "wrong_final":
            assert e == len(wrong.steps) - 1 and numbers_in(wrong.steps[e])[-1] != numbers_in(right.steps[e])[-1]
            continue
        ours, theirs = claims(wrong.steps[e]), claims(right.steps[e])
        if not theirs:  # a step that gives only its result, or restates a value: another number
            assert numbers_in(wrong.steps[e]) != numbers_in(right.steps[e])
            continue
        ((a, op, b, y),), ((a0, op0, b0, y0),) = ours, theirs
        assert y != y0
        if kind == "slip":
            assert (a, op, b) == (a0, op0, b0) and value(op, a, b) != y
        elif kind == "bad_operation":
            assert (a, b) == (a0, b0) and op != op0 and value(op, a, b) == y
        else:
            assert a != a0 and (op, b) == (op0, b0) and value(op, a, b) == y


def test_the_error_offset_is_where_the_solution_departs_from_its_correct_twin():
    """Written from one plan with and without the error: the steps before agree, and the error step departs at the offset."""
    rng = random.Random(7)
    checked = {kind: 0 for kind in word_problems.ERROR_KINDS}
    while min(checked.values()) < 60:
        p = word_problems.make_problem(rng, test=rng.random() < 0.5)
        plan = plan_solution(rng, p, step_grammar_share=0.5)
        kind = rng.choice(word_problems.ERROR_KINDS)
        wrong = write_solution(plan, rng, kind, rng.choice(eligible_steps(plan, kind)))
        if wrong is None:
            continue
        right = write_solution(plan, rng)
        e = wrong.first_error
        assert wrong.steps[:e] == right.steps[:e] and right.first_error == -1
        a, b = wrong.steps[e], right.steps[e]
        assert wrong.error_offset == next(i for i, (x, y) in enumerate(zip(a + "\0", b + "\0")) if x != y), (a, b)
        checked[kind] += 1


def test_slip_pairs_differ_by_one_slipped_result():
    for p, right, wrong in word_problems.slip_pairs(100, seed=2):
        assert right.first_error == -1 and wrong.error_kind == "slip" and p.test
        e = wrong.first_error
        assert right.steps[:e] == wrong.steps[:e] and len(right.steps) == len(wrong.steps)
        assert right.final_answer == p.answer != wrong.final_answer


def test_drill_offset_is_where_it_departs_from_the_correct_drill():
    """Drills with an error, against the same drill written correctly: equal up to the offset, different there."""
    from prmserve.bundled.word_problems.drills import drill_plan, write_drill

    rng = random.Random(5)
    n_checked = 0
    while n_checked < 200:
        plan = drill_plan(rng)
        made = write_drill(plan, rng, rng.choice(["slip", "wrong_carry"]), rng.randrange(1, len(plan.steps)))
        if made is None:
            continue
        (text, offset), (right, none) = made, write_drill(plan, rng)
        assert none == -1 and offset >= 0 and text[:offset] == right[:offset] and text[offset:offset + 1] != right[offset:offset + 1]
        assert CLAIM.search(text) and "<extra_0>" not in text
        n_checked += 1
    drills = [word_problems.make_drill(rng) for _ in range(300)]
    assert 100 < sum(offset >= 0 for _, offset in drills) < 200


def test_training_text_states_its_numbers_in_order(train):
    """Whatever the wording (templates or ``grammar``), a problem's digits are its start and given numbers, in order,
    so the labels its solutions carry stay right."""
    from prmserve.bundled.word_problems.phrasing import STORIES

    for p, _ in train:
        assert numbers_in(p.text) == [p.start] + [op.arg for op in p.ops if not STORIES[op.story].args], p.text


def test_training_never_writes_a_held_out_template():
    """Held-out openings, joins, pairs, questions and clauses (filled with any training problem's fields) appear in no
    training problem, from the templates or from ``grammar``; and ``grammar`` uses none of the held-out templates'
    distinctive words."""
    from prmserve.bundled.word_problems import grammar
    from prmserve.bundled.word_problems.phrasing import STORIES

    rng = random.Random(13)
    problems = [word_problems.make_problem(rng) for _ in range(3000)]
    worded = [(p, grammar.problem_text(rng, p)) for p in problems[:1000]] + [(p, p.text) for p in problems]
    joins = [t.split("{")[0] for t in phrasing.JOINS_HELD_OUT]  # "Later on, ", "Soon after, "
    pairs = [t.split("{c}")[1].split("{d}")[0] for t in phrasing.PAIRS_HELD_OUT]  # ", and after that "
    for p, text in worded:
        fields = p.fields()
        assert not any(j in text for j in joins + pairs), text
        assert not any(t.format(v=p.start, **fields)[:-1] in text for t in phrasing.OPENINGS_HELD_OUT), text
        assert not any(q.format(**fields) in text for q in phrasing.QUESTIONS_HELD_OUT), text
        for op in p.ops:
            for c in STORIES[op.story].clauses_held_out:
                assert c.format(n=op.arg, friend=op.friend, **fields) not in text, text
    vocabulary = words_of([grammar.CLAUSES, grammar.LEADS, grammar.TAILS, grammar.OPENING_LEADS, grammar.ABOUT, grammar.CONTAINERS,
                           grammar.MONEY_CONTAINERS, grammar.OPENINGS, grammar.HAS, grammar.PAIRS, grammar.QUESTIONS,
                           grammar.QUESTIONS_LEFT, grammar.WHEN, grammar.ADVERBS, grammar.THINGS, grammar.PILES])
    distinctive = {"discovers", "comes", "across", "collects", "donates", "charity", "divides", "evenly", "packs", "manages",
                   "grows", "month", "week", "market", "lunch", "game", "school", "washing", "yard", "gift", "present", "soon"}
    assert not vocabulary & distinctive, vocabulary & distinctive


def test_step_grammar_uses_no_word_only_held_out_steps_use():
    """Every claim step ``step_grammar`` writes, for every story, is built of words that training's step templates
    (or their random frames) already use, or of words no held-out step template uses; and the test split's
    solutions never meet it."""
    from prmserve.bundled.word_problems import step_grammar
    from prmserve.bundled.word_problems.phrasing import STORIES

    held_out = words_of([[s.steps_held_out for s in STORIES.values()], phrasing.TERSE_HELD_OUT, phrasing.LEADS_HELD_OUT,
                         phrasing.STARTS_HELD_OUT, phrasing.RESTATES_HELD_OUT, phrasing.FINALS_HELD_OUT])
    trained = words_of([[s.steps for s in STORIES.values()], phrasing.TERSE, phrasing.LEADS, phrasing.STARTS, phrasing.RESTATES,
                        phrasing.FINALS, phrasing.FRAME_WORDS])
    only_held_out = held_out - trained - {"s"}  # the possessive 's of "{friend}'s" is every split's
    assert {"remain", "bought", "twice", "thus", "sale"} <= only_held_out
    rng = random.Random(4)
    written = [step_grammar.claim_template(rng, story, part) for story, part in step_grammar.EVENTS for _ in range(300)]
    assert {story for story, _ in step_grammar.EVENTS} == set(STORIES)
    assert len(set(written)) > 0.9 * len(written)
    assert not words_of(written) & only_held_out, words_of(written) & only_held_out
    values = [step_grammar.value_template(rng, role) for role in step_grammar.VALUE_FORMS for _ in range(300)]
    assert all(v.count("{v}") == 1 for v in values) and len(set(values)) > 0.3 * len(values)
    assert not words_of(values) & only_held_out, words_of(values) & only_held_out
    test_steps = [step for _, s in word_problems.generate(300, seed=3, split="test", step_grammar_share=1.0,
                                                          value_grammar_share=1.0) for step in s.steps]
    assert test_steps == [step for _, s in word_problems.generate(300, seed=3, split="test") for step in s.steps]


def test_value_grammar_words_the_training_finals_and_nothing_else():
    """With ``value_grammar_share`` 1.0 a training final step is a final template far less often than without (the
    grammar's few bare forms, "{v}." or "#### {v}", are templates too), and it still states the answer; at 0 the
    split is the one the shipped model was trained on, draw for draw."""
    def templated(pairs) -> int:
        return sum(s.steps[-1] in {t.format(v=s.final_answer, **p.fields()) for t in phrasing.FINALS} for p, s in pairs)

    plain = word_problems.generate(300, seed=21, step_grammar_share=1.0)
    assert plain == word_problems.generate(300, seed=21, step_grammar_share=1.0, value_grammar_share=0.0)
    worded = word_problems.generate(300, seed=21, step_grammar_share=1.0, value_grammar_share=1.0)
    assert templated(worded) < 0.3 * templated(plain), (templated(worded), templated(plain))
    assert all(str(s.final_answer) in s.steps[-1] for _, s in worded)


def test_grammar_wording_is_a_share_of_training_and_varied(train):
    """About ``grammar.GRAMMAR_SHARE`` of training problems are worded by the grammar (their openings are not the
    templates'), and its problems rarely repeat an opening's or a question's words."""
    from prmserve.bundled.word_problems import grammar

    def templated(p) -> bool:
        return any(p.text.startswith(t.format(v=p.start, **p.fields())[:-1]) for t in phrasing.OPENINGS)

    share = sum(not templated(p) for p, _ in train) / len(train)
    assert grammar.GRAMMAR_SHARE - 0.1 < share < grammar.GRAMMAR_SHARE + 0.35  # random frames are not templated either
    rng = random.Random(4)
    texts = [grammar.problem_text(rng, word_problems.make_problem(rng)) for _ in range(300)]
    shapes = {re.sub(r"\d+", "N", t.split(". ")[0]) for t in texts}
    assert len(shapes) > 200
