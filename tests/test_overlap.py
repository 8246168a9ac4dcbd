"""Test images found in the unlabeled folder: the same file, a link, a hard link or a byte-identical copy."""

import os
import shutil

import pytest

from umtfss.config import load
from umtfss.data.overlap import HEAD_BYTES, check_test_images_unseen, shared_images


def test_same_images_are_found_by_file_or_by_bytes(tmp_path):
    test, folder = tmp_path / "test", tmp_path / "folder"
    test.mkdir(), folder.mkdir()
    names = ["copy", "link", "hard", "alone", "same_size", "same_head"]
    for i, name in enumerate(names):
        (test / f"{name}.png").write_bytes(bytes([i]) * (HEAD_BYTES + 10 + i))
    shutil.copy(test / "copy.png", folder / "copied.png")
    os.symlink(test / "link.png", folder / "linked.png")
    os.link(test / "hard.png", folder / "hard.png")
    (folder / "other_size.png").write_bytes(bytes([3]) * 7)  # alone's bytes, but another size
    (folder / "same_size.png").write_bytes(bytes([99]) * (HEAD_BYTES + 14))  # same size, other bytes
    head = (test / "same_head.png").read_bytes()
    (folder / "same_head.png").write_bytes(head[:-1] + b"\xff")  # same size and first 64 KiB, last byte differs
    pairs = shared_images(sorted(test.iterdir()), sorted(folder.iterdir()))
    assert {(a.name, b.name) for a, b in pairs} == {("copy.png", "copied.png"), ("link.png", "linked.png"),
                                                   ("hard.png", "hard.png")}


def test_a_folder_holding_test_images_is_refused(tmp_path):
    from fakes import make_custom_tree

    root = make_custom_tree(tmp_path / "mine", n_train=4, n_val=4)
    folder = tmp_path / "unlabeled"
    shutil.copytree(root / "images" / "a", folder)  # a/img00, a/img02 (train), a/img04, a/img06 (val)
    custom = {"root": str(root), "classes": ["cat", "dog", "car", "tree"]}
    config = load({"unlabeled": {"source": "folder", "folder": str(folder)}, "datasets": {"custom": custom}})
    with pytest.raises(ValueError, match=r"2 of the 4 test images of custom \(datasets.custom.val_list\) are also in "
                                         r"unlabeled.folder .*img04.png.*set unlabeled.source to custom"):
        check_test_images_unseen(config, "custom")
    # a benchmark source builds its tasks from its train split: no folder to look into
    check_test_images_unseen({**config, "unlabeled": {**config["unlabeled"], "source": "custom"}}, "custom")
    for name in ("img04.png", "img06.png"):
        (folder / name).unlink()
    check_test_images_unseen(config, "custom")  # train images may be unlabeled images too


def test_a_passed_check_is_not_repeated_until_a_file_changes(tmp_path, monkeypatch):
    """The memo records both file sets once they passed: the next start compares nothing, unless an image
    of the folder or of the test set was added, removed or rewritten."""
    from fakes import make_custom_tree

    from umtfss.data import overlap

    root = make_custom_tree(tmp_path / "mine", n_train=4, n_val=4)
    folder = tmp_path / "unlabeled"
    shutil.copytree(root / "images" / "b", folder)  # b/img01, b/img03 (train) and b/img05, b/img07 (val)
    for name in ("img05.png", "img07.png"):
        (folder / name).unlink()
    config = load({"unlabeled": {"source": "folder", "folder": str(folder)},
                   "datasets": {"custom": {"root": str(root), "classes": ["cat", "dog", "car", "tree"]}}})
    memo = tmp_path / "memo" / "custom.txt"
    calls = []
    compare = overlap.shared_images
    monkeypatch.setattr(overlap, "shared_images", lambda *a: calls.append(1) or compare(*a))
    check_test_images_unseen(config, "custom", memo=memo)
    check_test_images_unseen(config, "custom", memo=memo)
    assert len(calls) == 1 and memo.read_text().startswith("custom ")
    shutil.copy(root / "images" / "b" / "img05.png", folder / "again.png")  # a test image comes back
    with pytest.raises(ValueError, match="1 of the 4 test images"):
        check_test_images_unseen(config, "custom", memo=memo)
    assert len(calls) == 2
