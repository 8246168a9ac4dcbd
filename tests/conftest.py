"""Shared pytest fixtures; each helper keeps its fixtures in its own marked block."""

import pytest

# ---- data sets (owner: data-sets helper; generators in tests/fakes.py) ---------------------------


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory):
    """A small PASCAL VOC2012-like tree (8 train, 4 val images of 64x64); treat as read-only."""
    from fakes import make_voc_tree

    return make_voc_tree(tmp_path_factory.mktemp("voc") / "VOC2012", n_train=8, n_val=4, size=64, seed=0)


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory):
    """A small COCO2014-like tree (8 train, 4 val images of 64x64); treat as read-only."""
    from fakes import make_coco_tree

    return make_coco_tree(tmp_path_factory.mktemp("coco") / "coco", n_train=8, n_val=4, size=64, seed=0)

# ---- end of data sets block ----------------------------------------------------------------------
