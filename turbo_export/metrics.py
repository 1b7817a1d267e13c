"""Agreement metrics between accelerated and unaccelerated outputs (pure Python / numpy): BLEU, CIDEr-D,
top-1 and prediction agreement, cosine statistics, recall@k, and the per-output closeness of two runs."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    max_abs_diff: float
    cosine: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.shape == self.reference_shape and self.max_abs_diff <= self.atol


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))


def compare_outputs(
    names: Sequence[str], actual: Sequence[np.ndarray], reference: Sequence[np.ndarray], atol: float
) -> list[OutputCheck]:
    checks = []
    for name, got, ref in zip(names, actual, reference):
        same_shape = tuple(got.shape) == tuple(ref.shape)
        diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if same_shape else float("inf")
        cos = cosine(got, ref) if same_shape else 0.0
        checks.append(OutputCheck(name, tuple(got.shape), tuple(ref.shape), diff, cos, atol))
    return checks



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


# --------------------------------------------------------------------------------------------------
# Classification, embedding and retrieval parity (numpy)
# --------------------------------------------------------------------------------------------------


def top1(logits_or_pred: "np.ndarray", labels: "np.ndarray") -> float:
    """Fraction of rows whose argmax (or given class, for a 1-D array) equals the label, in [0, 1]."""
    pred = _predictions(logits_or_pred)
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"top1: {pred.shape[0]} predictions for {labels.shape[0]} labels")
    return float((pred == labels).mean()) if len(labels) else 0.0


def agreement(a: "np.ndarray", b: "np.ndarray") -> float:
    """Fraction of rows where two models predict the same class (argmax of logits, or class ids)."""
    return top1(a, _predictions(b))


def _predictions(x: "np.ndarray") -> "np.ndarray":
    x = np.asarray(x)
    return x.argmax(-1) if x.ndim > 1 else x


def rowwise_cosine(a: "np.ndarray", b: "np.ndarray") -> "np.ndarray":
    """Cosine of each row of ``a`` [N, ...] with the same row of ``b``, in float64 (a zero row gives 0)."""
    a64 = np.asarray(a, np.float64).reshape(len(a), -1)
    b64 = np.asarray(b, np.float64).reshape(len(b), -1)
    norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    dots = (a64 * b64).sum(-1)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def cosine_stats(a: "np.ndarray", b: "np.ndarray") -> dict[str, float]:
    """Mean, min, 5th percentile and median of the row-wise cosine of ``a`` to ``b``."""
    cos = rowwise_cosine(a, b)
    return {"mean": float(cos.mean()), "min": float(cos.min()), "p05": float(np.percentile(cos, 5)),
            "median": float(np.median(cos)), "count": int(len(cos))}


def recall_at_k(scores: "np.ndarray", targets: "np.ndarray", k: int) -> float:
    """Fraction of queries (rows of ``scores`` [Q, G]) whose target gallery index is among the k best scores.

    Ties are broken by the lower gallery index (a stable sort), so the answer is deterministic.
    """
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return float((order == np.asarray(targets)[:, None]).any(-1).mean())


def recall_agreement(turbo_scores: "np.ndarray", baseline_scores: "np.ndarray", k: int) -> float:
    """Recall@k of Turbo's ranking when the unaccelerated model's top-1 is taken as the right answer."""
    targets = np.argsort(-np.asarray(baseline_scores), axis=-1, kind="stable")[:, 0]
    return recall_at_k(turbo_scores, targets, k)


# --------------------------------------------------------------------------------------------------
# CIDEr-D (Vedantam et al., CVPR 2015, as in the coco-caption toolkit)
# --------------------------------------------------------------------------------------------------


def _tfidf(counts: Counter, doc_freq: Counter, log_docs: float) -> tuple[dict, float]:
    vec = {g: c * (log_docs - math.log(max(1.0, doc_freq[g]))) for g, c in counts.items()}
    return vec, math.sqrt(sum(v * v for v in vec.values()))


def cider_d(
    hypotheses: Sequence[Sequence[Any]],
    references: Sequence[Sequence[Sequence[Any]]],
    max_n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D of tokenised captions: one hypothesis and a list of references per image.

    Per n-gram order n: tf-idf vectors (term count x (log #images - log document frequency), document
    frequency counted over the images' reference sets), the candidate's counts clipped by the reference's,
    cosine-normalised, times the length penalty exp(-(len_h - len_r)^2 / (2 sigma^2)); averaged over the
    references, over n = 1..max_n, scaled by 10, and averaged over images. A one-image corpus scores 0
    (every idf is log 1 = 0), as in the reference implementation.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"cider_d: {len(hypotheses)} hypotheses for {len(references)} reference sets")
    if not hypotheses:
        return 0.0
    doc_freq: list[Counter] = [Counter() for _ in range(max_n)]
    for refs in references:
        for n in range(1, max_n + 1):
            doc_freq[n - 1].update(set().union(*(_ngrams(list(r), n).keys() for r in refs)) if refs else set())
    log_docs = math.log(float(len(references)))
    total = 0.0
    for hyp, refs in zip(hypotheses, references):
        hyp = list(hyp)
        per_n = []
        for n in range(1, max_n + 1):
            h_vec, h_norm = _tfidf(_ngrams(hyp, n), doc_freq[n - 1], log_docs)
            scores = []
            for ref in refs:
                ref = list(ref)
                r_vec, r_norm = _tfidf(_ngrams(ref, n), doc_freq[n - 1], log_docs)
                dot = sum(min(v, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, v in h_vec.items())
                value = dot / (h_norm * r_norm) if h_norm and r_norm else 0.0
                scores.append(value * math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma ** 2)))
            per_n.append(sum(scores) / len(scores) if scores else 0.0)
        total += 10.0 * sum(per_n) / max_n
    return total / len(hypotheses)


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
