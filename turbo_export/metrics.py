"""Agreement metrics between accelerated and unaccelerated outputs (pure Python / numpy)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def _ngrams(tokens: Sequence[int], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[Sequence[int]], references: Sequence[Sequence[int]], max_n: int = 4) -> float:
    """Corpus BLEU-`max_n` (Papineni et al.) of token sequences against one reference each, in [0, 1].

    Clipped n-gram precisions are summed over the corpus; a precision with no match is smoothed by adding
    one to numerator and denominator (Lin & Och's smoothing for n > 1), so short captions do not give 0.
    """
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0:
        return 0.0
    log_precision = 0.0
    for n in range(max_n):
        if totals[n] == 0:
            return 0.0
        m, t = (matches[n], totals[n]) if (matches[n] or n == 0) else (1, totals[n] + 1)
        if m == 0:
            return 0.0
        log_precision += math.log(m / t) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def strip_special(row: Sequence[int], special: set[int]) -> list[int]:
    return [int(t) for t in row if int(t) not in special]
