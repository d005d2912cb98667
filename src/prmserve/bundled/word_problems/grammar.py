"""Problem statements built from parts, for the train split only: what a problem sentence says is its numbers and
the words that name an operation ("more", "gives", "times", "half", "quarter", "loses", "spends"...); whatever
else it holds (who does it where and when, in which order the parts come, the voice, where sentences end) changes
nothing, and training sees it change all the time.

Sentences are composed: a verb, an object that holds the given number and the operation's cue, maybe a
complement, an adverb, a relative clause, a time or a place before or after; or the same event with another
subject ("Dina gives him 7 more", "7 more apples turn up in her room"). Openings state the start the same way
("There are 12 apples in Mia's basket.", "Mia's jar contains 12 apples."). Two events may share a sentence, and
the first may join the opening. None of these parts is a held-out template of ``phrasing``, nor one of their
distinctive words: the test split's wording stays unread (``tests/test_word_problems.py`` checks it).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from prmserve.bundled.word_problems import phrasing
from prmserve.bundled.word_problems.phrasing import STORIES

if TYPE_CHECKING:
    from prmserve.bundled.word_problems.problems import Op, Problem

GRAMMAR_SHARE = 0.5  # share of training problems worded by this grammar (the others: phrasing's templates)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# Per story: (verbs, objects, complements) of the clause "<verb> <object> <complement>", and other sentences for
# the same event, whose subject is not the tracked person. Every object names the given number ({n}) or the
# operation ("doubles", "half", "a quarter"); a complement adds nothing to it.
CLAUSES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "buy": (("buys", "purchases", "orders", "picks out", "brings home"),
            ("{n} more {item}", "another {n} {item}", "{n} extra {item}", "{n} more", "a further {n} {item}"),
            ("", "", "online", "with {poss} pocket money", "for {poss} collection", "from a stall", "at the corner store"),
            ("{n} more {item} are ordered by {name}", "{Name} orders {n} more {item}, and they arrive",
             "{friend} sells {obj} {n} more {item}")),
    "find": (("finds", "spots", "digs up", "turns up", "uncovers", "notices", "stumbles upon"),
             ("{n} more {item}", "{n} {item}", "another {n} {item}", "{n} more of them", "{n} extra {item}"),
             ("", "", "in the garden", "behind the sofa", "in an old box", "in the attic", "on the sidewalk", "in a drawer"),
             ("{n} more {item} turn up in {poss} room", "Another {n} {item} are spotted by {name} in the hallway",
              "{Name} looks around and spots {n} more {item}")),
    "get": (("gets", "receives", "is handed", "accepts"),
            ("{n} {item} from {friend}", "{n} more from {friend}", "another {n} {item} from {friend}",
             "{n} extra {item} from {friend}", "{n} more {item} from {poss} friend {friend}"),
            ("", "", "at the park", "by mail", "at the door"),
            ("{friend} gives {obj} {n} more {item}", "{friend} hands {obj} {n} {item}", "{friend} sends {obj} another {n} {item}",
             "{n} more {item} arrive from {friend}", "{friend}, who lives next door, gives {obj} {n} {item}")),
    "earn": (("earns", "makes", "wins", "receives"),
             ("{n} {item}", "{n} more {item}", "another {n} {item}", "{n} extra {item}"),
             ("", "", "for mowing the lawn", "by walking dogs", "for helping a neighbour", "by babysitting", "from a part-time job"),
             ("{Name} is rewarded with {n} more {item}", "A neighbour hands {obj} {n} {item} for weeding the garden")),
    "give": (("gives", "hands", "passes", "sends"),
             ("{n} {item} to {friend}", "{n} of them to {friend}", "{n} of {poss} {item} to {friend}", "{friend} {n} {item}",
              "{n} {item} to {poss} friend {friend}"),
             ("", "", "at the park", "as a thank-you", "by mail"),
             ("{n} of the {item} go to {friend}", "{friend} receives {n} of {poss} {item}",
              "{friend} asks for {n} {item}, and {name} hands them over")),
    "lose": (("loses", "misplaces", "drops", "leaves behind", "forgets"),
             ("{n} {item}", "{n} of them", "{n} of {poss} {item}", "{n} of the {item}"),
             ("", "", "at the park", "on the bus", "somewhere in the house", "on a walk"),
             ("{n} of {poss} {item} go missing", "{n} of the {item} disappear", "{n} {item} fall out of {poss} pocket and are gone")),
    "sell": (("sells", "trades away", "sells off"),
             ("{n} {item}", "{n} of them", "{n} of {poss} {item}", "{n} {item} to {friend}"),
             ("", "", "at a stall", "to a neighbour", "for a good price"),
             ("{n} of the {item} are sold", "{friend} buys {n} of {poss} {item} from {obj}")),
    "spend": (("spends", "pays", "hands over"),
              ("{n} {item} on {thing}", "{n} on {thing}", "{n} {item}", "{n} of {poss} {item} on {thing}"),
              ("", "", "at the mall", "at a kiosk"),
              ("{Thing} costs {obj} {n} {item}", "{Name} buys {thing} for {n} {item}", "{n} of {poss} {item} go on {thing}")),
    "double": (("doubles",), ("{poss} {item}", "the number of {item}", "the {item}", "{poss} collection", "the {item} {pron} has"),
               ("", "", "by trading cleverly"),
               ("{Poss} {item} are doubled", "The number of {item} doubles")),
    "triple": (("triples",), ("{poss} {item}", "the number of {item}", "the {item}", "{poss} collection", "the {item} {pron} has"),
               ("", "", "by trading cleverly"),
               ("{Poss} {item} are tripled", "The number of {item} triples")),
    "times": (("ends up with", "gets", "now has"),
              ("{n} times as many {item}", "{n} times as many", "{n} times as many {item} as before", "{n} times the {item}"),
              ("", "", "by trading cleverly"),
              ("The number of {item} becomes {n} times as large", "The number of {item} is multiplied by {n}",
               "{Name} multiplies {poss} {item} by {n}")),
    "share": (("splits", "sorts", "puts", "arranges", "separates"),
              ("them into {n} equal {piles} and keeps one {pile}", "{poss} {item} into {n} equal {piles} and keeps one {pile}",
               "them into {n} equal {piles}, keeping one {pile}", "them into {n} equal {piles} and then keeps one of them"),
              ("", "", "on the table", "on the floor"),
              ("{Name} makes {n} equal {piles} of the {item} and keeps one {pile}",)),
    "half": (("gives away", "loses", "sells", "hands over", "drops"),
             ("half of them", "half of {poss} {item}", "half of the {item}"),
             ("", "", "to {friend}", "on the way", "at the park"),
             ("Half of {poss} {item} go to {friend}", "Half of the {item} go missing", "{Name} keeps only half of {poss} {item}")),
    "quarter": (("keeps", "saves"),
                ("only a quarter of them", "a quarter of {poss} {item}", "one quarter of the {item}"),
                ("", "", "and gives the rest away", "and sells the rest"),
                ("{Name} is left with a quarter of {poss} {item}", "Only a quarter of the {item} stay with {name}")),
    "less_quarter": (("gives away", "loses", "sells", "drops", "trades away"),
                     ("a quarter of them", "a quarter of {poss} {item}", "one quarter of the {item}"),
                     ("", "", "at the park", "to {friend}", "on the bus"),
                     ("A quarter of the {item} go missing", "A quarter of {poss} {item} are sold")),
}
PILES = (("piles", "pile"), ("stacks", "stack"), ("heaps", "heap"), ("rows", "row"), ("bags", "bag"), ("baskets", "basket"),
         ("bundles", "bundle"), ("parts", "part"), ("jars", "jar"))
THINGS = ("a kite", "a toy", "snacks", "a comic book", "some paint", "a hat", "a puzzle", "a bus ride", "a movie", "a yo-yo")

ADVERBS = ("also", "then", "quickly", "happily", "suddenly", "finally", "carefully", "proudly", "eagerly")
# When an event happens (before or after its clause), never where: places are the clauses' complements.
LEADS = ("Then", "Next", "Later", "Later that day", "That afternoon", "The following day", "On Tuesday", "By the evening",
         "A few days later", "Right after that", "Shortly afterwards", "In the afternoon", "At noon", "Before dinner",
         "Over the weekend", "Meanwhile", "Some time later", "Eventually", "Suddenly", "That evening", "The day after",
         "During the holidays", "Within a few days", "Over the summer")
TAILS = ("later that day", "that afternoon", "the next morning", "on Tuesday", "over the weekend", "during the holidays",
         "in the evening", "right away", "without a word", "with a smile", "over the summer", "within a few days", "after a while")
OPENING_LEADS = ("In the morning", "On Monday", "At first", "This morning", "Early on Saturday", "To begin with")
ABOUT = ("who loves {item}", "who is very busy today", "who likes to count things", "whose room is tidy", "a keen gardener")
CONTAINERS = (("in", "box"), ("in", "jar"), ("in", "basket"), ("in", "drawer"), ("in", "backpack"), ("in", "bucket"),
              ("in", "tin"), ("in", "chest"), ("inside", "cupboard"), ("on", "shelf"), ("on", "desk"), ("on", "table"))
MONEY_CONTAINERS = (("in", "wallet"), ("in", "piggy bank"), ("in", "pocket"), ("in", "purse"), ("in", "jar"))
OPENINGS = (
    "{Name} {has} {v} {item}.", "{Name} {has} {v} {item} {prep} {poss} {container}.", "There are {v} {item} {prep} {name}'s {container}.",
    "{Prep} {name}'s {container}, there are {v} {item}.", "{Name}'s {container} contains {v} {item}.",
    "{Name}'s {container} has {v} {item} {prep} it.", "{Name} has a {container} with {v} {item} {prep} it.",
    "{v} {item} belong to {name}.", "{Lead}, {name} {has} {v} {item}.", "{Name}, {about}, {has} {v} {item}.",
    "{Name} {has} {v} {item}, all {prep} one {container}.", "{Name} counts {v} {item} {prep} {poss} {container}.",
)
HAS = ("has", "owns", "keeps", "has got", "stores", "starts out with", "is holding", "looks after")
PAIRS = ("{S} {c}, and then {d}.", "{S} {c}; then {pron} {d}.", "{S} {c}, and {pron} {d}.", "First {s} {c}, then {pron} {d}.",
         "{S} {c} before {pron} {d}.", "After {s} {c}, {pron} {d}.", "{S} {c} – then {pron} {d}.")
QUESTIONS = ("How many {item} does {s} have {when}?", "How many {item} does {s} own {when}?", "Find how many {item} {s} has {when}.",
             "Work out how many {item} {s} has {when}.", "How many {item} has {s} got {when}?", "Count the {item} {s} has {when}.",
             "So how many {item} does {s} have {when}?", "{When}, how many {item} does {s} have?")
QUESTIONS_LEFT = ("How many {item} does {s} have left?", "How many {item} are left?", "Find how many {item} {s} has left.",
                  "How many {item} does {s} have left over?", "How many of the {item} are left now?")
WHEN = ("now", "at this moment", "after all this", "in total", "at the end of the day", "today", "altogether", "by the evening")


def _fields(rng: random.Random, p: Problem, friend: str = "") -> dict[str, str]:
    """The problem's template fields and the grammar's own, drawn for one sentence."""
    f = p.fields()
    prep, container = rng.choice(MONEY_CONTAINERS if p.item in phrasing.MONEY else CONTAINERS)
    piles, pile = rng.choice(PILES)
    thing = rng.choice(THINGS)
    return f | {"Poss": f["poss"].capitalize(), "friend": friend, "prep": prep, "Prep": prep.capitalize(),
                "container": container, "piles": piles, "pile": pile, "thing": thing, "Thing": _cap(thing),
                "has": rng.choice(HAS), "Lead": rng.choice(OPENING_LEADS), "about": rng.choice(ABOUT).format(**f)}


def clause(rng: random.Random, op: Op, p: Problem) -> tuple[str, bool]:
    """What happens in ``op``: a clause whose subject is the tracked person ("buys 7 more apples online"), with
    True; or a whole sentence without its period ("Dina gives him 7 more apples"), with False."""
    verbs, objects, complements, others = CLAUSES[op.story]
    fields = _fields(rng, p, op.friend) | {"n": str(op.arg)}
    if rng.random() < 0.2:
        return _cap(rng.choice(others).format(**fields)), False
    if rng.random() < 0.25:  # one of the story's templates, in the grammar's sentences
        text = rng.choice(STORIES[op.story].clauses)
    else:
        text = " ".join([rng.choice(verbs), rng.choice(objects)] + [c for c in [rng.choice(complements)] if c])
    if rng.random() < 0.1:
        text = phrasing.disguised(rng, text)
    if rng.random() < 0.15 and not text.startswith("is "):
        text = rng.choice(ADVERBS) + " " + text
    return text.format(**fields), True


def sentence(rng: random.Random, text: str, is_clause: bool, p: Problem) -> str:
    """One event as a sentence: a clause gets a subject (the pronoun, or the name), maybe a lead, a tail or a
    relative clause."""
    if not is_clause:
        return text + "."
    fields = p.fields()
    named = rng.random() < 0.25
    subject = fields["Name"] if named else fields["Pron"]
    r = rng.random()
    if r < 0.25:
        return f"{rng.choice(LEADS)}, {fields['Name'] if named else fields['pron']} {text}."
    if r < 0.4:
        return f"{subject} {text}, {rng.choice(TAILS)}."
    if r < 0.5:
        return f"{subject} {text} {rng.choice(TAILS)}."
    if r < 0.6 and named:
        return f"{subject}, {rng.choice(ABOUT).format(**fields)}, {text}."
    return f"{subject} {text}."


def question(rng: random.Random, p: Problem) -> str:
    """The question: how many items the person has at the end (or has left, after taking some away)."""
    fields = p.fields()
    s = fields["name"] if rng.random() < 0.5 else fields["pron"]
    if p.ops[-1].kind in ("sub", "less_quarter") and rng.random() < 0.3:
        return rng.choice(QUESTIONS_LEFT).format(s=s, **fields)
    when = rng.choice(WHEN)
    return _cap(rng.choice(QUESTIONS).format(s=s, when=when, When=_cap(when), **fields))


def problem_text(rng: random.Random, p: Problem) -> str:
    """A training problem's statement: an opening with the start, a sentence per event (two may share one, the
    first may join the opening), a question (which may join the last sentence)."""
    fields = p.fields()
    opening = rng.choice(OPENINGS).format(v=p.start, **_fields(rng, p))
    events = [clause(rng, op, p) for op in p.ops]
    sentences = []
    if events[0][1] and rng.random() < 0.25:  # "There are 12 apples in Mia's basket, and she buys 5 more."
        opening = f"{opening[:-1]}, and {fields['pron']} {events.pop(0)[0]}."
    while events:
        if len(events) >= 2 and events[0][1] and events[1][1] and rng.random() < 0.25:
            (c, _), (d, _) = events.pop(0), events.pop(0)
            named = rng.random() < 0.3
            sentences.append(rng.choice(PAIRS).format(S=fields["Name"] if named else fields["Pron"],
                                                      s=fields["Name"] if named else fields["pron"], c=c, d=d, **fields))
        else:
            sentences.append(sentence(rng, *events.pop(0), p))
    ask = question(rng, p)
    if sentences and ask.startswith("How many") and rng.random() < 0.15:  # "She gives away 3, so how many are left?"
        return " ".join([opening, *sentences[:-1], sentences[-1][:-1] + ", so h" + ask[1:]])
    return " ".join([opening, *sentences, ask])
