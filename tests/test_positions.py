import pytest
import torch

from poslab import positions


def test_contiguous_ids():
    ids = positions.contiguous(3, 5, offset=7)
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    assert ids[2].tolist() == [7, 8, 9, 10, 11]


def test_scheme_registry_lists_names():
    assert positions.scheme("contiguous") is positions.contiguous
    with pytest.raises(ValueError, match="valid schemes: contiguous"):
        positions.scheme("random")
