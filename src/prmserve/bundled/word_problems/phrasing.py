"""How the synthetic problems and solutions are worded: every phrasing template, split into those training sees
and those held out for the test split (so the test F1 measures wording the model never read).

Fields: ``{name}`` ``{Name}`` (the same), ``{pron}``/``{Pron}`` (she, he), ``{poss}`` (her, his), ``{obj}``
(her, him), ``{item}``, ``{friend}``, ``{n}`` (the operation's given number), ``{calc}`` (the step's computation,
or only its result when the step skips it), ``{v}`` (a value stated without computing it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OBJECTS = (
    "apples", "marbles", "stickers", "cookies", "pencils", "stamps", "books", "cards", "shells",
    "candies", "beads", "oranges", "balloons", "toy cars", "flowers", "eggs", "cupcakes", "crayons", "buttons",
)
OBJECTS_HELD_OUT = ("pebbles", "muffins", "ribbons", "tickets")
MONEY = ("dollars", "coins")  # what the money stories (earn, spend) fit
NAMES = (
    ("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Leo", "he"), ("Zoe", "she"), ("Sam", "he"), ("Lily", "she"),
    ("Ben", "he"), ("Emma", "she"), ("Noah", "he"), ("Ella", "she"), ("Max", "he"), ("Nora", "she"), ("Owen", "he"),
    ("Ruby", "she"), ("Jack", "he"), ("Anna", "she"), ("Carl", "he"), ("Sara", "she"), ("Luke", "he"),
)
NAMES_HELD_OUT = (("Iris", "she"), ("Omar", "he"), ("Tess", "she"), ("Hugo", "he"))
FRIENDS = ("Dina", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jill", "Kai", "Pam", "Rex")
FRIENDS_HELD_OUT = ("Vera", "Yuri")


@dataclass(frozen=True)
class Story:
    """One way an operation happens: its kind, the items it fits, and its wording in problems and steps.

    ``steps`` entries hold one template per claim the operation makes (two for "loses a quarter": the
    quarter, then what is left). ``args`` fixes the given number (doubling is x 2).
    """

    kind: str
    clauses: tuple[str, ...]
    clauses_held_out: tuple[str, ...]
    steps: tuple[tuple[str, ...], ...]
    steps_held_out: tuple[tuple[str, ...], ...]
    money: bool | None = None  # True: only with MONEY items; False: only with objects; None: either
    args: tuple[int, ...] = ()


def _one(*templates: str) -> tuple[tuple[str, ...], ...]:
    return tuple((t,) for t in templates)


STORIES = {
    "buy": Story(
        "add", ("buys {n} more {item}", "buys another {n} {item}", "buys {n} more"),
        ("picks up {n} more {item} at the shop", "adds {n} new {item} to the pile"),
        _one("After buying {n} more, {pron} has {calc} {item}.", "{Pron} buys {n} more, so {pron} has {calc} {item}.",
             "Buying {n} more {item} gives {calc} {item}."),
        _one("With the {n} new {item}, the total is {calc}.", "Adding the {n} bought {item} makes {calc}."), money=False),
    "find": Story(
        "add", ("finds {n} more", "finds {n} more {item}", "finds {n} {item} in the garden"),
        ("comes across {n} more {item}", "discovers {n} more {item} under the bed"),
        _one("{Pron} finds {n} more, so {pron} has {calc} {item}.", "After finding {n} more, {name} has {calc} {item}.",
             "{Name} has {calc} {item}."),
        _one("Finding {n} more makes {calc} {item}.", "The {n} found {item} bring the count to {calc}."), money=False),
    "get": Story(
        "add", ("gets {n} {item} from {friend}", "gets {n} more from {friend}"),
        ("gets another {n} {item} from {friend} as a gift", "gets {n} of {friend}'s {item}"),
        _one("{friend} gives {obj} {n}, so {pron} has {calc} {item}.", "After getting {n} from {friend}, {pron} has {calc} {item}.",
             "Adding the {n} from {friend}: {calc} {item}."),
        _one("{friend}'s {n} {item} bring the total to {calc}.", "With {friend}'s gift of {n}, that is {calc} {item}."), money=None),
    "earn": Story(
        "add", ("earns {n} {item}", "earns {n} more {item} doing chores"),
        ("earns {n} {item} for washing cars", "earns another {n} {item} at a yard sale"),
        _one("After earning {n} {item}, {pron} has {calc} {item}.", "{Pron} earns {n}, so {pron} has {calc} {item}.",
             "{Name} now has {calc} {item}."),
        _one("Being paid {n} {item} brings {obj} to {calc} {item}.", "The {n} {item} earned make {calc} {item} in total."), money=True),
    "give": Story(
        "sub", ("gives {n} {item} to {friend}", "gives {friend} {n} {item}", "gives away {n}"),
        ("gives {n} of the {item} to {friend} as a present", "gives away {n} {item} at school"),
        _one("After giving {n} to {friend}, {pron} has {calc} {item}.", "{Pron} gives away {n}, so {pron} has {calc} {item} left.",
             "Giving {n} {item} to {friend} leaves {calc} {item}.", "{Name} has {calc} {item} left."),
        _one("Once {friend} takes {n}, {calc} {item} remain.", "Without the {n} given to {friend}, {pron} keeps {calc} {item}."), money=False),
    "lose": Story(
        "sub", ("loses {n} {item}", "loses {n} of them"),
        ("loses {n} {item} on the way home", "loses another {n} of the {item}"),
        _one("{Pron} loses {n}, so {pron} has {calc} {item} left.", "After losing {n} {item}, {pron} has {calc}.",
             "That leaves {calc} {item}."),
        _one("Losing {n} leaves {name} with {calc} {item}.", "With {n} lost, only {calc} {item} are left."), money=None),
    "sell": Story(
        "sub", ("sells {n} {item}", "sells {n} of them"),
        ("sells {n} {item} at the market", "sells {n} of the {item} to {friend}"),
        _one("After selling {n}, {pron} has {calc} {item} left.", "{Pron} sells {n}, which leaves {calc} {item}."),
        _one("Selling {n} {item} means {calc} are left.", "After the sale of {n}, there are {calc} {item}."), money=False),
    "spend": Story(
        "sub", ("spends {n}", "spends {n} {item} on a book", "spends {n} {item}"),
        ("spends {n} {item} on lunch", "spends {n} of the {item} on a game"),
        _one("After spending {n}, {pron} has {calc} {item} left.", "{Pron} spends {n}, so {pron} has {calc} {item}.",
             "{Name} has {calc} {item} left."),
        _one("Paying {n} leaves {calc} {item}.", "The purchase of {n} leaves {obj} with {calc} {item}."), money=True),
    "double": Story(
        "mul", ("doubles the number of {item}", "doubles {poss} {item}"), ("manages to double {poss} {item}", "sees {poss} {item} double"),
        _one("Doubling the {item} gives {calc} {item}.", "The number doubles, so {pron} has {calc} {item}."),
        _one("Twice as many is {calc} {item}.", "Two times the {item} is {calc}."), args=(2,)),
    "triple": Story(
        "mul", ("triples the number of {item}", "triples {poss} {item}"), ("manages to triple {poss} {item}", "ends the week with three times as many {item}"),
        _one("Tripling the {item} gives {calc} {item}.", "The number triples, so {pron} has {calc} {item}."),
        _one("Three times as many is {calc} {item}.", "Three times the {item} is {calc}."), args=(3,)),
    "times": Story(
        "mul", ("ends up with {n} times as many {item}", "gets {n} times as many {item}"),
        ("ends the month with {n} times as many {item}", "grows {poss} {item} to {n} times the number"),
        _one("{n} times as many is {calc} {item}.", "Now {pron} has {calc} {item}.", "{Pron} has {calc} {item} now."),
        _one("Multiplying by {n} gives {calc} {item}.", "{n} times the {item} is {calc}."), money=None),
    "share": Story(
        "div", ("splits them into {n} equal piles and keeps one pile", "puts them into {n} equal bags and keeps one bag"),
        ("divides them evenly into {n} boxes and keeps one box", "packs them into {n} equal groups and keeps one group"),
        _one("One of {n} equal piles has {calc} {item}.", "Splitting them into {n} parts gives {calc} {item} each.",
             "{Pron} keeps {calc} {item}."),
        _one("Each of the {n} boxes gets {calc} {item}.", "One group of {n} equal groups is {calc} {item}."), money=False),
    "half": Story(
        "div", ("gives away half of them", "gives half of {poss} {item} to {friend}", "loses half of them"),
        ("donates half of {poss} {item}", "gives half of the {item} to charity"),
        _one("Half of them is {calc}, and {pron} keeps that many.", "After giving away half, {pron} has {calc} {item}.",
             "{Pron} keeps half: {calc} {item}."),
        _one("Only half remain: {calc} {item}.", "Keeping one half gives {calc} {item}."), args=(2,)),
    "quarter": Story(
        "div", ("keeps only a quarter of them",), ("keeps just one quarter of {poss} {item}", "holds on to only a quarter of them"),
        _one("A quarter of them is {calc} {item}.", "{Pron} keeps a quarter: {calc} {item}."),
        _one("One quarter makes {calc} {item}.", "Keeping a quarter leaves {calc} {item}."), money=False, args=(4,)),
    "less_quarter": Story(
        "less_quarter", ("gives away a quarter of them", "loses a quarter of them", "sells a quarter of {poss} {item}"),
        ("uses up a quarter of them", "gives a quarter of the {item} to {friend}"),
        (("A quarter of them is {calc}.", "That leaves {calc} {item}."),
         ("{Pron} gives away {calc} {item}.", "So {pron} has {calc} {item} left."),
         ("One quarter is {calc} {item}.", "{Name} has {calc} {item} left.")),
        (("The quarter is {calc} {item}.", "{calc} {item} are still there."),
         ("One fourth of them is {calc}.", "What remains is {calc} {item}.")), money=False, args=(4,)),
}

OPENINGS = ("{Name} has {v} {item}.", "{Name} has {v} {item} in a box.", "{Name} owns {v} {item}.",
            "{Name} starts the day with {v} {item}.", "At first, {name} has {v} {item}.", "{Name} keeps {v} {item} on a shelf.",
            "{Name} has a jar of {v} {item}.")
OPENINGS_HELD_OUT = ("There are {v} {item} in {name}'s bag.", "{Name} collects {v} {item}.")
# A sentence per clause, or two clauses in one sentence; the first clause may join the opening sentence.
PAIRS = ("{Pron} {c}, then {d}.", "{Pron} {c} and then {d}.")
PAIRS_HELD_OUT = ("{Pron} {c}, and after that {d}.",)
JOINS = ("{Pron} {c}.", "Then {pron} {c}.", "Next, {pron} {c}.", "After that {pron} {c}.", "On Monday, {pron} {c}.",
         "The next day, {pron} {c}.", "In the evening, {pron} {c}.", "After a while, {pron} {c}.", "Afterwards, {pron} {c}.",
         "Then {name} {c}.")
# Phrases training may hang on a clause ("buys 7 more at the fair"): where or when it happens changes nothing.
CLAUSE_TAILS = ("at the park", "at the fair", "in the morning", "on Sunday", "after dinner", "at the library", "in the kitchen",
                "with a smile", "during the break", "for a party", "before lunch", "in the garage")
# Words that name an operation wherever they stand in a clause: a clause that keeps one may lose its verb.
# ("quarter" is none: without its verb, a quarter might be kept or given away.)
CUE_WORDS = ("more", "another", "extra", "times", "half", "equal")
JOINS_HELD_OUT = ("Later on, {pron} {c}.", "Soon after, {pron} {c}.")
QUESTIONS = ("How many {item} does {name} have now?", "How many {item} does {pron} have?", "How many?",
             "How many {item} does {pron} have at the end?")
QUESTIONS_HELD_OUT = ("How many {item} does {name} end up with?", "In the end, how many {item} does {pron} have?")
QUESTIONS_LEFT = ("How many are left?", "How many {item} are left?")  # when the last operation takes some away

# Steps that state a value without computing it: the given start, or the current value again.
STARTS = ("{Name} starts with {v} {item}.", "At first {name} has {v} {item}.", "{Name} has {v} {item}.")
STARTS_HELD_OUT = ("{Name} begins with {v} {item}.", "We start from {v} {item}.")
RESTATES = ("Now {name} has {v} {item}.", "So {pron} has {v} {item}.", "That is {v} {item}.")
RESTATES_HELD_OUT = ("So far there are {v} {item}.", "{Pron} holds {v} {item} at this point.")
# A step with only the computation.
TERSE = ("{calc}.", "{calc} {item}.", "{calc}")
TERSE_HELD_OUT = ("So {calc}.", "We get {calc}.")
# Words a step may start with ("So after buying 7 more, ...").
LEADS = ("So ", "Then ", "Now ", "Next, ", "After that, ")
LEADS_HELD_OUT = ("Thus ", "This means ")

FINALS = (
    "The answer is {v}.", "The answer is {v} {item}.", "So {v}.", "So {v} {item}.", "\\boxed{{{v}}}",
    "So the answer is \\boxed{{{v}}}.", "#### {v}", "{Name} has {v} {item} now.", "{Pron} has {v} {item}.",
    "Therefore, the final answer is \\boxed{{{v}}}.", "In the end {name} has \\boxed{{{v}}} {item}.", "{v}",
)
FINALS_HELD_OUT = ("The final answer is {v}.", "Answer: {v} {item}", "#### {v} {item}", "So {name} ends up with \\boxed{{{v}}}.")


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def pseudo_word(rng: random.Random) -> str:
    """A made-up word of random letters: training meets unknown names, items and words (every letter, in any
    order), so a word it never read is nothing new and it judges the numbers instead."""
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 8)))


# Words of made-up frames around a computation or a value: training sees steps worded any way at all, so
# it judges their numbers, not their wording (the held-out templates' words are not among them).
FRAME_WORDS = ("so", "then", "now", "the", "that", "is", "has", "makes", "gives", "total", "and", "we", "this",
               "of", "with", "all", "in", "at", "more", "number", "left", "count", "here", "which", "it", "are")
# The frame words that name no operation and no total: what training slips into problem sentences (where a
# "more" or "gives" slipped in would say that something else happens).
FILLER_WORDS = tuple(w for w in FRAME_WORDS if w not in ("has", "makes", "gives", "total", "more", "number", "left", "count"))


def random_frame(rng: random.Random, slot: str, mentions: tuple[str, ...] = (), vocab: tuple[str, ...] = FRAME_WORDS) -> str:
    """A step template of random words (``vocab``'s and made-up ones) around ``{slot}``, mentioning some of
    ``mentions`` (other fields, such as the operation's ``{n}``) before it, in random order."""
    def words(most: int) -> list[str]:
        return [rng.choice(vocab) if rng.random() < 0.5 else pseudo_word(rng) for _ in range(rng.randint(0, most))]

    parts = words(3)
    for field in rng.sample(mentions, rng.randint(0, len(mentions))):
        parts += ["{" + field + "}"] + words(2)
    parts += ["{" + slot + "}"] + words(2)
    text = " ".join(parts)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ":", ""])


def noisy(rng: random.Random, template: str, vocab: tuple[str, ...] = FRAME_WORDS) -> str:
    """``template`` with 1-3 random words (``vocab``'s or made-up ones) slipped in after its first word: a
    wording near the known ones, as held-out templates are."""
    words = template.split(" ")
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(1, len(words))
        words.insert(at, rng.choice(vocab) if rng.random() < 0.5 else pseudo_word(rng))
    return " ".join(words)


def random_lead(rng: random.Random) -> str:
    """1-3 random words (filler and made-up) and a comma, to open a sentence: "Glorp the, "."""
    words = [rng.choice(FILLER_WORDS) if rng.random() < 0.5 else pseudo_word(rng) for _ in range(rng.randint(1, 3))]
    text = " ".join(words)
    return text[0].upper() + text[1:] + ", "


def disguised(rng: random.Random, clause: str) -> str:
    """``clause`` with its verb made up when a cue word (``CUE_WORDS``) still says what happens: training then
    judges the operation by its cues, not by one verb it knows."""
    words = clause.split(" ")
    if len(words) > 1 and any(w in CUE_WORDS for w in words[1:]):
        words[0] = pseudo_word(rng) + "s"
    return " ".join(words)


def templates(train: tuple, held_out: tuple, test: bool) -> tuple:
    """The templates a split draws from: the held-out ones for the test split, the training ones otherwise."""
    return held_out if test else train
