import pytest

from poslab.analysis import mean_reciprocal_rank


def test_mrr_on_a_hand_made_table():
    scores = {
        "copy": {"nope": 0.9, "t5": 0.8, "alibi": 0.1},
        "reverse": {"nope": 0.5, "t5": 0.7, "alibi": 0.2},
        "sort": {"nope": 0.3, "t5": 0.3, "alibi": 0.4},  # a tie shares rank 2
    }
    mrr = mean_reciprocal_rank(scores)
    assert mrr["nope"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert mrr["t5"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert mrr["alibi"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert list(mrr) == ["nope", "t5", "alibi"] or list(mrr) == ["t5", "nope", "alibi"]


def test_a_task_an_encoding_missed_counts_zero_and_lower_can_be_better():
    mrr = mean_reciprocal_rank({"a": {"x": 1.0, "y": 2.0}, "b": {"x": 1.0}})
    assert mrr == {"x": pytest.approx((1 / 2 + 1) / 2), "y": pytest.approx(1 / 2)}
    assert mean_reciprocal_rank({"a": {"x": 1.0, "y": 2.0}}, higher_is_better=False)["x"] == 1.0
    with pytest.raises(ValueError, match="no tasks"):
        mean_reciprocal_rank({})
