"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", §2.1).

For a problem with n samples of which c pass: pass@k = 1 - C(n - c, k) / C(n, k), computed as a product so large n
does not overflow. The benchmark figure is the mean over problems; k is reported only where every problem has n >= k.
"""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize(correct_by_problem: dict[str, list[bool]], ks=(1, 10, 100)) -> dict[str, float]:
    """{"pass@k": mean over problems} for every k that every problem has enough samples for."""
    counts = [(len(v), sum(v)) for v in correct_by_problem.values()]
    if not counts:
        return {}
    n_min = min(n for n, _ in counts)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks if k <= n_min}
