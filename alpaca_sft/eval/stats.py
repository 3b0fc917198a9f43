"""How sure a rate is, and whether two models differ by more than chance on the same prompts.

A rate gets its 95% Wilson score interval, which stays inside [0, 1] and is honest at 0 or 100% and on a
few prompts, where the normal approximation is not. Two models answer the same prompts, so their
yes/no outcomes (stopped by EOS, exact match, SQL runs, SQL result) are paired: McNemar's exact test
compares them on the discordant prompts alone (one model yes, the other no), whose split is
Binomial(b + c, 1/2) if the models do equally well. It is exact at any count and needs no resampling
(a paired bootstrap would, and is the tool for a non-binary number such as mean new tokens, which is not
tested). Each p-value is for its own comparison: with many rows, some fall under 0.05 by chance.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the normal distribution's 97.5% quantile


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of successes/trials; None without trials."""
    if trials == 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of McNemar's exact test: only_a prompts where the first model alone succeeds,
    only_b where the second alone does."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**discordant)
