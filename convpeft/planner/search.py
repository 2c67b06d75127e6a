"""The batch search: the largest batch whose peak fits a budget, in few evaluations.

:func:`largest_fitting` only assumes the peak never falls as the batch grows (true of every
update: each per-sample tensor grows with the batch, the rest does not change). It evaluates
``min_batch`` first (the answer is 0 if even that does not fit), then grows the batch until one
does not fit (secant extrapolation through the last two evaluations, at least doubling once a
guess fell short), then narrows the bracket with the secant through its ends, bisecting
whenever that does not halve it. The peak is affine in the batch once activations dominate, so
this usually needs 4-6 evaluations (O(log max_batch) at worst); each batch is evaluated once,
since one evaluation is one analytic profile. The answer is exact for the peak it is given: the
planned batch fits and the next one was evaluated and does not (unless the search stopped at
``max_batch``).
"""

from __future__ import annotations

from collections.abc import Callable


def largest_fitting(peak: Callable[[int], int], budget: int, max_batch: int,
                    min_batch: int = 1) -> tuple[int, dict[int, int]]:
    """The largest ``n`` in ``min_batch..max_batch`` with ``peak(n) <= budget`` (0 if not even
    ``min_batch``), and every ``{n: peak(n)}`` evaluated. ``peak`` must be non-decreasing.

    Exact: unless the answer is 0 or ``max_batch``, ``answer + 1`` was evaluated and exceeds the
    budget. See the module docstring for the order of evaluations.
    """
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"max_batch must be >= min_batch >= 1 (got max_batch {max_batch}, "
                         f"min_batch {min_batch})")
    seen: dict[int, int] = {}

    def f(n: int) -> int:
        if n not in seen:
            seen[n] = int(peak(n))
        return seen[n]

    if f(min_batch) > budget:
        return 0, seen
    lo, hi = min_batch, None  # invariant: f(lo) <= budget < f(hi)
    prev = None  # the fitting batch evaluated before lo (unbracketed growth)
    undershot = False
    while hi is None:
        if lo >= max_batch:
            return lo, seen
        if prev is None or f(lo) <= f(prev):
            # nothing to extrapolate from (or flat so far): the next batch, then doubling
            guess = lo + 1 if prev is None else 2 * lo
        else:
            # secant through (prev, lo), one past its last fitting batch
            guess = lo + (budget - f(lo)) * (lo - prev) // (f(lo) - f(prev)) + 1
        if undershot:
            guess = max(guess, 2 * lo)
        guess = min(max(guess, lo + 1), max_batch)
        if f(guess) <= budget:
            prev, lo, undershot = lo, guess, prev is not None
        else:
            hi = guess
    bisect = False
    while hi - lo > 1:
        width = hi - lo
        if bisect:
            guess = (lo + hi) // 2
        else:  # the last batch the chord from lo to hi keeps within the budget
            guess = lo + (budget - f(lo)) * (hi - lo) // max(f(hi) - f(lo), 1)
            guess = min(max(guess, lo + 1), hi - 1)
        if f(guess) <= budget:
            lo = guess
        else:
            hi = guess
        bisect = not bisect and (hi - lo) * 2 > width
    return lo, seen
