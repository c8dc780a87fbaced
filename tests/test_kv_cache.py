"""GrowingCache: the same attention inputs and logits as transformers' DynamicCache, across buffer growth and
after the engine replaces the cached rows; decode steps write in place instead of reallocating."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from experts.kv_cache import GrowingCache, GrowingLayer


def _step(model, ids, mask, cache):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


@torch.no_grad()
def test_matches_dynamic_cache_across_growth(backbone):
    model = backbone.model.eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    caches = {"dynamic": DynamicCache(), "growing": GrowingCache(chunk=4)}
    logits = {name: _step(model, ids, mask, cache) for name, cache in caches.items()}
    torch.testing.assert_close(logits["growing"], logits["dynamic"])
    for _ in range(11):  # crosses the 4-position chunk boundary several times
        token = logits["dynamic"].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
        logits = {name: _step(model, token, mask, cache) for name, cache in caches.items()}
        torch.testing.assert_close(logits["growing"], logits["dynamic"])
    layer = caches["growing"].layers[0]
    assert isinstance(layer, GrowingLayer)
    assert layer.keys.shape == caches["dynamic"].layers[0].keys.shape
    assert layer._key_buffer.shape[-2] % 4 == 0 and layer._key_buffer.shape[-2] >= layer.keys.shape[-2]


@torch.no_grad()
def test_decode_writes_in_place_until_full(backbone):
    cache = GrowingCache(chunk=16)
    model = backbone.model.eval()
    ids = torch.randint(3, 100, (2, 5))
    mask = torch.ones_like(ids)
    _step(model, ids, mask, cache)
    buffer = cache.layers[0]._key_buffer
    for _ in range(10):  # 5 + 10 positions fit in one 16-position buffer
        mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
        _step(model, torch.randint(3, 100, (2, 1)), mask, cache)
        assert cache.layers[0]._key_buffer is buffer
        assert cache.layers[0].keys.data_ptr() == buffer.data_ptr()
    mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
    _step(model, torch.randint(3, 100, (2, 1)), mask, cache)  # the 16th position fits, the 17th grows
    mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
    _step(model, torch.randint(3, 100, (2, 1)), mask, cache)
    assert cache.layers[0]._key_buffer is not buffer
    assert cache.get_seq_length() == 17


@pytest.mark.parametrize("keep", [[0, 2], [1]])
@torch.no_grad()
def test_assign_after_dropping_rows(backbone, keep):
    """The engine drops finished rows by assigning selected states; decoding then continues as DynamicCache's
    batch_select_indices would."""
    model = backbone.model.eval()
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (3, 7))
    mask = torch.ones_like(ids)
    dynamic, growing = DynamicCache(), GrowingCache(chunk=8)
    _step(model, ids, mask, dynamic)
    _step(model, ids, mask, growing)
    index = torch.tensor(keep)
    dynamic.batch_select_indices(index)
    for layer in growing.layers:
        layer.assign(layer.keys.index_select(0, index), layer.values.index_select(0, index))
    mask = mask.index_select(0, index)
    token = torch.randint(3, 100, (len(keep), 1))
    for _ in range(3):
        mask = torch.cat([mask, mask.new_ones((len(keep), 1))], dim=1)
        torch.testing.assert_close(_step(model, token, mask, growing), _step(model, token, mask, dynamic))
