import math

from turbo_export.metrics import corpus_bleu, strip_special


def test_bleu_identical_is_one_and_disjoint_is_zero():
    assert corpus_bleu([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5]]) == 1.0
    assert corpus_bleu([[6, 7, 8, 9]], [[1, 2, 3, 4]]) == 0.0
    assert corpus_bleu([[]], [[1, 2]]) == 0.0


def test_bleu_known_value():
    # hyp "1 2 3 4 9" vs ref "1 2 3 4 5": precisions 4/5, 3/4, 2/3, 1/2, equal lengths (no brevity penalty)
    expected = math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert math.isclose(corpus_bleu([[1, 2, 3, 4, 9]], [[1, 2, 3, 4, 5]]), expected)


def test_bleu_brevity_penalty_and_clipping():
    short = corpus_bleu([[1, 2, 3, 4]], [[1, 2, 3, 4, 5, 6, 7, 8]])
    assert math.isclose(short, math.exp(1 - 8 / 4))  # all n-grams match; only the brevity penalty remains
    assert corpus_bleu([[1, 1, 1, 1]], [[1, 2, 3, 4]]) < corpus_bleu([[1, 2, 3, 5]], [[1, 2, 3, 4]])


def test_strip_special():
    assert strip_special([510, 7, 8, 102, 0, 0], {510, 102, 0}) == [7, 8]
