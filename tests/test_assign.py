"""Tests of the assign stage: labels equal a brute-force argmax, padding is -1, attributes, atomicity, CLI."""

from __future__ import annotations

import json

import threading

import numpy as np
import pytest
import zarr

from umtfss import cli
from umtfss.clustering import assign
from umtfss.clustering.assign import assign_shard
from umtfss.stores import EmbeddingStore, LabelStore, array_sha256, create_embedding_store


def write_store(path, n_images=7, grid=(6, 5), dim=8, dtype="float16", seed=0):
    """A random embedding store (unit-norm features) with varied valid extents."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_images, *grid, dim))
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    valid = np.stack([rng.integers(1, grid[0] + 1, n_images), rng.integers(1, grid[1] + 1, n_images)], axis=1)
    valid[0] = grid  # one image without padding
    attrs = {"image_ids": [f"im{i}" for i in range(n_images)], "backbone": "synthetic", "layer": "layer4",
             "stride": 8, "image_size": 48, "dim": dim, "dtype": dtype, "checkpoint_sha256": None,
             "preprocessing": "test", "forward_precision": "float32", "shard": 1, "num_shards": 3,
             "umtfss_version": "test"}
    group = create_embedding_store(path, n_images, grid, dim, dtype, attrs)
    group["features"][:] = feats.astype(dtype)
    group["valid"][:] = valid
    group["sizes"][:] = valid * 8
    return path


def random_centroids(clusters=5, dim=8, seed=1):
    c = np.random.default_rng(seed).normal(size=(clusters, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


@pytest.mark.parametrize("batch_images", [1, 3, 64])
def test_labels_equal_brute_force_argmax(tmp_path, batch_images):
    store_path = write_store(tmp_path / "e.zarr")
    centroids = random_centroids()
    out = assign_shard(store_path, centroids, tmp_path / "labels.zarr", batch_images=batch_images, device="cpu",
                       progress=False)
    labels = np.asarray(zarr.open_group(str(out), mode="r")["labels"][:])
    store = EmbeddingStore(store_path)
    assert labels.dtype == np.int16 and labels.shape == (7, 6, 5)
    for i in range(len(store)):
        expected = np.argmax(store.features(i).astype(np.float32) @ centroids.T, axis=-1)
        rows, cols = store.valid(i)
        np.testing.assert_array_equal(labels[i, :rows, :cols], expected[:rows, :cols])
        # padding cells are -1, and only they
        assert (labels[i, rows:, :] == -1).all() and (labels[i, :, cols:] == -1).all()
        assert (labels[i, :rows, :cols] >= 0).all()
    assert (labels == -1).any()


def test_centroids_that_are_not_unit_vectors_are_searched_by_l2_distance(tmp_path):
    """clustering.metric euclidean writes plain means: assign then picks the smallest L2 distance, which
    the largest inner product would often miss; unit centroids keep the inner product (no offsets)."""
    store_path = write_store(tmp_path / "e.zarr")
    centroids = random_centroids(clusters=6) * np.linspace(0.2, 1.0, 6, dtype=np.float32)[:, None]
    out = assign_shard(store_path, centroids, tmp_path / "labels.zarr", batch_images=3, device="cpu", progress=False)
    labels = np.asarray(zarr.open_group(str(out), mode="r")["labels"][:])
    store = EmbeddingStore(store_path)
    differs = 0
    for i in range(len(store)):
        rows, cols = store.valid(i)
        x = store.features(i).astype(np.float32)[:rows, :cols]
        distances = ((x[..., None, :] - centroids) ** 2).sum(-1)
        np.testing.assert_array_equal(labels[i, :rows, :cols], distances.argmin(-1))
        differs += int((distances.argmin(-1) != (x @ centroids.T).argmax(-1)).sum())
    assert differs > 0  # the inner product alone would have been wrong here
    import torch

    assert assign.l2_offsets(torch.from_numpy(random_centroids())) is None


def test_label_store_layout_and_attributes(tmp_path):
    store_path = write_store(tmp_path / "e.zarr")
    centroids = random_centroids(clusters=4)
    np.save(tmp_path / "centroids.npy", centroids)
    out = assign_shard(store_path, tmp_path / "centroids.npy", tmp_path / "l.zarr", device="cpu", progress=False)
    group = zarr.open_group(str(out), mode="r")
    assert group["labels"].chunks == (1, 6, 5)
    attrs = dict(group.attrs)
    assert attrs["image_ids"] == [f"im{i}" for i in range(7)]
    assert attrs["clusters"] == 4 and attrs["centroids_sha256"] == array_sha256(centroids)
    assert attrs["backbone"] == "synthetic" and attrs["shard"] == 1 and attrs["num_shards"] == 3
    assert attrs["forward_precision"] == "float32"  # a label shard says how its features were computed
    reader = LabelStore([out])
    assert len(reader) == 7 and reader.clusters == 4 and reader.grid == (6, 5)
    np.testing.assert_array_equal(reader.labels(3), group["labels"][3])


def test_errors_name_the_problem(tmp_path):
    store_path = write_store(tmp_path / "e.zarr")
    with pytest.raises(ValueError, match="centroids have 3 channels.*has 8"):
        assign_shard(store_path, random_centroids(dim=3), tmp_path / "l.zarr", device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        assign_shard(store_path, tmp_path / "nope.npy", tmp_path / "l.zarr", device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        assign_shard(tmp_path / "missing.zarr", random_centroids(), tmp_path / "l.zarr", device="cpu", progress=False)
    with pytest.raises(ValueError, match="clustering.refine.*no image table"):
        assign_shard(store_path, random_centroids(), tmp_path / "l.zarr", refine="superpixel", progress=False)
    with pytest.raises(ValueError, match="clustering.refine' is 'crf'"):
        assign_shard(store_path, random_centroids(), tmp_path / "l.zarr", refine="crf", progress=False)
    assert not (tmp_path / "l.zarr").exists()


def test_centroids_fit_on_other_embeddings_are_refused(tmp_path):
    from umtfss.clustering.fit import fit_centroids, write_fit

    fitted = write_store(tmp_path / "fitted.zarr")
    centroids, meta = fit_centroids(EmbeddingStore([fitted]), 3, subset_pixels=100, iterations=3, seed=0,
                                    device="cpu", progress=False)
    write_fit(centroids, meta, tmp_path / "fit" / "centroids.npy", tmp_path / "fit" / "fit.json")
    out = tmp_path / "l.zarr"
    assign_shard(fitted, tmp_path / "fit" / "centroids.npy", out, device="cpu", progress=False)  # the same: fine
    other = write_store(tmp_path / "other.zarr")
    zarr.open_group(other, mode="r+").attrs.update(backbone="dino-vits16", stride=16)
    with pytest.raises(ValueError, match=r"fit.json' records them\) were fit on other embeddings.*other.zarr.*backbone: 'synthetic' "
                                         r"\(fit\) vs 'dino-vits16' \(store\); stride: 8 \(fit\) vs 16"):
        assign_shard(other, tmp_path / "fit" / "centroids.npy", tmp_path / "l2.zarr", device="cpu", progress=False)
    assert not (tmp_path / "l2.zarr").exists()
    # the same through the Python API, from its own fit and from a saved one
    from umtfss import PixelClusters

    for clusters in (PixelClusters(3, subset_pixels=100, iterations=3, device="cpu").train([fitted], progress=False),
                     PixelClusters.load(tmp_path / "fit" / "centroids.npy", device="cpu")):
        with pytest.raises(ValueError, match="backbone: 'synthetic' \\(fit\\) vs 'dino-vits16'"):
            clusters.assign(other, tmp_path / "l2.zarr", progress=False)
    # a fit.json of other centroids says nothing about these: no check
    np.save(tmp_path / "fit" / "centroids.npy", random_centroids(clusters=3))
    assign_shard(other, tmp_path / "fit" / "centroids.npy", tmp_path / "l3.zarr", device="cpu", progress=False)
    assert len(LabelStore(tmp_path / "l3.zarr")) == 7


def test_interrupted_assign_leaves_no_store(tmp_path, monkeypatch):
    store_path = write_store(tmp_path / "e.zarr")
    real = assign.nearest_centroid
    calls = {"n": 0}

    def dies_on_third_batch(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args)

    monkeypatch.setattr(assign, "nearest_centroid", dies_on_third_batch)
    out = tmp_path / "labels" / "shard-1-of-3.zarr"
    with pytest.raises(KeyboardInterrupt):
        assign_shard(store_path, random_centroids(), out, batch_images=2, device="cpu", progress=False)
    assert list((tmp_path / "labels").iterdir()) == []


def test_cli(tmp_path, capsys):
    store_path = write_store(tmp_path / "e.zarr")
    np.save(tmp_path / "c.npy", random_centroids())
    out = tmp_path / "l.zarr"
    base = ["assign", "--embeddings", str(store_path), "--centroids", str(tmp_path / "c.npy"), "--out", str(out)]
    assert cli.main(base + ["--config", json.dumps({"clustering": {"device": "cpu"}})]) == 0
    assert len(LabelStore(out)) == 7
    np.save(tmp_path / "nan.npy", np.full((5, 8), np.nan, np.float32))
    nan = base[:4] + [str(tmp_path / "nan.npy")] + base[5:]
    assert cli.main(nan + ["--config", json.dumps({"clustering": {"device": "cpu"}})]) == 1
    assert "nan.npy' hold non-finite values" in capsys.readouterr().err
    assert cli.main(base + ["--config", json.dumps({"clustering": {"refine": "superpixel"}})]) == 1
    assert "clustering.refine" in capsys.readouterr().err


def test_prefetch_keeps_order_and_raises_reader_errors():
    from umtfss.stores import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(broken()))
    # leaving early stops the reader thread
    consumer = prefetch(iter(range(1000)))
    assert next(consumer) == 0
    consumer.close()


def test_background_writer_writes_what_zarr_writes(tmp_path):
    """The parallel direct chunk writer produces the same chunk files as zarr's own setitem."""
    from umtfss.stores import BackgroundWriter, create_label_store

    data = np.random.default_rng(0).normal(size=(5, 4, 3, 6)).astype(np.float16)
    reference = create_embedding_store(tmp_path / "a.zarr", 5, (4, 3), 6, "float16", {})
    reference["features"][:] = data
    fast = create_embedding_store(tmp_path / "b.zarr", 5, (4, 3), 6, "float16", {})
    writer = BackgroundWriter(fast["features"], threads=3)
    assert writer.folder is not None  # the direct path is taken
    writer.put(0, data[:2])
    writer.put(2, data[2:])
    writer.close()
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["features"][:], data)
    for i in range(5):
        key = f"features/c/{i}/0/0/0"
        assert (tmp_path / "b.zarr" / key).read_bytes() == (tmp_path / "a.zarr" / key).read_bytes()
    labels = create_label_store(tmp_path / "l.zarr", 2, (4, 3), {})["labels"]
    writer = BackgroundWriter(labels)
    writer.put(0, np.arange(24, dtype=np.int16).reshape(2, 4, 3))
    writer.close()
    np.testing.assert_array_equal(labels[:], np.arange(24).reshape(2, 4, 3))
    writer = BackgroundWriter(labels)
    writer.put(1, np.zeros((2, 4, 3), np.int16))  # past the end
    with pytest.raises(ValueError, match="does not fit"):
        writer.close()


def test_background_writer_waits_for_ready_before_it_reads_a_block(tmp_path):
    """embed hands over tensors whose device copy may still run: `ready` is called (on the writer's
    thread) before the block is read, and its error reaches close()."""
    import torch

    from umtfss.stores import BackgroundWriter

    data = np.random.default_rng(1).normal(size=(3, 4, 3, 6)).astype(np.float16)
    group = create_embedding_store(tmp_path / "r.zarr", 3, (4, 3), 6, "float16", {})
    block = torch.zeros(3, 4, 3, 6, dtype=torch.float16)  # filled only when "the copy lands"
    calls = []

    def land():
        calls.append(threading.current_thread().name)
        block.copy_(torch.from_numpy(data))

    writer = BackgroundWriter(group["features"], threads=2)
    writer.put(0, block, land)
    writer.close()
    np.testing.assert_array_equal(group["features"][:], data)
    assert calls and calls[0] != threading.current_thread().name

    def broken():
        raise RuntimeError("device copy failed")

    writer = BackgroundWriter(group["features"])
    writer.put(0, block, broken)
    with pytest.raises(RuntimeError, match="device copy failed"):
        writer.close()


def test_parallel_chunk_reader_reads_what_zarr_reads(tmp_path, monkeypatch):
    """read_images (threads decoding chunk files) equals zarr's read, and names a missing or bad chunk."""
    from umtfss import stores

    data = np.random.default_rng(0).normal(size=(6, 4, 3, 5)).astype(np.float16)
    group = create_embedding_store(tmp_path / "e.zarr", 6, (4, 3), 5, "float16", {})
    group["features"][:5] = data[:5]  # image 5 never written: no chunk file
    features = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")["features"]
    zarr_reads = []
    original_getitem = type(features).__getitem__
    monkeypatch.setattr(type(features), "__getitem__", lambda self, key: zarr_reads.append(key) or original_getitem(self, key))
    block = stores.read_images(features, 1, 5)
    assert zarr_reads == []  # the direct path was taken
    np.testing.assert_array_equal(block, data[1:5])
    np.testing.assert_array_equal(block, original_getitem(features, slice(1, 5)))
    # zarr would read the lost chunk as zeros, which pass for features; the reader refuses it
    with pytest.raises(ValueError, match=r"chunk file .*features/c/5/0/0/0.* \(image 5 of the store\) is missing"):
        stores.read_images(features, 1, 6)
    (tmp_path / "e.zarr" / "features" / "c" / "2" / "0" / "0" / "0").write_bytes(b"not blosc")
    with pytest.raises(ValueError, match=r"chunk file .*features/c/2/0/0/0.* is corrupt"):
        stores.read_images(features, 0, 6)
    # another layout (several images per chunk) goes through zarr
    other = zarr.open_group(str(tmp_path / "o.zarr"), mode="w").create_array("x", shape=(6, 2), chunks=(3, 2), dtype="int16")
    other[:] = np.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(stores.read_images(other, 2, 5), np.arange(4, 10).reshape(3, 2))


def test_chunk_reader_works_in_a_forked_child(tmp_path):
    """A DataLoader worker is a fork: the parent's decoding threads are gone there, the reader makes new ones."""
    import multiprocessing

    from umtfss import stores

    data = np.random.default_rng(1).normal(size=(4, 3, 3, 2)).astype(np.float16)
    group = create_embedding_store(tmp_path / "e.zarr", 4, (3, 3), 2, "float16", {})
    group["features"][:] = data
    features = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")["features"]
    np.testing.assert_array_equal(stores.read_images(features, 0, 4), data)  # the parent's pool exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(stores.read_images, (features, 0, 4)).get(timeout=60)
    np.testing.assert_array_equal(child, data)


def test_a_store_that_lost_a_chunk_or_a_repeated_shard_is_refused(tmp_path):
    """fit, assign, episodes and quality read stores through these readers: a lost chunk file or a shard given
    twice must stop them, not become an image of zeros or count its images twice."""
    import shutil

    store_path = write_store(tmp_path / "e.zarr")
    with pytest.raises(ValueError, match="more than once"):
        EmbeddingStore([store_path, store_path])
    shutil.rmtree(store_path / "features" / "c" / "3")
    store = EmbeddingStore(store_path)
    with pytest.raises(ValueError, match=r"features/c/3/0/0/0.* is missing"):
        store.features(3)
    with pytest.raises(ValueError, match="is missing"):
        assign_shard(store_path, random_centroids(), tmp_path / "l.zarr", device="cpu", progress=False)
    assert not (tmp_path / "l.zarr").exists()


def test_cli_refuses_an_output_that_is_an_input_or_a_folder_of_files(tmp_path, capsys):
    store_path = write_store(tmp_path / "e.zarr")
    np.save(tmp_path / "c.npy", random_centroids())
    config = json.dumps({"clustering": {"device": "cpu"}})
    before = sorted(p.relative_to(store_path) for p in store_path.rglob("*"))
    argv = ["assign", "--config", config, "--embeddings", str(store_path), "--centroids", str(tmp_path / "c.npy")]
    assert cli.main(argv + ["--out", str(store_path)]) == 1
    assert f"--out '{store_path}' is also --embeddings" in capsys.readouterr().err
    assert cli.main(argv + ["--out", str(tmp_path / "l.zarr"), "--batch-images", "0"]) == 1
    assert "--batch-images is 0, expected 1 or more" in capsys.readouterr().err
    assert sorted(p.relative_to(store_path) for p in store_path.rglob("*")) == before
    mine = tmp_path / "mine"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert cli.main(argv + ["--out", str(mine)]) == 1
    assert "without 'labels/zarr.json'" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep"


def test_a_damaged_metadata_file_is_named_by_every_stage(tmp_path):
    """zarr's JSON error does not say which file; the store readers (every stage) name it."""
    store_path = write_store(tmp_path / "e.zarr")
    metadata = store_path / "features" / "zarr.json"
    metadata.write_text(metadata.read_text()[:40])
    with pytest.raises(ValueError, match=r"features/zarr.json' is not valid JSON .* embedding store"):
        EmbeddingStore(store_path)


def test_an_embedding_store_is_never_replaced_by_labels(tmp_path, capsys):
    """atomic_path replaces any folder with a zarr.json: an embedding store given as --out by mistake
    (another shard than --embeddings) must be refused, not overwritten with labels."""
    store_path = write_store(tmp_path / "shard-0.zarr")
    other = write_store(tmp_path / "shard-1.zarr", seed=3)
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    np.save(tmp_path / "c.npy", random_centroids())
    argv = ["assign", "--config", json.dumps({"clustering": {"device": "cpu"}}), "--embeddings", str(store_path),
            "--centroids", str(tmp_path / "c.npy"), "--out", str(other)]
    assert cli.main(argv) == 1
    assert f"output '{other}' is an embedding store, not a label store" in capsys.readouterr().err
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before
    assert EmbeddingStore(other).dim == 8
    # an earlier label store at the path is replaced, as before
    labels = tmp_path / "labels.zarr"
    assert cli.main(argv[:-1] + [str(labels)]) == 0 and cli.main(argv[:-1] + [str(labels)]) == 0


def test_outputs_under_a_file_and_centroids_that_are_a_folder_are_one_line(tmp_path, capsys):
    store_path = write_store(tmp_path / "e.zarr")
    np.save(tmp_path / "c.npy", random_centroids())
    (tmp_path / "a-file").write_text("keep")
    argv = ["assign", "--config", json.dumps({"clustering": {"device": "cpu"}}), "--embeddings", str(store_path)]
    assert cli.main(argv + ["--centroids", str(tmp_path / "c.npy"), "--out", str(tmp_path / "a-file" / "l.zarr")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("umtfss assign: error: --out ") and f"'{tmp_path / 'a-file'}' is a file" in err
    assert "Traceback" not in err and (tmp_path / "a-file").read_text() == "keep"
    assert cli.main(argv + ["--centroids", str(tmp_path), "--out", str(tmp_path / "l.zarr")]) == 1
    assert f"centroids file '{tmp_path}' is a folder" in capsys.readouterr().err


def test_a_fit_json_of_other_centroids_is_said(tmp_path, capsys):
    """With a stale fit.json beside the centroids (a fit killed between its outputs) the embedding check
    cannot run: assign says so instead of passing silently."""
    from umtfss.clustering.fit import fit_centroids, write_fit

    fitted = write_store(tmp_path / "fitted.zarr")
    centroids, meta = fit_centroids([fitted], 3, subset_pixels=100, iterations=3, device="cpu", progress=False)
    write_fit(centroids, meta, tmp_path / "fit" / "centroids.npy", tmp_path / "fit" / "fit.json")
    assign_shard(fitted, tmp_path / "fit" / "centroids.npy", tmp_path / "l.zarr", device="cpu", progress=False)
    assert "warning" not in capsys.readouterr().err
    np.save(tmp_path / "fit" / "centroids.npy", random_centroids(clusters=3))
    assign_shard(fitted, tmp_path / "fit" / "centroids.npy", tmp_path / "l.zarr", device="cpu", progress=False)
    assert "fit.json' records other centroids than" in capsys.readouterr().err


def test_a_centroids_file_that_is_no_npy_is_named(tmp_path):
    """A text, empty or truncated file given as centroids: one ValueError naming it, not numpy's pickle or EOF error."""
    from umtfss.clustering.assign import load_centroids

    (tmp_path / "text.npy").write_text("0.1 0.2\n0.3 0.4\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "whole.npy", np.eye(3, dtype=np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:140])
    for name, said in (("text.npy", "no NumPy header"), ("empty.npy", "empty"), ("cut.npy", "truncated")):
        with pytest.raises(ValueError, match=f"centroids file '.*{name}' is .*{said}"):
            load_centroids(tmp_path / name)
    assert load_centroids(tmp_path / "whole.npy").shape == (3, 3)
