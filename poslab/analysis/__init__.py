"""Why an encoding generalizes: what a trained model attends to, and what its layers know.

- :func:`attention_weights`: the attention probabilities each layer used, ``(B, H, T, T)``,
  for every encoding, id scheme and attention shaping (:mod:`poslab.analysis.weights`);
- :func:`hidden_states`: the residual stream after the input and after each layer;
- measures over them (:mod:`poslab.analysis.measures`): attended-distance distributions,
  the divergence between two models' attention on the same inputs, a linear probe of the
  position index, RoPE's use of each frequency band, where the first wrong token falls;
- :func:`mean_reciprocal_rank`: the cross-task ranking of Kazemnejad et al. 2023.
"""

from poslab.analysis.measures import (
    attention_divergence,
    distance_histogram,
    first_error_positions,
    mean_attended_distance,
    position_probe,
    rope_band_usage,
)
from poslab.analysis.ranking import mean_reciprocal_rank
from poslab.analysis.weights import attention_weights, hidden_states

__all__ = [
    "attention_weights",
    "hidden_states",
    "distance_histogram",
    "mean_attended_distance",
    "attention_divergence",
    "position_probe",
    "rope_band_usage",
    "first_error_positions",
    "mean_reciprocal_rank",
]
