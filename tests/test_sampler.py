"""Meta-test episode sampling: determinism under the seed and the episode invariants."""

import numpy as np
import pandas as pd
import pytest

from umtfss.evaluation.sampler import sample_episodes, sample_episodes_per_seed


def _image_classes():
    """12 val images; class 1 in images 0-7, class 2 in 4-11, class 3 in 0-2 (fold of 1 and 2), plus train rows."""
    rows = []
    for i in range(12):
        image = f"img{i:02d}"
        rows.append((image, "val", 1, 5000 if i < 8 else 10, i < 8))
        rows.append((image, "val", 2, 3000 if i >= 4 else 0, i >= 4))
        rows.append((image, "val", 3, 4000, i < 3))
        rows.append((f"train{i}", "train", 1, 9999, True))
    return pd.DataFrame(rows, columns=["image_id", "split", "class_id", "pixels", "present"])


SCHEMES = pytest.mark.parametrize("scheme", ["image_walk", "class_uniform"])


@SCHEMES
def test_same_seed_same_episodes_and_row_order_does_not_matter(scheme):
    table = _image_classes()
    first = sample_episodes(table, [1, 2], shots=2, episodes=50, seed=321, scheme=scheme)
    shuffled = table.sample(frac=1.0, random_state=7).reset_index(drop=True)
    again = sample_episodes(shuffled, [2, 1], shots=2, episodes=50, seed=321, scheme=scheme)
    pd.testing.assert_frame_equal(first, again)
    assert list(first.columns) == ["episode", "class_id", "query_id", "support_ids"]
    assert list(first["episode"]) == list(range(50))


@SCHEMES
def test_different_seed_differs(scheme):
    table = _image_classes()
    a = sample_episodes(table, [1, 2], shots=1, episodes=50, seed=1, scheme=scheme)
    b = sample_episodes(table, [1, 2], shots=1, episodes=50, seed=2, scheme=scheme)
    assert not a.equals(b)


def test_class_uniform_invariants():
    table = _image_classes()
    present = {(r.image_id, r.class_id) for r in table.itertuples() if r.present and r.split == "val"}
    episodes = sample_episodes(table, [1, 2], shots=5, episodes=200, seed=0, scheme="class_uniform")
    for row in episodes.itertuples():
        assert row.class_id in (1, 2)
        assert len(row.support_ids) == 5
        assert len(set(row.support_ids)) == 5
        assert row.query_id not in row.support_ids
        for image in [row.query_id, *row.support_ids]:
            assert (image, row.class_id) in present
            assert not image.startswith("train")
    # both classes drawn, roughly uniformly; every image of a class eventually serves as query
    counts = episodes["class_id"].value_counts()
    assert set(counts.index) == {1, 2} and min(counts) > 60
    assert set(episodes.loc[episodes["class_id"] == 1, "query_id"]) == {f"img{i:02d}" for i in range(8)}


def test_image_walk_follows_the_reference_test_code():
    """Query e = image e of the test images holding a fold class; its class any fold class with a pixel
    in it (a 10-pixel object too); supports where the class is present, never the query."""
    table = _image_classes()
    present = {(r.image_id, r.class_id) for r in table.itertuples() if r.present and r.split == "val"}
    touched = {(r.image_id, r.class_id) for r in table.itertuples() if r.pixels > 0 and r.split == "val"}
    episodes = sample_episodes(table, [1, 2], shots=5, episodes=240, seed=0)  # the default scheme
    images = [f"img{i:02d}" for i in range(12)]
    walk = list(episodes["query_id"][:12])
    assert sorted(walk) == images and list(episodes["query_id"]) == walk * 20  # each image once per round
    other = list(sample_episodes(table, [1, 2], shots=5, episodes=12, seed=1)["query_id"])
    assert sorted(other) == images and other != walk  # the order is a random sample per seed
    for row in episodes.itertuples():
        assert (row.query_id, row.class_id) in touched
        assert len(set(row.support_ids)) == 5 and row.query_id not in row.support_ids
        assert all((s, row.class_id) in present for s in row.support_ids)
    # img08-11 hold class 1 with 10 pixels (not 'present'): still a query of class 1 sometimes
    tiny = episodes[episodes["query_id"].isin(images[8:]) & (episodes["class_id"] == 1)]
    assert len(tiny) > 10
    # img00-03 hold only class 1: always class 1; classes follow the images, not uniform
    assert set(episodes.loc[episodes["query_id"].isin(images[:4]), "class_id"]) == {1}
    with pytest.raises(ValueError, match="evaluation.sampling"):
        sample_episodes(table, [1, 2], 1, 3, 0, scheme="hsnet")


@SCHEMES
def test_prefix_stable_and_shots_nested(scheme):
    table = _image_classes()
    one = sample_episodes(table, [1, 2], shots=1, episodes=30, seed=5, scheme=scheme)
    five = sample_episodes(table, [1, 2], shots=5, episodes=60, seed=5, scheme=scheme)
    assert list(one["class_id"]) == list(five["class_id"][:30])
    assert list(one["query_id"]) == list(five["query_id"][:30])
    assert [s[0] for s in one["support_ids"]] == [s[0] for s in five["support_ids"][:30]]


@SCHEMES
def test_too_few_images_is_a_clear_error(scheme):
    table = _image_classes()
    with pytest.raises(ValueError, match="class 3: 3"):
        sample_episodes(table, [1, 3], shots=3, episodes=5, seed=0, scheme=scheme)
    with pytest.raises(ValueError, match="class 9: 0"):
        sample_episodes(table, [9], shots=1, episodes=5, seed=0, scheme=scheme)
    # 3 images allow a 2-shot episode (query + 2 supports)
    assert len(sample_episodes(table, [3], shots=2, episodes=5, seed=0, scheme=scheme)) == 5


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="present"):
        sample_episodes(_image_classes().drop(columns="present"), [1], 1, 3, 0)


def test_one_table_per_seed():
    tables = sample_episodes_per_seed(_image_classes(), [1, 2], 1, 10, seeds=[3, 4])
    assert sorted(tables) == [3, 4]
    pd.testing.assert_frame_equal(tables[3], sample_episodes(_image_classes(), [1, 2], 1, 10, 3))
    assert np.all(tables[3]["episode"].to_numpy() == np.arange(10))
