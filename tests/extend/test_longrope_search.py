import pytest

from poslab.extend.longrope_search import Candidate, initial_factors, scaling_dict, search


def _toy(target):
    def fitness(c: Candidate) -> float:
        return sum((a - b) ** 2 for a, b in zip(c.factors, target)) + 0.01 * c.n_hat

    return fitness


def test_initial_population_holds_pi_ntk_and_yarn():
    init = initial_factors(16, 10000.0, 128, 4.0)
    assert init["pi"] == pytest.approx((4.0,) * 8)
    assert init["ntk"][0] == pytest.approx(1.0) and init["ntk"][-1] == pytest.approx(4.0)
    assert init["yarn"][0] == pytest.approx(1.0) and max(init["yarn"]) <= 4.0 + 1e-6
    for vector in init.values():
        assert all(a <= b + 1e-9 for a, b in zip(vector, vector[1:]))  # monotone, as the search requires


def test_search_never_worsens_and_respects_the_constraints():
    target = tuple(1.0 + 0.35 * i for i in range(8))  # monotone, inside [1, 1.25 s]
    result = search(_toy(target), head_dim=16, base=10000.0, train_length=128, scale=4.0, population=12,
                    mutations=8, crossovers=8, iterations=15, parents=6, seed=1)  # fmt: skip
    assert all(b <= a for a, b in zip(result.history, result.history[1:]))  # top-1 never worsens
    assert result.history[-1] < result.history[0]
    best = result.best.factors
    assert all(1.0 <= f <= 5.0 for f in best) and all(a <= b for a, b in zip(best, best[1:]))
    assert all(abs(f * 100 - round(f * 100)) < 1e-6 for f in best)  # on the 0.01 grid
    again = search(_toy(target), head_dim=16, base=10000.0, train_length=128, scale=4.0, population=12,
                   mutations=8, crossovers=8, iterations=15, parents=6, seed=1)  # fmt: skip
    assert again.best == result.best and again.history == result.history  # seeded


def test_scaling_dict_is_a_longrope_dict_and_bad_input_is_named():
    d = scaling_dict(Candidate((1.0, 2.0)), 128, 4.0)
    assert d == {"rope_type": "longrope", "long_factor": [1.0, 2.0], "short_factor": [1.0, 1.0],
                 "original_max_position_embeddings": 128, "factor": 4.0}  # fmt: skip
    with pytest.raises(ValueError, match="population=1 must be an integer >= 2"):
        search(_toy((1.0,) * 8), head_dim=16, base=1e4, train_length=128, scale=4.0, population=1)
    with pytest.raises(ValueError, match="scale=1.0 must be > 1"):
        search(_toy((1.0,) * 8), head_dim=16, base=1e4, train_length=128, scale=1.0)
