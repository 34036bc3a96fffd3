"""Distribution-free risk control: Hoeffding-Bentkus p-values and fixed-sequence testing.

This is the statistics of "Learn then Test" (Angelopoulos, Bates, Candès, Jordan,
Lei, 2021), with the Hoeffding-Bentkus p-value of "Distribution-free, risk-controlling
prediction sets" (Bates, Angelopoulos, Lei, Malik, Jordan, 2021); CALM (Schuster et
al., 2022) calibrates its early-exit thresholds the same way.

Setting: ``n`` i.i.d. losses in [0, 1] with unknown mean (the risk ``R``) and
their observed mean ``r``. For the null hypothesis ``R > alpha`` the p-value is

    p = min( exp(-n * kl(min(r, alpha), alpha)),           (Hoeffding, KL form)
             e * P(Binomial(n, alpha) <= ceil(n * r)) )    (Bentkus)

where ``kl(a, b)`` is the Kullback-Leibler divergence between Bernoulli(a) and
Bernoulli(b). Under the null, ``P(p <= delta) <= delta`` for every ``delta``.
Testing candidates in a fixed order, each at level ``delta``, and stopping at the
first one not rejected bounds the chance of rejecting any true null (the
family-wise error) by ``delta`` too.

Pure Python (``math`` only): the binomial tail is a log-space sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check_level(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name}={value!r} is invalid: it must lie strictly between 0 and 1.")


def _check_sample(mean_loss: float, n: int) -> None:
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n={n!r} is invalid: the number of losses must be an integer >= 1.")
    if not 0.0 <= mean_loss <= 1.0:
        raise ValueError(f"mean_loss={mean_loss!r} is invalid: losses lie in [0, 1], so their mean must too.")


def bernoulli_kl(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b)) in nats, for ``0 <= a <= 1`` and ``0 < b < 1`` (0 log 0 = 0)."""
    total = 0.0
    if a > 0.0:
        total += a * math.log(a / b)
    if a < 1.0:
        total += (1.0 - a) * math.log((1.0 - a) / (1.0 - b))
    return max(total, 0.0)


def binomial_log_pmf(k: int, n: int, p: float) -> float:
    """log P(Binomial(n, p) = k), for ``0 < p < 1`` and ``0 <= k <= n``."""
    return (
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        + k * math.log(p) + (n - k) * math.log1p(-p)
    )


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (stable for large ``n``), for ``0 < p < 1``."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [binomial_log_pmf(j, n, p) for j in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def _successes(mean_loss: float, n: int) -> int:
    """``ceil(n * mean_loss)``, robust to the float error of a mean of ``n`` numbers."""
    return math.ceil(round(n * mean_loss, 9))


def hoeffding_p_value(mean_loss: float, n: int, alpha: float) -> float:
    """p-value of ``R > alpha`` from Hoeffding's inequality (KL form): exp(-n kl(min(r, alpha), alpha))."""
    _check_sample(mean_loss, n)
    _check_level("alpha", alpha)
    return math.exp(-n * bernoulli_kl(min(mean_loss, alpha), alpha))


def bentkus_p_value(mean_loss: float, n: int, alpha: float) -> float:
    """p-value of ``R > alpha`` from Bentkus' inequality: e * P(Binomial(n, alpha) <= ceil(n r)), at most 1."""
    _check_sample(mean_loss, n)
    _check_level("alpha", alpha)
    return min(1.0, math.e * binomial_cdf(_successes(mean_loss, n), n, alpha))


def hoeffding_bentkus_p_value(mean_loss: float, n: int, alpha: float) -> float:
    """The Hoeffding-Bentkus p-value of ``R > alpha``: the smaller of the two bounds.

    ``mean_loss`` is the mean of ``n`` i.i.d. losses in [0, 1]; ``alpha`` the
    largest acceptable risk. Valid for any loss distribution on [0, 1].
    """
    return min(hoeffding_p_value(mean_loss, n, alpha), bentkus_p_value(mean_loss, n, alpha))


def fixed_sequence_rejections(p_values: Sequence[float], delta: float) -> int:
    """How many hypotheses fixed-sequence testing rejects: the length of the leading run
    of p-values ``<= delta``. The order must be fixed before seeing the data (for
    thresholds: from the strictest to the most permissive)."""
    _check_level("delta", delta)
    count = 0
    for p in p_values:
        if p > delta:
            break
        count += 1
    return count
