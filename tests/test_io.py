"""Image/label reading of odd modes, corrupt files, PNG writing and atomic output paths."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umtfss import io


def _gradient(height=12, width=16):
    return (np.arange(height * width).reshape(height, width) % 256).astype(np.uint8)


def test_grayscale_and_palette_become_rgb(tmp_path):
    gray = _gradient()
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb = io.read_rgb(tmp_path / "g.png")
    assert rgb.shape == (12, 16, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable
    assert np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)

    indices = (gray % 3).astype(np.uint8)
    pal = Image.fromarray(indices)
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    pal.save(tmp_path / "p.png")
    rgb = io.read_rgb(tmp_path / "p.png")
    assert np.array_equal(rgb[indices == 1], np.tile([0, 255, 0], ((indices == 1).sum(), 1)))


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.full((8, 8, 4), 200, dtype=np.uint8)
    rgba[:4, :, 3] = 0      # transparent top half
    rgba[4:, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    rgb = io.read_rgb(tmp_path / "a.png")
    assert rgb.shape == (8, 8, 3)
    assert (rgb[:4] == 0).all() and (rgb[4:] == 200).all()

    la = Image.fromarray(np.full((5, 6), 100, np.uint8)).convert("LA")
    la.putalpha(Image.fromarray(np.full((5, 6), 255, np.uint8)))
    la.save(tmp_path / "la.png")
    assert (io.read_rgb(tmp_path / "la.png") == 100).all()


def test_cmyk_jpeg_and_16bit_tiff(tmp_path):
    Image.new("CMYK", (10, 7), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    rgb = io.read_rgb(tmp_path / "c.jpg")
    assert rgb.shape == (7, 10, 3)
    assert rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60

    values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.tif")
    rgb = io.read_rgb(tmp_path / "d.tif")
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[..., 0].tolist() == [[0, 255], [128, 1]]

    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i.tif")
    assert io.read_rgb(tmp_path / "i.tif")[..., 1].tolist() == [[0, 255], [128, 1]]


def test_multipage_tiff_gives_first_page(tmp_path):
    pages = [Image.new("RGB", (4, 3), (10, 20, 30)), Image.new("RGB", (4, 3), (200, 0, 0))]
    pages[0].save(tmp_path / "m.tiff", save_all=True, append_images=pages[1:])
    assert io.read_rgb(tmp_path / "m.tiff")[0, 0].tolist() == [10, 20, 30]


def test_exif_orientation_is_applied_and_matches_image_size(tmp_path):
    image = Image.new("RGB", (20, 10), (50, 60, 70))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90
    image.save(tmp_path / "r.jpg", exif=exif)
    assert io.read_rgb(tmp_path / "r.jpg").shape == (20, 10, 3)
    assert io.image_size(tmp_path / "r.jpg") == (20, 10)


def test_corrupt_and_missing_files(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    for path in (truncated, garbage):
        with pytest.raises(io.ImageReadError) as caught:
            io.read_rgb(path)
        assert str(path) in str(caught.value) and isinstance(caught.value, ValueError)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        io.read_rgb(tmp_path / "nothere.png")


def test_image_read_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(io.ImageReadError("/x/y.png", "broken")))
    assert err.path == "/x/y.png" and "broken" in str(err)


def test_read_label_keeps_palette_indices(tmp_path):
    indices = np.array([[0, 1, 15], [255, 20, 0]], dtype=np.uint8)
    io.write_png(tmp_path / "l.png", indices, palette=io.voc_palette())
    assert Image.open(tmp_path / "l.png").mode == "P"
    label = io.read_label(tmp_path / "l.png")
    assert np.array_equal(label, indices) and label.flags.writeable
    assert io.voc_palette()[1] == (128, 0, 0) and io.voc_palette()[255] == (224, 224, 192)

    io.write_png(tmp_path / "gray.png", indices)
    assert Image.open(tmp_path / "gray.png").mode == "L"
    assert np.array_equal(io.read_label(tmp_path / "gray.png"), indices)

    binary = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)  # a 1-bit PNG: background and class 1
    Image.fromarray(binary).convert("1").save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert io.read_label(tmp_path / "bits.png").tolist() == binary.astype(np.uint8).tolist()

    Image.new("RGB", (3, 3)).save(tmp_path / "colour.png")
    with pytest.raises(io.ImageReadError, match="colour.png"):
        io.read_label(tmp_path / "colour.png")


def test_write_png_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        io.write_png(tmp_path / "x.png", np.zeros((3, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="shape"):
        io.write_png(tmp_path / "x.png", np.zeros((3, 3, 4), dtype=np.uint8))
    rgb = np.random.default_rng(0).integers(0, 255, (5, 4, 3), dtype=np.uint8)
    io.write_png(tmp_path / "rgb.png", rgb)
    assert np.array_equal(io.read_rgb(tmp_path / "rgb.png"), rgb)


def test_atomic_path_renames_on_success_and_cleans_on_error(tmp_path):
    target = tmp_path / "out" / "store.zarr"
    with io.atomic_path(target) as temp:
        assert temp.parent == target.parent and temp.suffix == ".zarr" and temp.name != target.name
        temp.mkdir()
        (temp / "a").write_text("first")
    assert (target / "a").read_text() == "first"

    with io.atomic_path(target, folder=True) as temp:  # replaces an existing directory
        temp.mkdir()
        (temp / "b").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b"]

    with pytest.raises(RuntimeError):
        with io.atomic_path(target, folder=True) as temp:
            temp.mkdir()
            (temp / "c").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["store.zarr"]

    table = tmp_path / "t.parquet"
    table.write_text("old")
    with io.atomic_path(table) as temp:
        assert temp.suffix == ".parquet"
        temp.write_text("new")
    assert table.read_text() == "new" and len(list(tmp_path.iterdir())) == 2


def test_atomic_path_refuses_to_replace_what_is_not_an_earlier_output(tmp_path):
    """A typo must not delete a folder of the user's files, nor a file where a store goes; checked before any work."""
    notes = tmp_path / "myresults" / "sub" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("precious")
    started = []
    for path, kwargs in ((tmp_path / "myresults", {}), (tmp_path / "myresults", {"folder": True, "marker": "zarr.json"})):
        with pytest.raises(io.OutputInTheWay, match="myresults"):
            with io.atomic_path(path, **kwargs) as temp:
                started.append(temp)
    table = tmp_path / "table.parquet"
    table.write_text("mine")
    with pytest.raises(io.OutputInTheWay, match="is a file"):
        with io.atomic_path(table, folder=True) as temp:
            started.append(temp)
    assert started == [] and notes.read_text() == "precious" and table.read_text() == "mine"
    store = tmp_path / "old.zarr"
    (store / "features").mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    with io.atomic_path(store, folder=True, marker="zarr.json") as temp:  # an earlier store: replaced
        temp.mkdir()
    assert store.is_dir() and not (store / "features").exists()


def test_outputs_must_differ_from_inputs_and_each_other(tmp_path):
    with pytest.raises(io.OutputInTheWay, match="--out 'emb.zarr' is also --embeddings"):
        io.check_outputs_apart({"--out": "emb.zarr"}, {"--embeddings": [tmp_path / "x.zarr", "emb.zarr"]})
    with pytest.raises(io.OutputInTheWay, match="--out-meta .* is also --out-centroids"):
        io.check_outputs_apart({"--out-centroids": tmp_path / "c.npy", "--out-meta": tmp_path / "c.npy"}, {})
    io.check_outputs_apart({"--out": tmp_path / "labels.zarr"}, {"--embeddings": [tmp_path / "emb.zarr"]})


def test_sweep_removes_what_killed_writers_left(tmp_path):
    """A SIGKILLed job leaves `name.tmp-<pid>-<hex>.zarr`; the next writer of that output removes it
    (dead pid only), other outputs' temporaries and live writers' are kept."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f"shard-0-of-2.tmp-{pid}-0123abcd.zarr"
    (stale / "features").mkdir(parents=True)
    live = tmp_path / f"shard-0-of-2.tmp-{os.getpid()}-89abcdef.zarr"
    live.mkdir()
    other = tmp_path / f"shard-1-of-2.tmp-{pid}-0123abcd.zarr"
    other.mkdir()
    with io.atomic_path(tmp_path / "shard-0-of-2.zarr", sweep=True) as temp:
        temp.mkdir()
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "shard-0-of-2.zarr").is_dir()
    with io.atomic_path(tmp_path / "shard-1-of-2.zarr") as temp:  # without sweep: left alone
        temp.mkdir()
    assert other.exists()


def test_is_image_path_ignores_case():
    assert io.is_image_path("a/B.JPG") and io.is_image_path("x.TiFf") and not io.is_image_path("x.gif")


def test_fingerprint_follows_contents_store_metadata_and_extra(tmp_path):
    from umtfss.io import fingerprint

    table = tmp_path / "regions.parquet"
    table.write_bytes(b"abc")
    store = tmp_path / "labels.zarr"
    (store / "labels" / "c").mkdir(parents=True)
    (store / "zarr.json").write_text('{"attributes": {"centroids_sha256": "aa"}}')
    (store / "labels" / "c" / "0").write_bytes(b"chunk")
    first = fingerprint([table, store], extra={"fold": 0})
    assert first == fingerprint([table, store], extra={"fold": 0})
    assert first != fingerprint([table, store], extra={"fold": 1})
    table.write_bytes(b"abd")
    second = fingerprint([table, store], extra={"fold": 0})
    assert second != first
    (store / "zarr.json").write_text('{"attributes": {"centroids_sha256": "bb"}}')
    third = fingerprint([table, store], extra={"fold": 0})
    assert third != second
    (store / "labels" / "c" / "1").write_bytes(b"another chunk")
    fourth = fingerprint([table, store], extra={"fold": 0})
    assert fourth != third
    (store / ".snakemake_timestamp").write_text("1")  # Snakemake's marker does not count
    assert fingerprint([table, store], extra={"fold": 0}) == fourth
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        fingerprint([tmp_path / "missing.parquet"])


def test_table_paths_written_relative_to_the_workflow_folder_work_from_anywhere(tmp_path, monkeypatch):
    """A stage run alone outside the workflow's folder finds the images its tables name (relative to that folder)."""
    import pandas as pd

    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    io.write_png(root / "data" / "a.png", np.zeros((4, 4, 3), np.uint8))
    table_file = root / "results" / "demo" / "prepare" / "images.parquet"
    table_file.parent.mkdir(parents=True)
    frame = pd.DataFrame({"image_id": ["a", "b"], "image_path": ["data/a.png", "data/b.png"],
                          "label_path": [None, "data/b_label.png"]})
    monkeypatch.chdir(root)
    assert io.resolve_table_paths(frame, table_file) is frame  # from the workflow's folder: as written
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resolved = io.resolve_table_paths(frame, Path("..") / "project" / "results" / "demo" / "prepare" / "images.parquet")
    assert resolved["image_path"].tolist() == [str(root / "data" / "a.png"), str(root / "data" / "b.png")]
    assert pd.isna(resolved["label_path"][0]) and resolved["label_path"][1] == str(root / "data" / "b_label.png")
    assert io.read_rgb(resolved["image_path"][0]).shape == (4, 4, 3)
    assert frame["image_path"][0] == "data/a.png"  # the caller's frame is not changed
    lost = frame.assign(image_path=["gone/a.png", "gone/b.png"])
    assert io.resolve_table_paths(lost, table_file) is lost  # found nowhere: the reader names the file


def test_first_line_of_an_error_is_its_first_non_blank_line():
    """Readers' errors run over lines (torch's advice after its reason); some have no text at all."""
    assert io.first_line(ValueError("\n  bad header  \nsee the docs\n")) == "bad header"
    assert io.first_line(EOFError()) == "" and io.first_line(EOFError(), "no message") == "no message"
    assert io.first_line("  \n\n Unsupported global: GLOBAL os.system\n\nCheck the docs") == "Unsupported global: GLOBAL os.system"
    assert io.first_line(KeyError("key")) == "'key'"  # as str() gives it
