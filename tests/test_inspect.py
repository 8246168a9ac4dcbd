"""`umtfss inspect` on every artifact kind, and the label-store overlay PNG."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image

from umtfss import cli
from umtfss.inspect import overlay_image, summarise
from umtfss.pseudo_episodes import build_episodes


def write_label_store(tmp_path):
    labels = np.full((3, 6, 6), -1, np.int16)
    labels[:, :6, :4] = 1
    labels[:, :2, :4] = 0
    labels[2, 5, 3] = 4
    store = zarr.open_group(str(tmp_path / "labels.zarr"), mode="w")
    store.create_array("labels", data=labels, chunks=(1, 6, 6))
    store.attrs.update({"image_ids": ["a", "b", "c"], "clusters": 5, "centroids_sha256": "abc"})
    return tmp_path / "labels.zarr"


def test_label_store_summary_and_overlay(tmp_path):
    path = write_label_store(tmp_path)
    text = summarise(path)
    assert "array 'labels': shape (3, 6, 6), dtype int16, chunks (1, 6, 6)" in text
    assert "clusters: 5" in text and "on disk" in text
    # cluster sizes: 0 -> 3*8, 1 -> 3*16 - 1, 4 -> 1 (padding excluded)
    assert "cluster 0         24" in text and "cluster 1         47" in text and "cluster 4          1" in text

    rows = []
    for image_id in "abc":
        Image.fromarray(np.full((30, 45, 3), 200, np.uint8)).save(tmp_path / f"{image_id}.png")
        rows.append({"image_id": image_id, "image_path": str(tmp_path / f"{image_id}.png")})
    pd.DataFrame(rows).to_parquet(tmp_path / "images.parquet")
    out = tmp_path / "overlay.png"
    assert cli.main(["inspect", str(path), "--overlay", str(out), "--images", str(tmp_path / "images.parquet"), "--n", "2"]) == 0
    picture = np.asarray(Image.open(out))
    assert picture.shape == (192, 2 * 192, 3) and picture.std() > 0
    assert not list(tmp_path.glob("overlay*tmp*"))


def test_overlay_with_ground_truth_shows_each_label_beside_its_pseudo_masks(tmp_path):
    from umtfss.inspect import ground_truth_colours, write_overlay

    path = write_label_store(tmp_path)
    rows = []
    for image_id, class_id in (("a", 1), ("b", 2), ("c", None)):
        Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / f"{image_id}.png")
        label = None
        if class_id is not None:  # left half background, right half the class
            mask = np.zeros((40, 40), np.uint8)
            mask[:, 20:] = class_id
            label = str(tmp_path / f"{image_id}_label.png")
            Image.fromarray(mask).save(label)
        rows.append({"image_id": image_id, "image_path": str(tmp_path / f"{image_id}.png"), "label_path": label})
    table = tmp_path / "images.parquet"
    pd.DataFrame(rows).to_parquet(table)
    out = tmp_path / "truth.png"
    assert cli.main(["inspect", str(path), "--overlay", str(out), "--images", str(table), "--n", "3", "--ground-truth"]) == 0
    picture = np.asarray(Image.open(out)).astype(int)
    assert picture.shape == (2 * 192, 2 * 2 * 192, 3)  # 3 images: 2 x 2 slots of (pseudo masks, truth)
    colours = ground_truth_colours().astype(int)
    blend = lambda colour: np.round(200 * 0.5 + colour * 0.5)  # noqa: E731
    # image a: its truth tile follows its pseudo tile; image b (slot 1) shows its own class
    assert (picture[96, 192 + 40] == blend(colours[0])).all() and (picture[96, 192 + 150] == blend(colours[1])).all()
    assert (picture[96, 3 * 192 + 150] == blend(colours[2])).all()
    assert not (colours[1] == colours[2]).all()
    assert (picture[192 + 96, 192 + 96] == 96).all()  # image c has no label: a grey tile
    assert cli.main(["inspect", str(path), "--overlay", str(tmp_path / "plain.png"), "--images", str(table), "--n", "3"]) == 0
    assert np.asarray(Image.open(tmp_path / "plain.png")).shape == (2 * 192, 2 * 192, 3)

    Image.fromarray(np.zeros((30, 40), np.uint8)).save(rows[0]["label_path"])
    with pytest.raises(ValueError, match="a_label.png' is 40x30, its image .*a.png' 40x40"):
        write_overlay(path, table, tmp_path / "bad.png", ground_truth=True)
    pd.DataFrame(rows).drop(columns="label_path").to_parquet(table)
    with pytest.raises(ValueError, match="has no column label_path"):
        write_overlay(path, table, tmp_path / "bad.png", ground_truth=True)
    assert not (tmp_path / "bad.png").exists()


def test_overlay_colours_follow_labels():
    labels = np.array([[0, 1, -1], [0, 1, -1]])
    colours = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    blended = overlay_image(np.zeros((4, 6, 3), np.uint8), labels, colours, alpha=1.0)
    assert (blended[:, :3] == [255, 0, 0]).all() and (blended[:, 3:] == [0, 0, 255]).all()


def test_episode_artifacts_npy_json_and_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 6, 6), np.int16)
    labels[:, 2:5, 1:4] = 1
    features = rng.normal(size=(4, 6, 6, 8))
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    emb = zarr.open_group(str(tmp_path / "emb.zarr"), mode="w")
    emb.create_array("features", data=features.astype(np.float16), chunks=(1, 6, 6, 8))
    emb.create_array("valid", data=np.full((4, 2), 6, np.int32))
    emb.create_array("sizes", data=np.full((4, 2), 48, np.int32))
    ids = ["p", "q", "r", "s"]
    emb.attrs.update({"image_ids": ids, "stride": 8, "image_size": 48})
    lab = zarr.open_group(str(tmp_path / "lab.zarr"), mode="w")
    lab.create_array("labels", data=labels, chunks=(1, 6, 6))
    lab.attrs.update({"image_ids": ids, "clusters": 2})
    config = {"min_region_pixels": 4, "area_unit": "grid", "drop_background_like": True, "background_rule": "bbox", "background_span": 0.95, "top_fraction": 0.5,
              "max_candidates": 5000, "max_pool": 20000, "seed": 0}
    paths = build_episodes([tmp_path / "lab.zarr"], [tmp_path / "emb.zarr"], tmp_path / "ep", config, progress=False)

    regions = summarise(paths["regions"])
    assert "(parquet, 4 rows" in regions and "cluster: int16" in regions
    assert "regions per cluster:" in regions and "cluster 1          4" in regions
    assert '"min_region_pixels": 4' in regions
    candidates = summarise(paths["candidates"])
    assert "candidate-list lengths: min 2, median 2, mean 2.0, max 2; 0 regions without candidates" in candidates
    npy = summarise(paths["features"])
    assert "shape (4, 8), dtype float16" in npy and "row norms" in npy and re.search(r"mean (0\.99|1\.00)", npy)
    assert "feature norms of image 0" in summarise(tmp_path / "emb.zarr")

    (tmp_path / "fit.json").write_text(json.dumps({"objective": 1.5, "clusters": 2}))
    assert '"objective": 1.5' in summarise(tmp_path / "fit.json")

    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "step": 120, "epoch": 3,
                "config": {"model": {"dim": 256}}}, checkpoint)
    assert cli.main(["inspect", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    assert "model: dict of 2 entries, 2 tensors, 8 values" in text
    assert "step: 120" in text and "epoch: 3" in text and '"dim": 256' in text


def test_unknown_artifact_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a .zarr store"):
        summarise(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        summarise(tmp_path / "missing.parquet")
    assert cli.main(["inspect", str(write_label_store(tmp_path)), "--overlay", str(tmp_path / "o.png")]) == 1
    for name, content in (("damaged.parquet", b"not parquet"), ("damaged.json", b"{oops"), ("damaged.npy", b"\x93NUM")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"'{tmp_path / name}' is not a readable {name.split('.')[1]} file: "):
            summarise(tmp_path / name)


def test_benchmark_tsv_and_empty_shard(tmp_path):
    (tmp_path / "train.tsv").write_text("s\th:m:s\tmax_rss\n177.7\t0:02:57\t1907.5\n")
    text = summarise(tmp_path / "train.tsv")
    assert "TSV, 1 rows" in text and "max_rss" in text and "1907.5" in text
    empty = zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    empty.create_array("labels", shape=(0, 6, 6), dtype="int16", chunks=(1, 6, 6))
    empty.attrs.update({"image_ids": [], "clusters": 5})
    pd.DataFrame({"image_id": ["a"], "image_path": ["a.png"]}).to_parquet(tmp_path / "images.parquet")
    from umtfss.inspect import write_overlay

    with pytest.raises(ValueError, match="holds no image"):
        write_overlay(tmp_path / "empty.zarr", tmp_path / "images.parquet", tmp_path / "o.png")


def test_a_folder_lists_each_artifact_on_one_line(tmp_path, capsys):
    """`umtfss inspect results/...` on a folder: stores not descended into, other files skipped, a
    damaged file listed with its reason while the rest is still shown."""
    root = tmp_path / "clusters-5"
    (root / "labels").mkdir(parents=True)
    write_label_store(root / "labels")
    np.save(root / "centroids.npy", np.ones((5, 8), np.float32))
    (root / "fit.json").write_text(json.dumps({"clusters": 5, "metric": "spherical"}))
    pd.DataFrame({"cluster": [0, 1, 1], "area": [4, 5, 6]}).to_parquet(root / "regions.parquet")
    (root / "candidates.parquet").write_bytes(b"not parquet")
    (root / "models" / "unsup").mkdir(parents=True)
    torch.save({"method": "unsup", "epoch": 2, "step": 40, "model": {}}, root / "models" / "unsup" / "checkpoint.pt")
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(root / "pseudo_masks.png")
    (root / "notes.txt").write_text("not an artifact")
    (root / ".snakemake_timestamp").write_text("")
    assert cli.main(["inspect", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{root} (folder, 7 artifacts")
    listed = {line.split()[0]: line for line in lines[1:]}
    assert list(listed) == ["candidates.parquet", "centroids.npy", "fit.json", "labels/labels.zarr/",
                            "models/unsup/checkpoint.pt", "pseudo_masks.png", "regions.parquet"]
    assert "unreadable" in listed["candidates.parquet"]
    assert "npy: shape (5, 8), float32" in listed["centroids.npy"]
    assert "JSON: clusters, metric" in listed["fit.json"]
    assert "Zarr store: labels (3, 6, 6) int16; 3 images" in listed["labels/labels.zarr/"]
    assert "checkpoint: method unsup, epoch 2, step 40" in listed["models/unsup/checkpoint.pt"]
    assert "PNG: 9x7 RGB" in listed["pseudo_masks.png"]
    assert "parquet: 3 rows x 2 columns" in listed["regions.parquet"]
    (root / "models" / "back").symlink_to(root, target_is_directory=True)  # a link up the tree: read once
    assert summarise(root).splitlines()[0].startswith(f"{root} (folder, 7 artifacts")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no artifact umtfss knows"):
        summarise(tmp_path / "empty")


def test_embedding_store_overlay_colours_features_by_principal_components(tmp_path):
    """Each image beside its features as PCA colours: four feature vectors in four blocks give four
    colours, the same in every image (one projection for all); padding cells are not shown."""
    from umtfss.stores import create_embedding_store

    rng = np.random.default_rng(0)
    features = np.zeros((3, 4, 6, 8), np.float32)
    for (rows, cols), axis in zip([(slice(0, 2), slice(0, 3)), (slice(0, 2), slice(3, 6)),
                                   (slice(2, 4), slice(0, 3)), (slice(2, 4), slice(3, 6))], range(4)):
        features[:, rows, cols] = np.eye(8)[axis]
    features += rng.normal(scale=0.01, size=features.shape)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    attrs = {"image_ids": ["x", "y", "z"], "backbone": "synthetic", "layer": "l", "stride": 8, "image_size": 48,
             "dim": 8, "dtype": "float32", "checkpoint_sha256": None, "preprocessing": "test",
             "forward_precision": "float32", "shard": 0, "num_shards": 1, "umtfss_version": "test"}
    group = create_embedding_store(tmp_path / "emb.zarr", 3, (4, 6), 8, "float32", attrs)
    group["features"][:] = features
    group["valid"][:] = [[4, 6], [4, 6], [2, 6]]  # image z: its lower two rows are padding
    group["sizes"][:] = [[32, 48], [32, 48], [16, 48]]
    rows = []
    for image_id, height in (("x", 32), ("y", 32), ("z", 16)):
        Image.fromarray(np.full((height, 48, 3), 120, np.uint8)).save(tmp_path / f"{image_id}.png")
        rows.append({"image_id": image_id, "image_path": str(tmp_path / f"{image_id}.png")})
    pd.DataFrame(rows).to_parquet(tmp_path / "images.parquet")
    out = tmp_path / "features.png"
    args = ["inspect", str(tmp_path / "emb.zarr"), "--images", str(tmp_path / "images.parquet"), "--overlay", str(out)]
    assert cli.main(args) == 0
    picture = np.asarray(Image.open(out)).astype(int)
    assert picture.shape == (2 * 192, 2 * 2 * 192, 3)  # 2x2 slots, image + features side by side
    x_tile = picture[:128, 192:384]  # image x's feature tile: 48x32 scaled to 192x128, a cell 32 px
    blocks = [x_tile[5:58, 5:90], x_tile[5:58, 100:186], x_tile[70:122, 5:90], x_tile[70:122, 100:186]]
    colours = [block.reshape(-1, 3).mean(0) for block in blocks]
    assert all(block.reshape(-1, 3).std(0).max() < 12 for block in blocks)  # one colour per feature
    assert min(np.abs(p - q).max() for i, p in enumerate(colours) for q in colours[i + 1:]) > 40
    z_tile = picture[192:256, 192:384]  # image z (48x16 -> 192x64): its two valid rows, the top blocks
    assert np.abs(z_tile[5:58, 5:90].reshape(-1, 3).mean(0) - colours[0]).max() < 12
    assert np.abs(z_tile[5:58, 100:186].reshape(-1, 3).mean(0) - colours[1]).max() < 12
    assert cli.main(args + ["--ground-truth"]) == 1  # label stores only
    from umtfss.inspect import write_feature_overlay

    pd.DataFrame([{"image_id": "w", "image_path": rows[0]["image_path"]}]).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="none of the images of .*emb.zarr' is in the images table .*other.parquet"):
        write_feature_overlay(tmp_path / "emb.zarr", tmp_path / "other.parquet", tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="images table .*absent.parquet' does not exist"):
        write_feature_overlay(tmp_path / "emb.zarr", tmp_path / "absent.parquet", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def write_images_table(tmp_path, ids="abc"):
    rows = []
    for image_id in ids:
        Image.fromarray(np.full((30, 45, 3), 200, np.uint8)).save(tmp_path / f"{image_id}.png")
        rows.append({"image_id": image_id, "image_path": str(tmp_path / f"{image_id}.png")})
    pd.DataFrame(rows).to_parquet(tmp_path / "images.parquet")
    return tmp_path / "images.parquet"


def test_a_corrupt_zarr_json_is_named(tmp_path, capsys):
    path = write_label_store(tmp_path)
    metadata = path / "labels" / "zarr.json"
    metadata.write_text(metadata.read_text().replace('"shape"', 'shape', 1))
    assert cli.main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"'{metadata}' is not valid JSON" in err and "Traceback" not in err
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_')  # the group's own metadata, truncated
    with pytest.raises(ValueError, match=f"'{re.escape(str(path / 'zarr.json'))}' is not valid JSON"):
        summarise(path)
    assert "labels.zarr/  " in summarise(tmp_path) and "'zarr.json' is not valid JSON" in summarise(tmp_path)


def test_a_wrong_or_damaged_images_table_is_named(tmp_path, capsys):
    path = write_label_store(tmp_path)
    table = write_images_table(tmp_path)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(table.read_bytes()[:300])
    pd.DataFrame({"region_id": [0], "image_id": ["a"], "cluster": [1]}).to_parquet(tmp_path / "regions.parquet")
    cases = ((truncated, f"images table '{truncated}' is not a readable parquet file"),
             (tmp_path / "regions.parquet", f"images table '{tmp_path / 'regions.parquet'}' lacks column(s) ['image_path']"),
             (tmp_path, f"images table '{tmp_path}' (--images) is a folder, expected a parquet file"))
    for images, message in cases:
        assert cli.main(["inspect", str(path), "--overlay", str(tmp_path / "o.png"), "--images", str(images)]) == 1
        captured = capsys.readouterr()
        assert message in captured.err and "FieldRef" not in captured.err
        assert captured.out == ""  # refused before the summary
    assert not (tmp_path / "o.png").exists()


def test_overlay_options_are_checked_before_the_summary(tmp_path, capsys):
    path = write_label_store(tmp_path)
    table = write_images_table(tmp_path)
    overlay = ["--overlay", str(tmp_path / "o.png"), "--images", str(table)]
    for args, message in ((["--n", "0"] + overlay, "--n is 0; expected >= 1"),
                          (["--n", "-3"] + overlay, "--n is -3; expected >= 1"),
                          (["--n", "0"], "--n is 0; expected >= 1"),
                          (["--ground-truth"], "--ground-truth applies to the overlay"),
                          (["--overlay", str(tmp_path / "o.png")], "--overlay needs --images"),
                          (["--overlay", str(tmp_path), "--images", str(table)], "is a folder, expected the path of a PNG")):
        assert cli.main(["inspect", str(path), *args]) == 1
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ""
    assert cli.main(["inspect", str(table), *overlay]) == 1
    assert "is not a Zarr store" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    assert cli.main(["inspect", str(path), *overlay, "--n", "1"]) == 0  # one image: one tile
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (192, 192, 3)


def test_missing_chunks_are_counted_and_flagged(tmp_path, capsys):
    from umtfss.stores import create_embedding_store

    attrs = {"image_ids": ["x", "y", "z"], "stride": 8, "image_size": 48}
    group = create_embedding_store(tmp_path / "emb.zarr", 3, (2, 2), 4, "float32", attrs)
    group["features"][:] = np.ones((3, 2, 2, 4), np.float32)
    group["valid"][:] = 2
    group["sizes"][:] = 16
    assert "chunks: 3 of 3 present\n" in summarise(tmp_path / "emb.zarr") + "\n"
    assert "WARNING" not in summarise(tmp_path / "emb.zarr")
    (tmp_path / "emb.zarr" / "features" / group["features"].metadata.encode_chunk_key((1, 0, 0, 0))).unlink()
    text = summarise(tmp_path / "emb.zarr")
    assert "chunks: 2 of 3 present -- WARNING: 1 missing (image 1)" in text and "read as zeros" in text
    labels = write_label_store(tmp_path)
    (labels / "labels" / "c" / "2" / "0" / "0").unlink()
    assert "chunks: 2 of 3 present -- WARNING: 1 missing (image 2)" in summarise(labels)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "INCOMPLETE: 'features' 2 of 3 chunks present" in listed and "'labels' 2 of 3 chunks present" in listed


def test_empty_or_truncated_files_of_every_kind_give_one_line(tmp_path, capsys):
    """An empty .npy (numpy's EOFError) and an empty or truncated checkpoint: one error line naming the file
    and saying it ends early, not a traceback or an empty reason."""
    torch.save({"model": torch.nn.Linear(3, 2).state_dict()}, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    for name, said in (("empty.npy", "ends early"), ("empty.pt", "EOFError"), ("truncated.pt", "truncated")):
        if not (tmp_path / name).exists():
            (tmp_path / name).write_bytes(b"")
        assert cli.main(["inspect", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(tmp_path / name) in err and said in err, err


def test_a_png_is_summarised_with_its_values(tmp_path, capsys):
    """A folder's listing shows PNGs and sends to `umtfss inspect` on one of them: a mask's values are listed
    (they tell 0/255 from class indices); a truncated PNG is one error line."""
    from umtfss.io import write_png

    mask = np.zeros((4, 5), np.uint8)
    mask[:2] = 255
    mask[3, 0] = 7
    write_png(tmp_path / "mask.png", mask)
    assert cli.main(["inspect", str(tmp_path / "mask.png")]) == 0
    out = capsys.readouterr().out
    assert "(PNG, 5x4 L" in out and "pixel values (share of pixels): 0 (45.0%), 7 (5.0%), 255 (50.0%)" in out
    write_png(tmp_path / "photo.png", (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    (tmp_path / "cut.png").write_bytes((tmp_path / "photo.png").read_bytes()[:300])
    assert cli.main(["inspect", str(tmp_path / "photo.png")]) == 0
    assert "(PNG, 40x40 RGB" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "cut.png")]) == 1
    err = capsys.readouterr().err
    assert "'" + str(tmp_path / "cut.png") + "' is not a readable png file" in err and len(err.strip().splitlines()) == 1


def _corrupt(array, index: int) -> None:
    chunk = Path(array.store.root) / array.path / array.metadata.encode_chunk_key((index, *(0,) * (array.ndim - 1)))
    chunk.write_bytes(b"not a blosc chunk at all")


def test_a_corrupt_chunk_is_named_in_the_summary(tmp_path, capsys):
    """A chunk file that does not decode (a disk error, a partial copy): the summary is still printed, with
    a WARNING naming the image and the chunk file, not blosc's traceback."""
    from umtfss.stores import create_embedding_store, create_label_store

    attrs = {"image_ids": ["x", "y", "z"], "stride": 8, "image_size": 48}
    group = create_embedding_store(tmp_path / "emb.zarr", 3, (2, 2), 4, "float32", attrs)
    group["features"][:] = np.ones((3, 2, 2, 4), np.float32)
    group["valid"][:] = 2
    group["sizes"][:] = 16
    _corrupt(group["features"], 0)
    assert cli.main(["inspect", str(tmp_path / "emb.zarr")]) == 0
    out = capsys.readouterr().out
    assert "feature norms of image 0: not read, chunk file" in out and "is corrupt" in out
    labels = create_label_store(tmp_path / "lab.zarr", 3, (2, 2), {"image_ids": ["x", "y", "z"], "clusters": 2})
    labels["labels"][:] = np.ones((3, 2, 2), np.int16)
    _corrupt(labels["labels"], 1)
    assert cli.main(["inspect", str(tmp_path / "lab.zarr")]) == 0
    out = capsys.readouterr().out
    assert "cluster 1          8" in out and "WARNING: 1 image(s) of 'labels' cannot be read" in out
    assert "image 1: '" + str(tmp_path / "lab.zarr" / "labels" / "c" / "1" / "0" / "0") + "'" in out


def test_a_store_a_killed_job_left_is_summarised_and_flagged(tmp_path, capsys):
    """embed writes into `<name>.tmp-<pid>-<hex>.zarr` and renames at the end; a killed job leaves that with
    some feature chunks and no `valid` yet. inspect says so instead of failing on the empty first image,
    and its feature overlay is refused in one line."""
    from umtfss.stores import create_embedding_store

    attrs = {"image_ids": ["x", "y", "z"], "stride": 8, "image_size": 48}
    temp = tmp_path / "shard-0-of-1.tmp-999999-0123abcd.zarr"
    group = create_embedding_store(temp, 3, (2, 2), 4, "float32", attrs)
    group["features"][:1] = np.ones((1, 2, 2, 4), np.float32)
    assert cli.main(["inspect", str(temp)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("WARNING: 'shard-0-of-1.tmp-999999-0123abcd.zarr' is the temporary of a job writing "
                          "'shard-0-of-1.zarr', process 999999 no longer running")
    assert "feature norms of image 0: none" in out and "chunks: 1 of 3 present -- WARNING" in out
    assert cli.main(["inspect", str(tmp_path)]) == 0
    assert "HALF-WRITTEN (temporary of a job) Zarr store" in capsys.readouterr().out
    table = write_images_table(tmp_path, "xyz")
    assert cli.main(["inspect", str(temp), "--images", str(table), "--overlay", str(tmp_path / "f.png"), "--n", "1"]) == 1
    err = capsys.readouterr().err
    assert "no valid cell" in err and "rerun embed" in err and "Traceback" not in err
    assert not (tmp_path / "f.png").exists()


def test_a_store_without_metadata_is_named(tmp_path, capsys):
    """A .zarr folder without zarr.json (an interrupted copy) is refused naming what is missing; an array
    folder of a group without its zarr.json is flagged, where zarr would leave it out silently."""
    (tmp_path / "empty.zarr").mkdir()
    assert cli.main(["inspect", str(tmp_path / "empty.zarr")]) == 1
    assert "has no Zarr metadata file (zarr.json" in capsys.readouterr().err
    path = write_label_store(tmp_path)
    (path / "labels" / "zarr.json").unlink()
    assert cli.main(["inspect", str(path)]) == 0
    captured = capsys.readouterr()
    assert "folder 'labels': WARNING: no Zarr metadata file" in captured.out and "ZarrUserWarning" not in captured.err
    assert cli.main(["inspect", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "INCOMPLETE: folder 'labels' has no metadata" in listed and "empty.zarr/" in listed
    assert "unreadable (no Zarr metadata file" in listed


def test_arrays_are_listed_in_name_order(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    for name in ("valid", "zeta", "sizes", "alpha"):
        group.create_array(name, data=np.zeros((2, 2), np.int32))
    text = summarise(tmp_path / "s.zarr")
    assert re.findall(r"array '(\w+)'", text) == ["alpha", "sizes", "valid", "zeta"]


def test_the_overlay_is_written_only_to_a_png_name(tmp_path, capsys):
    """--overlay centroids.npy would replace that artifact with PNG bytes, o.jpg would be PNG data under a
    JPEG name; an overlay under a file cannot be written: all refused before the summary."""
    path = write_label_store(tmp_path)
    table = write_images_table(tmp_path)
    np.save(tmp_path / "centroids.npy", np.ones((2, 3), np.float32))
    before = (tmp_path / "centroids.npy").read_bytes()
    for target, message in ((tmp_path / "centroids.npy", "does not end in .png"), (tmp_path / "o.jpg", "does not end in .png"),
                            (tmp_path / "centroids.npy" / "o.png", "is a file, not a folder")):
        assert cli.main(["inspect", str(path), "--images", str(table), "--overlay", str(target)]) == 1
        captured = capsys.readouterr()
        assert message in captured.err and str(target) in captured.err and captured.out == ""
    assert (tmp_path / "centroids.npy").read_bytes() == before and not (tmp_path / "o.jpg").exists()
    assert cli.main(["inspect", str(path), "--images", str(table), "--overlay", str(tmp_path / "new" / "o.png")]) == 0


def test_a_large_feature_overlay_shows_a_progress_bar(tmp_path, capsys):
    from umtfss.stores import create_embedding_store

    ids = [f"i{k:02d}" for k in range(32)]
    group = create_embedding_store(tmp_path / "emb.zarr", 32, (2, 2), 4, "float32", {"image_ids": ids, "stride": 8})
    group["features"][:] = np.random.default_rng(0).normal(size=(32, 2, 2, 4)).astype(np.float32)
    group["valid"][:] = 2
    group["sizes"][:] = 16
    write_images_table(tmp_path, ids)
    assert cli.main(["inspect", str(tmp_path / "emb.zarr"), "--images", str(tmp_path / "images.parquet"),
                     "--overlay", str(tmp_path / "f.png"), "--n", "32"]) == 0
    assert "overlay: 100%" in capsys.readouterr().err


def test_a_json_record_shows_long_lists_shortened_to_n(tmp_path):
    """fit.json's objective per iteration (or a list of ids) is cut to --n items with a count, not one line each."""
    import json

    from umtfss.inspect import summarise

    record = {"clusters": 50, "objective": [float(1000 - i) for i in range(40)], "backend": "faiss",
              "runs": [{"seed": s} for s in range(7)]}
    (tmp_path / "fit.json").write_text(json.dumps(record))
    text = summarise(tmp_path / "fit.json", n=4)
    assert '"objective": [1000.0, 999.0, 998.0, 997.0, ... 36 more; 40 items, last 961.0]' in text
    assert '"clusters": 50' in text and '"backend": "faiss"' in text
    assert text.count('"seed"') == 4 and "... 3 more" in text
    assert len(text.splitlines()) < 25


def test_the_overlay_never_replaces_a_file_it_reads(tmp_path, capsys):
    """--overlay on one of the table's images (by its path, through a link, or a hard link), on a label
    file, on the images table itself or on the --config file would replace that input: refused before
    the summary, naming --overlay and the path; the inputs are left as they are."""
    path = write_label_store(tmp_path)
    table = write_images_table(tmp_path)
    rows = pd.read_parquet(table)
    Image.fromarray(np.zeros((30, 45), np.uint8)).save(tmp_path / "a_label.png")
    rows["label_path"] = [str(tmp_path / "a_label.png"), None, None]
    rows.to_parquet(table)
    (tmp_path / "link.png").symlink_to(tmp_path / "b.png")
    os.link(tmp_path / "c.png", tmp_path / "hard.png")
    (tmp_path / "table.png").write_bytes(table.read_bytes())  # a parquet under a PNG name is still read
    (tmp_path / "config.png").write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.glob("*.png")}
    for target, images, extra, named in (
            ("a.png", table, [], "image"), ("link.png", table, [], "image"), ("hard.png", table, [], "image"),
            ("a_label.png", table, ["--ground-truth"], "label"), ("a_label.png", table, [], "label"),
            ("table.png", tmp_path / "table.png", [], "--images"), ("config.png", table,
                                                                    ["--config", str(tmp_path / "config.png")], "--config")):
        assert cli.main(["inspect", str(path), "--images", str(images), "--overlay", str(tmp_path / target), *extra]) == 1
        captured = capsys.readouterr()
        assert "--overlay" in captured.err and str(tmp_path / target) in captured.err, captured.err
        assert f"same file as {named}" in captured.err and captured.out == ""
    assert {p: p.read_bytes() for p in tmp_path.glob("*.png")} == before
    # a PNG that is no input (an earlier overlay) is replaced as before
    (tmp_path / "old.png").write_bytes(before[tmp_path / "b.png"])
    assert cli.main(["inspect", str(path), "--images", str(table), "--overlay", str(tmp_path / "old.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "old.png")).shape == (2 * 192, 2 * 192, 3)  # 3 images: 2 x 2
