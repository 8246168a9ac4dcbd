"""Hamming-space k-means (and the Lloyd reference) keep their invariants on batched, masked pixel sets."""

import pytest
import torch

from umtfss.model.prototypes import hamming_kmeans, hash_codes, lloyd_kmeans, random_projection

torch.set_num_threads(1)

CLUSTERERS = {
    "hamming": lambda f, m, k, seed=0: hamming_kmeans(f, m, k, bits=16, iterations=8, seed=seed),
    "lloyd": lambda f, m, k, seed=0: lloyd_kmeans(f, m, k, iterations=8, seed=seed),
}


def random_batch(batch=3, n=120, dim=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, dim, generator=generator)
    mask = torch.rand(batch, n, generator=generator) > 0.4
    return features, mask


@pytest.mark.parametrize("name", sorted(CLUSTERERS))
def test_indices_counts_and_means_are_consistent(name):
    features, mask = random_batch()
    k = 7
    result = CLUSTERERS[name](features, mask, k)
    assert result.assign.shape == mask.shape and result.assign.dtype == torch.long
    assert torch.all(result.assign[~mask] == -1)
    assert torch.all((result.assign[mask] >= 0) & (result.assign[mask] < k))
    assert torch.equal(result.counts.sum(dim=1), mask.sum(dim=1))
    assert torch.equal(result.valid, result.counts > 0)
    for b in range(features.shape[0]):
        for j in range(k):
            members = features[b][result.assign[b] == j]
            assert members.shape[0] == result.counts[b, j]
            if members.shape[0]:
                torch.testing.assert_close(result.prototypes[b, j], members.mean(dim=0))
            else:
                assert torch.all(result.prototypes[b, j] == 0)


@pytest.mark.parametrize("name", sorted(CLUSTERERS))
def test_deterministic_under_a_fixed_seed(name):
    features, mask = random_batch()
    first = CLUSTERERS[name](features, mask, 6, seed=3)
    second = CLUSTERERS[name](features.clone(), mask.clone(), 6, seed=3)
    assert torch.equal(first.assign, second.assign)
    assert torch.equal(first.prototypes, second.prototypes)


@pytest.mark.parametrize("name", sorted(CLUSTERERS))
def test_batched_equals_one_by_one(name):
    features, mask = random_batch(batch=4)
    batched = CLUSTERERS[name](features, mask, 9)
    for b in range(features.shape[0]):
        single = CLUSTERERS[name](features[b : b + 1], mask[b : b + 1], 9)
        assert torch.equal(single.assign[0], batched.assign[b])
        torch.testing.assert_close(single.prototypes[0], batched.prototypes[b])


@pytest.mark.parametrize("name", sorted(CLUSTERERS))
def test_fewer_pixels_than_k_gives_one_prototype_per_pixel(name):
    features, _ = random_batch(batch=2, n=40)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, [3, 9, 17]] = True  # 3 pixels, k = 5
    mask[1, :30] = True  # enough pixels: ordinary clustering
    result = CLUSTERERS[name](features, mask, 5)
    assert result.assign[0, [3, 9, 17]].tolist() == [0, 1, 2]
    assert result.valid[0].tolist() == [True, True, True, False, False]
    assert torch.equal(result.prototypes[0, :3], features[0, [3, 9, 17]])  # exact, not approximately
    assert result.counts[1].sum() == 30


@pytest.mark.parametrize("name", sorted(CLUSTERERS))
def test_empty_mask_gives_only_empty_prototypes(name):
    features, mask = random_batch(batch=2)
    mask[1] = False
    result = CLUSTERERS[name](features, mask, 4)
    assert not result.valid[1].any()
    assert torch.all(result.assign[1] == -1)
    assert torch.all(result.prototypes[1] == 0)
    assert result.valid[0].any()


def test_hamming_clusters_are_pure_on_separated_groups():
    """Tight, well-separated groups: no Hamming cluster mixes two groups (for several seeds)."""
    generator = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(4, 32, generator=generator), dim=1)
    truth = torch.arange(4).repeat_interleave(50)
    features = centres[truth] + 0.05 * torch.randn(200, 32, generator=generator)
    mask = torch.ones(1, 200, dtype=torch.bool)
    for seed in range(4):
        result = hamming_kmeans(features[None], mask, 16, bits=32, iterations=10, seed=seed)
        for j in result.assign[0].unique():
            assert truth[result.assign[0] == j].unique().numel() == 1, f"seed {seed}: cluster {j} mixes groups"


def test_hash_codes_match_hamming_distance_identity():
    features, _ = random_batch(batch=1, n=10, dim=8)
    codes = hash_codes(features, random_projection(8, 12, seed=0))
    bits = (codes > 0).float()
    hamming = (bits[0][:, None, :] != bits[0][None, :, :]).sum(dim=2).float()
    assert torch.equal(codes[0] @ codes[0].T, 12 - 2 * hamming)


def test_hash_with_a_bias_row_and_per_sample_projections():
    features, mask = random_batch(batch=2, n=10, dim=8)
    projection = random_projection(9, 12, seed=1)  # the last row is the bias (the reference's hash_bias)
    expected = torch.where(features @ projection[:8] + projection[8] > 0, 1.0, -1.0)
    assert torch.equal(hash_codes(features, projection), expected)
    assert not torch.equal(hash_codes(features, projection[:8]), expected)  # the bias moves bits
    own = torch.stack([projection, random_projection(9, 12, seed=2)])  # one projection per sample
    codes = hash_codes(features, own)
    assert torch.equal(codes[0], expected[0]) and torch.equal(codes[1], hash_codes(features[1:], own[1])[0])
    assert hamming_kmeans(features, mask, 3, bits=12, projection=own).assign.shape == mask.shape
    with pytest.raises(ValueError, match="7 rows, expected feature dim 8"):
        hamming_kmeans(features, mask, 3, projection=random_projection(7, 12))


def test_bad_inputs_raise_clear_errors():
    features, mask = random_batch()
    with pytest.raises(ValueError, match="mask must be a bool"):
        hamming_kmeans(features, mask.float(), 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        hamming_kmeans(features, mask, 0)
    with pytest.raises(ValueError, match="features must be"):
        hamming_kmeans(features[0], mask[0], 4)


def test_per_sample_limit_equals_separate_calls():
    """fg and bg sets clustered in one call with their own cluster counts give the separate results."""
    features, mask = random_batch(batch=2, n=150)
    joint = hamming_kmeans(features, mask, 9, bits=16, iterations=8, limit=torch.tensor([4, 9]))
    for b, k in ((0, 4), (1, 9)):
        alone = hamming_kmeans(features[b : b + 1], mask[b : b + 1], k, bits=16, iterations=8)
        assert torch.equal(joint.assign[b], alone.assign[0])
        torch.testing.assert_close(joint.prototypes[b, :k], alone.prototypes[0])
    assert not joint.valid[0, 4:].any()
    with pytest.raises(ValueError, match="limit"):
        hamming_kmeans(features, mask, 3, limit=torch.tensor([4, 2]))


def test_cluster_means_of_a_large_cluster_stay_finite_in_float16():
    """Under float16 autocast (training.amp on a GPU without bf16) a cluster's sum passes 65,504; the mean must not."""
    from umtfss.model.prototypes import cluster_means

    features = torch.zeros(1, 15000, 3)
    features[..., 0] = 4.5  # sum 67,500
    assign = torch.zeros(1, 15000, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.float16):
        clusters = cluster_means(features, assign, 2)
    assert torch.isfinite(clusters.prototypes).all()
    torch.testing.assert_close(clusters.prototypes[0, 0].float(), torch.tensor([4.5, 0.0, 0.0]))
    assert clusters.counts.tolist() == [[15000, 0]]


def test_hash_codes_under_autocast_equal_the_float32_codes():
    """Projections near 0 change sign when autocast rounds the matmul to bfloat16."""
    features, _ = random_batch(batch=2, n=2000, dim=64)
    projection = random_projection(64, 32, seed=1)
    expected = hash_codes(features, projection)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(hash_codes(features, projection), expected)
