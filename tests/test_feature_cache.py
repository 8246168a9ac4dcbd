"""FeatureCache: the frozen backbone runs once per image id, within a memory bound, least recently used dropped."""

import pytest
import torch

from umtfss.evaluation.feature_cache import MB, FeatureCache


class CountingBackbone(torch.nn.Module):
    """Two layers of a fixed conv; counts the images it is run on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        low = self.conv(x)
        return {"low": low, "high": low.mean(1, keepdim=True), "unused": low * 2}


def _images(n, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))


def test_each_image_id_runs_the_backbone_once():
    backbone, images = CountingBackbone(), _images(3)
    cache = FeatureCache(1, ["low", "high"])
    ids = ["a", "b", "a"]  # 'a' twice in one batch
    with torch.no_grad():
        direct = backbone(images[[0, 1, 0]])
    backbone.images = 0
    got = cache.features(backbone, images[[0, 1, 0]], ids)
    assert backbone.images == 2 and sorted(got) == ["high", "low"]  # only the layers asked for are kept
    for name in ("low", "high"):
        torch.testing.assert_close(got[name], direct[name], rtol=0, atol=1e-6)
    again = cache.features(backbone, images[[1, 2]], ["b", "c"])
    assert backbone.images == 3  # 'b' came from the cache, only 'c' ran
    torch.testing.assert_close(again["low"][0], direct["low"][1], rtol=0, atol=1e-6)
    assert (cache.hits, cache.misses, len(cache)) == (2, 3, 3)
    assert cache.summary().startswith("feature cache: 2 of 5 image forwards reused (40 %), 3 images kept")
    assert "did not stay" not in cache.summary()  # all of them fit


def test_the_memory_bound_drops_the_least_recently_used():
    backbone, images = CountingBackbone(), _images(4)
    entry = (4 + 1) * 8 * 8 * 4  # bytes of one image's two layers, float32
    cache = FeatureCache(2 * entry / MB, ["low", "high"])  # room for two images
    cache.features(backbone, images[:2], ["a", "b"])
    cache.features(backbone, images[:1], ["a"])  # 'a' used last: 'b' goes first
    cache.features(backbone, images[2:3], ["c"])
    assert len(cache) == 2 and cache.bytes == 2 * entry <= cache.max_bytes
    backbone.images = 0
    cache.features(backbone, images[:3], ["a", "b", "c"])
    assert backbone.images == 1  # only 'b' was dropped
    assert cache.peak_bytes == 2 * entry and cache.dropped == 2  # 'b', then 'a' for 'b' again
    assert cache.summary().endswith("1 of 3 images did not stay, evaluation.feature_cache_mb 1 would keep them all")


def test_a_zero_bound_keeps_nothing_and_a_negative_one_is_refused():
    backbone, images = CountingBackbone(), _images(2)
    cache = FeatureCache(0, ["low"])
    cache.features(backbone, images, ["a", "b"])
    cache.features(backbone, images, ["a", "b"])
    assert backbone.images == 4 and len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="evaluation.feature_cache_mb"):
        FeatureCache(-1, ["low"])


def test_errors_name_the_problem():
    backbone, images = CountingBackbone(), _images(2)
    with pytest.raises(ValueError, match="1 image ids for 2 images"):
        FeatureCache(1, ["low"]).features(backbone, images, ["a"])
    with pytest.raises(ValueError, match="not the requested \\['missing'\\]"):
        FeatureCache(1, ["missing"]).features(backbone, images, ["a", "b"])
