"""The KV cache: appending, eviction by a window policy, and the ids it remembers."""

import pytest
import torch

from poslab.cache import KVCache, keep_in_cache


def test_eviction_drops_the_keys_no_later_query_sees_in_every_layer():
    cache = KVCache(num_layers=2)
    k = torch.arange(10.0).view(1, 1, 10, 1)
    for layer in range(2):
        cache.update(layer, k, k)
    cache.advance(torch.arange(10)[None], torch.arange(10), 10, contiguous=True)
    assert cache.length == 10
    assert cache.evict((4, 2))  # window 4, sinks 2: keys 0, 1 and 7, 8, 9 stay for query 10
    assert cache.indices.tolist() == [0, 1, 7, 8, 9] and cache.positions.tolist() == [[0, 1, 7, 8, 9]]
    for layer in range(2):
        keys, _ = cache.update(layer, torch.full((1, 1, 1, 1), 10.0), torch.zeros(1, 1, 1, 1))
        assert keys.flatten().tolist() == [0, 1, 7, 8, 9, 10]
    assert not cache.evict(None) and cache.keep is None


def test_key_positions_append_and_refuse_a_different_id_shape():
    cache = KVCache(num_layers=1)
    assert torch.equal(cache.key_positions(torch.arange(3)[None]), torch.arange(3)[None])
    cache.advance(torch.arange(3)[None], torch.arange(3), 3, contiguous=True)
    assert cache.key_positions(torch.tensor([[3, 4]]).expand(2, 2)).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert cache.key_indices(torch.tensor([3])).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="do not match the cached ids"):
        cache.key_positions(torch.zeros(1, 2, 2))


def test_keep_in_cache_keeps_sinks_and_the_window():
    assert keep_in_cache(torch.arange(8), 8, window=3, sinks=1).int().tolist() == [1, 0, 0, 0, 0, 0, 1, 1]
