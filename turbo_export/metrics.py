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


def psnr(a, b, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of ``b`` against ``a`` (inf when equal).

    data_range: the span of possible values (255 for uint8 images); None = max(a) - min(a) of the reference.
    """
    import numpy as np

    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((a64 - b64) ** 2))
    if data_range is None:
        data_range = float(a64.max() - a64.min())
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_filter(x, sigma: float, radius: int):
    """Separable Gaussian filter over the first two axes, 'valid' region only."""
    import numpy as np

    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    size = 2 * radius + 1
    out = sum(kernel[i] * x[i:x.shape[0] - size + 1 + i] for i in range(size))
    return sum(kernel[i] * out[:, i:x.shape[1] - size + 1 + i] for i in range(size))


def ssim(a, b, data_range: float | None = None, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window (sigma 1.5, radius 3.5 sigma, K1 0.01,
    K2 0.03, population (not sample) covariances, as in the paper), averaged over the region where the window
    fits and over channels: skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``.

    a, b: [H, W] or [H, W, C].
    data_range: None = max(a) - min(a) of the reference.
    """
    import numpy as np

    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a64.shape != b64.shape:
        raise ValueError(f"ssim: shapes differ: {a64.shape} vs {b64.shape}")
    if a64.ndim == 2:
        a64, b64 = a64[..., None], b64[..., None]
    if data_range is None:
        data_range = float(a64.max() - a64.min()) or 1.0
    radius = int(3.5 * sigma + 0.5)
    if min(a64.shape[:2]) < 2 * radius + 1:
        raise ValueError(f"ssim: images of {a64.shape[:2]} are smaller than the {2 * radius + 1}-pixel window")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a64, sigma, radius), _gaussian_filter(b64, sigma, radius)
    var_a = _gaussian_filter(a64 * a64, sigma, radius) - mu_a**2
    var_b = _gaussian_filter(b64 * b64, sigma, radius) - mu_b**2
    cov = _gaussian_filter(a64 * b64, sigma, radius) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
