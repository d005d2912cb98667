"""The numbers of the synthetic word problems: how givens are drawn, which ranges only the test split uses, and
the wrong values an error writes (a slipped digit, a misremembered earlier result)."""

from __future__ import annotations

import math
import random

MAX_GIVEN = 1000  # every number in a problem's text is at most this
MAX_VALUE = 10_000  # every correct result is at most this
MAX_FACTOR = 12  # multiplications and divisions are by 2..MAX_FACTOR (the times table)
HELD_OUT_BANDS = ((60, 69), (600, 699))  # given numbers drawn only for the test split


def held_out(value: int) -> bool:
    """Whether ``value`` lies in a band of given numbers that only the test split uses."""
    return any(lo <= value <= hi for lo, hi in HELD_OUT_BANDS)


def given(rng: random.Random, lo: int, hi: int, test: bool = False) -> int | None:
    """A number as word problems state them, in [lo, hi]: small ones often, round ones often.

    ``test`` draws it from a held-out band (where one meets [lo, hi]); otherwise held-out bands are
    avoided. None when no allowed number fits.
    """
    if lo > hi:
        return None
    if test:
        bands = [(max(lo, a), min(hi, b)) for a, b in HELD_OUT_BANDS if max(lo, a) <= min(hi, b)]
        if bands:
            a, b = rng.choice(bands)
            return rng.randint(a, b)
    for _ in range(20):
        value = _draw(rng, lo, hi)
        if not held_out(value):
            return value
    allowed = [v for v in range(lo, min(hi, lo + 200) + 1) if not held_out(v)]
    return rng.choice(allowed) if allowed else None


def _draw(rng: random.Random, lo: int, hi: int) -> int:
    """Log-uniform, uniform or round, in [lo, hi]."""
    r = rng.random()
    if r < 0.7:
        return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))
    if r < 0.8:
        return rng.randint(lo, hi)
    step = rng.choice([5, 10, 10, 25, 50, 100])
    multiples = range(step * math.ceil(lo / step), hi + 1, step)
    return rng.choice(multiples) if len(multiples) else rng.randint(lo, hi)


def factor(rng: random.Random, most: int) -> int:
    """A multiplier in 2..most, small ones more often (as word problems have them)."""
    return min(most, int(math.exp(rng.uniform(math.log(2), math.log(most + 1)))))


def slipped(rng: random.Random, value: int) -> int:
    """``value`` with a slip of the kind people make: off by 1, 2, 10 or 100, one digit wrong, two digits swapped."""
    digits = str(value)
    while True:
        r = rng.random()
        if r < 0.25:
            wrong = value + rng.choice([-2, -1, -1, 1, 1, 2])
        elif r < 0.45:
            wrong = value + rng.choice([-10, 10])
        elif r < 0.55:
            wrong = value + rng.choice([-100, 100, -1000, 1000])
        elif r < 0.85:
            i = rng.randrange(len(digits))
            wrong = int(digits[:i] + rng.choice("0123456789".replace(digits[i], "")) + digits[i + 1 :])
        else:
            if len(digits) < 2 or len(set(digits)) < 2:
                continue
            i = rng.randrange(len(digits) - 1)
            wrong = int(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :])
        if wrong != value and wrong >= 0 and len(str(wrong)) >= len(digits) - 1:
            return wrong


def misremembered(rng: random.Random, value: int, earlier: list[int]) -> int:
    """A wrong value carried forward in place of ``value``: an earlier number of the solution, or a slipped copy."""
    others = [v for v in earlier if v != value]
    if others and rng.random() < 0.4:
        return rng.choice(others)
    return slipped(rng, value)
