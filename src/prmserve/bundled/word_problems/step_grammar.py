"""Claim steps built from parts, for the train split only: what a step says is its computation (or result) and
the words that name the event it computes ("buying 7 more", "the 45 spent", "half of them"); how the sentence
around them is built (which comes first, the connective, the subject, a lead word) changes nothing, and training
sees it change all the time.

An event is worded three ways per story: a clause ("buys {n} more"), a gerund ("buying {n} more") and a noun
phrase ("the {n} more {item}"); a step puts one of them into a sentence form with the computation
(``{calc}``). None of the words is one that only the held-out step templates of ``phrasing`` use
(``tests/test_word_problems.py`` checks it), so the test split's step wording stays unread.
"""

from __future__ import annotations

import random

STEP_GRAMMAR_SHARE = 0.0  # share of training claim steps worded here; the trainer's --step-grammar-share sets it

# Per story and claim part: (clauses, gerunds, noun phrases) naming the event. Fields: {n} (the given), {friend},
# {item}, {pron}, {poss}, {obj}; {thing} and {piles} are drawn here.
EVENTS: dict[tuple[str, int], tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    ("buy", 0): (("buys {n} more", "buys another {n} {item}", "picks out {n} more {item}", "orders {n} more"),
                 ("buying {n} more", "buying another {n} {item}", "purchasing {n} more {item}", "ordering {n} extra"),
                 ("the {n} extra {item}", "{n} more {item}", "another {n} {item}", "the {n} {pron} buys")),
    ("find", 0): (("finds {n} more", "spots {n} more {item}", "uncovers {n} {item}"),
                  ("finding {n} more", "spotting {n} more {item}", "uncovering another {n}"),
                  ("the {n} {pron} finds", "{n} more {item} from the garden", "the {n} extra {item}")),
    ("get", 0): (("receives {n} from {friend}", "accepts {n} {item} from {friend}"),
                 ("receiving {n} from {friend}", "getting {n} {item} from {friend}", "accepting another {n} from {friend}"),
                 ("the {n} from {friend}", "{friend}'s {n} {item}", "the {n} {item} {friend} hands over")),
    ("earn", 0): (("earns {n}", "earns {n} more {item}", "wins {n} {item}"),
                  ("earning {n}", "earning {n} {item}", "winning another {n}"),
                  ("the {n} {pron} earns", "{n} {item} of earnings", "the {n} extra {item} from work")),
    ("give", 0): (("gives {n} to {friend}", "gives {friend} {n} {item}", "hands {n} {item} to {friend}"),
                  ("giving {n} to {friend}", "handing {friend} {n} {item}", "passing {n} {item} to {friend}"),
                  ("the {n} for {friend}", "the {n} {item} {pron} gives {friend}", "{n} {item} handed to {friend}")),
    ("lose", 0): (("loses {n}", "drops {n} {item}", "misplaces {n} of them"),
                  ("losing {n}", "dropping {n} {item}", "misplacing {n} of them"),
                  ("the {n} {pron} loses", "the {n} missing {item}", "{n} dropped {item}")),
    ("sell", 0): (("sells {n}", "sells {n} {item}", "sells off {n} of them"),
                  ("selling {n}", "selling {n} {item}", "trading away {n} {item}"),
                  ("the {n} sold", "the {n} {item} {pron} sells", "{n} sold {item}")),
    ("spend", 0): (("spends {n}", "spends {n} {item} on {thing}", "pays {n} for {thing}"),
                   ("spending {n}", "spending {n} {item} on {thing}", "handing over {n} for {thing}"),
                   ("the {n} spent", "the {n} {item} for {thing}", "{n} {item} spent on {thing}")),
    ("double", 0): (("doubles {poss} {item}", "doubles them"),
                    ("doubling them", "doubling the {item}", "doubling {poss} {item}"),
                    ("double the {item}", "the doubling", "double the number")),
    ("triple", 0): (("triples {poss} {item}", "triples them"),
                    ("tripling them", "tripling the {item}", "tripling {poss} {item}"),
                    ("triple the {item}", "the tripling", "triple the number")),
    ("times", 0): (("has {n} times as many", "now has {n} times as many {item}"),
                   ("having {n} times as many", "having {n} times the {item}"),
                   ("{n} times as many {item}", "{n} times the {item}", "{n} times as many")),
    ("share", 0): (("splits them into {n} equal {piles} and keeps one", "sorts them into {n} equal {piles} and keeps one {pile}"),
                   ("splitting them into {n} equal {piles}", "sharing them out into {n} equal parts"),
                   ("one of {n} equal {piles}", "a {pile} of {n} equal {piles}", "an equal share of {n}")),
    ("half", 0): (("keeps half", "gives away half of them", "loses half of them"),
                  ("halving them", "giving away half", "losing half of the {item}"),
                  ("half of them", "half of the {item}", "the half {pron} keeps")),
    ("quarter", 0): (("keeps a quarter", "saves a quarter of them"),
                     ("saving a quarter of them", "setting aside a quarter"),
                     ("a quarter of them", "one quarter of the {item}", "the quarter {pron} keeps")),
    ("less_quarter", 0): (("gives away a quarter", "loses a quarter of them"),
                          ("giving away a quarter", "losing a quarter of them"),
                          ("a quarter of them", "one quarter of the {item}", "the quarter {pron} gives away")),
    ("less_quarter", 1): (("gives that quarter away", "has the rest left"),
                          ("taking away the quarter", "removing that quarter"),
                          ("the rest", "the rest of the {item}", "the {item} left over")),
}
PILES = (("piles", "pile"), ("stacks", "stack"), ("heaps", "heap"), ("rows", "row"), ("bags", "bag"), ("bundles", "bundle"))
THINGS = ("a kite", "a toy", "snacks", "a comic book", "a hat", "a puzzle", "a movie")
# Connectives before a noun phrase, by what the event does to the count.
WITH = {"add": ("with", "after", "counting", "plus", "adding in"), "sub": ("after", "minus", "less", "taking away", "not counting"),
        "other": ("with", "after", "for", "taking")}
VERBS = {"add": ("gives", "makes", "comes to", "equals", "is"), "sub": ("leaves", "comes to", "gives", "equals", "is"),
         "other": ("gives", "makes", "comes to", "equals", "is")}
RESULTS = ("{calc}", "{calc} {item}", "{calc} {item}", "{calc} {item} in all", "{calc} {item} in total", "{calc} {item} altogether",
           "{calc} {item} now")
RESULTS_LEFT = ("{calc} {item} left", "{calc} left", "{calc} {item} left over")
LEADS = ("", "", "", "So ", "Then ", "Now ", "Next, ", "After that, ", "Here, ", "First, ", "Hence ", "Therefore ", "In this step, ",
         "Clearly, ", "Well, ", "OK, ", "Step: ", "Right, ")


def _cap(text: str) -> str:
    """Sentence case: the first letter, or the field that starts it when it has a capitalised form."""
    for field in ("{pron}", "{name}"):
        if text.startswith(field):
            return "{" + field[1].upper() + text[2:]
    return text if text.startswith("{") else text[0].upper() + text[1:]


def _effect(story: str, part: int) -> str:
    """What the event does to the count: "add", "sub", or "other" (multiplies or divides it)."""
    if story in ("buy", "find", "get", "earn"):
        return "add"
    if story in ("give", "lose", "sell", "spend") or (story == "less_quarter" and part == 1):
        return "sub"
    return "other"


def claim_template(rng: random.Random, story: str, part: int = 0) -> str:
    """A claim step's template for this story's event (``part``: which claim of it), with ``{calc}`` once."""
    clauses, gerunds, nouns = EVENTS[(story, part)]
    effect = _effect(story, part)
    result = rng.choice(RESULTS + RESULTS_LEFT if effect == "sub" else RESULTS)
    if story == "less_quarter" and part == 0:  # the quarter itself: no "in all", nothing left yet
        result = rng.choice(("{calc}", "{calc} {item}"))
    subject = rng.choice(("{pron}", "{pron}", "{name}"))
    clause, gerund, noun = rng.choice(clauses), rng.choice(gerunds), rng.choice(nouns)
    form = rng.randrange(10)
    if form == 0:
        text = f"{subject} {clause}, so {{pron}} has {result}"
    elif form == 1:
        text = f"{subject} {clause}: {result}"
    elif form == 2:
        text = f"{gerund} {rng.choice(VERBS[effect])} {result}"
    elif form == 3:
        text = f"{rng.choice(WITH[effect])} {noun}, {subject} has {result}"
    elif form == 4:
        text = f"{result}, after {gerund}"
    elif form == 5:
        text = f"{subject} now has {result} after {gerund}"
    elif form == 6:
        text = f"{noun}: {result}"
    elif form == 7:
        text = f"that is {result}, {rng.choice(('after', 'with', 'counting'))} {noun}"
    elif form == 8:
        text = f"the count is {result} after {gerund}"
    else:
        text = f"{rng.choice(WITH[effect])} {noun}, the number is {result}"
    piles, pile = rng.choice(PILES)
    return _sentence(rng, text.replace("{piles}", piles).replace("{pile}", pile).replace("{thing}", rng.choice(THINGS)))


def _sentence(rng: random.Random, text: str) -> str:
    """``text`` as a step: after a lead word or capitalised, and with an ending."""
    lead = rng.choice(LEADS)
    return lead + (text if lead else _cap(text)) + rng.choice((".", ".", ".", "", "!"))


# Value steps (the start, a restatement of the count, the final answer) built from parts too, for training only:
# the value ``{v}`` is what such a step says; the sentence around it changes all the time.
SUBJECTS = ("{pron}", "{pron}", "{name}")
HAVE = ("has", "now has", "keeps", "is left with", "owns")
VALUE_FORMS = {
    "start": ("{subject} has {v} {item} at first", "at first, {subject} has {v} {item}", "{subject} starts with {v} {item}",
              "first, {subject} has {v} {item}", "the count is {v} {item} at first", "we have {v} {item} to begin with",
              "{v} {item} to begin with", "{subject} has {v} {item} before anything else"),
    "restate": ("{subject} {have} {v} {item}", "now {subject} has {v} {item}", "that makes {v} {item}", "the count is now {v}",
                "this leaves {v} {item}", "so the number is {v}", "which is {v} {item} in all", "{v} {item} at this stage"),
    "final": ("the answer is {V}", "so the answer is {V}", "answer is {V}", "{subject} has {V} {item} in the end",
              "in total, {V} {item}", "the total is {V}", "{V}", "so {V} {item}", "that gives {V} {item} in all",
              "all in all, {V}", "the result is {V}", "{subject} {have} {V} {item}, which is the answer"),
}
ANSWERS = ("{v}", "{v}", "\\boxed{{{v}}}", "\\boxed{{{v}}}")  # how a final answer's number is written


def value_template(rng: random.Random, role: str) -> str:
    """A step template of ``role`` ("start", "restate" or "final") with ``{v}`` once."""
    if role == "final" and rng.random() < 0.1:
        return "#### {v}"  # a training template as it stands ("#### {v} {item}" is a held-out one)
    text = rng.choice(VALUE_FORMS[role])
    return _sentence(rng, text.replace("{subject}", rng.choice(SUBJECTS)).replace("{have}", rng.choice(HAVE))
                     .replace("{V}", rng.choice(ANSWERS)))
