"""Tests of the embed stage and the embedding store: layout, attributes, sharding, errors, atomicity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image

from umtfss import devices, embedding
from umtfss.stores import EmbeddingStore
from umtfss.embedding import embed_shard, random_projection, shard_rows


class StandInBackbone(torch.nn.Module):
    """A tiny FeatureBackbone: fixed random convs, 'layer3' (stride 4, 12 ch) and 'layer4' (stride 8, 16 ch)."""

    name = "stand-in"
    channels = {"layer3": 12, "layer4": 16}
    strides = {"layer3": 4, "layer4": 8}
    mid_layers = ("layer3",)
    high_layer = "layer4"
    embed_layer = "layer4"
    checkpoint_sha256 = None

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv3 = torch.nn.Conv2d(3, 12, 4, stride=4)
        self.conv4 = torch.nn.Conv2d(12, 16, 3, stride=2, padding=1)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        layer3 = torch.relu(self.conv3(x))
        return {"layer3": layer3, "layer4": self.conv4(layer3)}


def make_images(root, sizes, seed=0):
    """Random-content images of the given (h, w) sizes and their images.parquet-like table."""
    rng = np.random.default_rng(seed)
    rows = []
    for number, (h, w) in enumerate(sizes):
        path = root / f"img{number:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append({"image_id": f"img{number:03d}", "split": "train", "image_path": str(path), "height": h, "width": w})
    rows.append({"image_id": "valimg", "split": "val", "image_path": str(root / "missing.png"), "height": 1, "width": 1})
    return pd.DataFrame(rows)


SIZES = [(40, 64), (64, 30), (64, 64), (20, 50), (50, 33)]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    frame = make_images(root, SIZES)
    frame.to_parquet(root / "images.parquet")
    return root / "images.parquet"


def test_store_layout_and_attributes(table, tmp_path):
    out = tmp_path / "shard-0-of-1.zarr"
    embed_shard(table, 0, 1, out, StandInBackbone(), layer="layer4", image_size=64, dtype="float16",
                batch_size=2, device="cpu", workers=0, progress=False)
    group = zarr.open_group(str(out), mode="r")
    features = group["features"]
    assert features.shape == (5, 8, 8, 16) and features.chunks == (1, 8, 8, 16)
    assert features.dtype == np.float16
    assert "blosc" in str(features.compressors).lower() and "zstd" in str(features.compressors).lower()
    attrs = dict(group.attrs)
    assert attrs["image_ids"] == [f"img{i:03d}" for i in range(5)]  # val image excluded
    for key, value in {"backbone": "stand-in", "layer": "layer4", "stride": 8, "image_size": 64, "dim": 16,
                       "dtype": "float16", "shard": 0, "num_shards": 1, "checkpoint_sha256": None}.items():
        assert attrs[key] == value, key
    assert "preprocessing" in attrs and "umtfss_version" in attrs
    # valid extents: resized so the longer side is 64, then ceil(extent / stride)
    expected = []
    for h, w in SIZES:
        scale = 64 / max(h, w)
        expected.append([math.ceil(round(h * scale) / 8), math.ceil(round(w * scale) / 8)])
    np.testing.assert_array_equal(group["valid"][:], expected)
    np.testing.assert_array_equal(group["sizes"][:], SIZES)
    store = EmbeddingStore([out])
    assert len(store) == 5 and store.grid == (8, 8) and store.dim == 16
    norms = np.linalg.norm(store.features(2).astype(np.float32), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    assert store.valid(1) == tuple(expected[1])


def test_features_match_direct_forward(table, tmp_path):
    """The stored features are the backbone's layer on the resize-padded image, L2-normalised."""
    from umtfss.transforms import resize_pad

    backbone = StandInBackbone()
    out = tmp_path / "s.zarr"
    embed_shard(table, 0, 1, out, backbone, layer="layer3", image_size=64, dtype="float32",
                batch_size=3, device="cpu", workers=0, progress=False)
    store = EmbeddingStore(out)
    image = np.array(Image.open(pd.read_parquet(table)["image_path"][3]).convert("RGB"))
    x, _, _ = resize_pad(image, None, 64)
    direct = backbone(x[None])["layer3"][0].permute(1, 2, 0)
    direct = torch.nn.functional.normalize(direct, dim=-1).numpy()
    np.testing.assert_allclose(store.features(3), direct, atol=1e-5)
    assert store.attrs["layer"] == "layer3" and store.attrs["stride"] == 4


@pytest.mark.parametrize("workers", [0, 1])
def test_resize_on_the_device_stores_what_the_workers_store(table, tmp_path, workers):
    """On a GPU the workers only decode and the device resize-pads (resize_on_device, the default there);
    forced on the CPU it must store exactly what worker-side resizing stores."""
    backbone = StandInBackbone()
    stores = {}
    for on_device in (False, True):
        out = tmp_path / f"device-{on_device}.zarr"
        embed_shard(table, 0, 1, out, backbone, image_size=64, dtype="float32", batch_size=2, device="cpu",
                    workers=workers, progress=False, resize_on_device=on_device)
        stores[on_device] = zarr.open_group(str(out), mode="r")
    for name in ("features", "valid", "sizes"):
        np.testing.assert_array_equal(stores[True][name][:], stores[False][name][:])
    assert dict(stores[True].attrs) == dict(stores[False].attrs)


def test_cpu_bfloat16_forward_is_recorded_and_close_to_float32(table, tmp_path, monkeypatch, capsys):
    """embedding.cpu_precision bfloat16: the backbone's convolutions run in bfloat16 on channels-last
    input, the features stay within bfloat16 rounding of the float32 ones, and the store says which ran."""
    seen = []
    stores = {}
    for precision in ("float32", "bfloat16"):
        backbone = StandInBackbone()
        backbone.conv3.register_forward_hook(lambda module, inputs, output: seen.append(
            (output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))
            if len(inputs[0]) == len(SIZES) else None)  # the batch, not embed's one-image shape probe
        out = tmp_path / f"{precision}.zarr"
        embed_shard(table, 0, 1, out, backbone, image_size=64, dtype="float32", batch_size=5, device="cpu",
                    workers=0, progress=False, cpu_precision=precision)
        stores[precision] = EmbeddingStore(out)
    assert seen == [(torch.float32, False), (torch.bfloat16, True)]
    assert stores["float32"].attrs["forward_precision"] == "float32"
    assert stores["bfloat16"].attrs["forward_precision"] == "bfloat16 autocast, channels-last (CPU)"
    for index in range(len(SIZES)):
        reference, lowered = stores["float32"].features(index), stores["bfloat16"].features(index)
        assert not np.array_equal(reference, lowered)
        assert (reference * lowered).sum(-1).min() > 0.99  # unit vectors: the cosine
    monkeypatch.setattr(devices, "cpu_bfloat16_native", lambda: False)
    embed_shard(table, 0, 1, tmp_path / "emulated.zarr", StandInBackbone(), image_size=64, batch_size=5,
                device="cpu", workers=0, progress=False, cpu_precision="bfloat16")
    assert "no bfloat16 units" in capsys.readouterr().err
    with pytest.raises(ValueError, match="embedding.cpu_precision.*'half'.*float32, bfloat16"):
        embed_shard(table, 0, 1, tmp_path / "bad.zarr", StandInBackbone(), image_size=64, device="cpu",
                    workers=0, progress=False, cpu_precision="half")
    assert not (tmp_path / "bad.zarr").exists()


def test_two_shards_equal_one(table, tmp_path):
    backbone = StandInBackbone()
    whole = tmp_path / "whole.zarr"
    embed_shard(table, 0, 1, whole, backbone, image_size=64, dtype="float16", batch_size=4, device="cpu",
                workers=1, progress=False)
    parts = [tmp_path / f"shard-{i}-of-2.zarr" for i in range(2)]
    for i, part in enumerate(parts):
        embed_shard(table, i, 2, part, backbone, image_size=64, dtype="float16", batch_size=2, device="cpu",
                    workers=0, progress=False)
    one, two = EmbeddingStore(whole), EmbeddingStore(parts)
    assert [len(EmbeddingStore(p)) for p in parts] == [3, 2]  # np.array_split: contiguous, sizes differ by <= 1
    assert two.image_ids == one.image_ids
    for index, image_id in enumerate(one.image_ids):
        # equal up to float16 rounding: batch composition changes the BLAS summation order
        np.testing.assert_allclose(two.features(two.image_ids.index(image_id)), one.features(index), atol=1e-3)
        assert two.valid(index) == one.valid(index)
    batches = list(two.iter_batches(2))
    assert [list(r) for r, _, _ in batches] == [[0, 1], [2], [3, 4]]  # never across a shard boundary
    np.testing.assert_allclose(batches[2][1][1], one.features(4), atol=1e-3)


def test_projection_stored_and_orthonormal(table, tmp_path):
    out = tmp_path / "p.zarr"
    embed_shard(table, 0, 1, out, StandInBackbone(), image_size=64, dtype="float32", dim=5, batch_size=5,
                device="cpu", workers=0, progress=False)
    store = EmbeddingStore(out)
    assert store.dim == 5 and store.attrs["dim"] == 5 and store.attrs["input_dim"] == 16
    projection = store.projection
    np.testing.assert_allclose(projection.T @ projection, np.eye(5), atol=1e-5)
    np.testing.assert_array_equal(projection, random_projection(16, 5).numpy())  # same matrix in every shard
    np.testing.assert_allclose(np.linalg.norm(store.features(0), axis=-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="embedding.dim"):
        random_projection(16, 17)


def test_unreadable_image_names_its_path(tmp_path):
    frame = make_images(tmp_path, [(32, 32), (32, 32)])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    frame.loc[1, "image_path"] = str(bad)
    for workers in (0, 1):
        out = tmp_path / f"bad{workers}.zarr"
        with pytest.raises(ValueError, match="broken.jpg"):
            embed_shard(frame, 0, 1, out, StandInBackbone(), image_size=32, batch_size=1, device="cpu",
                        workers=workers, progress=False)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f"bad{workers}")]  # no temp left either


def test_killed_writer_leaves_no_store_and_rerun_works(table, tmp_path, monkeypatch):
    out = tmp_path / "shard-0-of-1.zarr"
    real = embedding.pixel_features
    calls = {"n": 0}

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding, "pixel_features", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_shard(table, 0, 1, out, StandInBackbone(), image_size=64, batch_size=2, device="cpu",
                    workers=0, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(embedding, "pixel_features", real)
    embed_shard(table, 0, 1, out, StandInBackbone(), image_size=64, batch_size=2, device="cpu", workers=0,
                progress=False)
    assert len(EmbeddingStore(out)) == 5


def test_shard_rows_and_table_errors(tmp_path):
    frame = pd.DataFrame({"image_id": ["c", "a", "b", "d"], "split": ["train"] * 4, "image_path": ["x"] * 4})
    assert list(shard_rows(frame, 0, 3)["image_id"]) == ["a", "b"]
    assert list(shard_rows(frame, 2, 3)["image_id"]) == ["d"]
    assert list(shard_rows(frame, 0, 1, image_filter={"d", "a"})["image_id"]) == ["a", "d"]
    with pytest.raises(ValueError, match=r"not in split 'train'.*'zz'"):
        shard_rows(frame, 0, 1, image_filter={"a", "zz"})
    assert len(shard_rows(frame, 5, 6)) == 0
    with pytest.raises(ValueError, match="no image in split 'test'; its splits are train"):
        shard_rows(frame, 0, 1, split="test")
    with pytest.raises(ValueError, match="shard 3 of 3"):
        shard_rows(frame, 3, 3)
    with pytest.raises(ValueError, match="image_path"):
        embedding.load_image_table(frame.drop(columns="image_path"))
    with pytest.raises(FileNotFoundError, match="nothing.parquet"):
        embedding.load_image_table(tmp_path / "nothing.parquet")


def test_the_default_layer_falls_back_to_the_embed_layer_and_another_missing_one_stops(table, tmp_path, capsys):
    from umtfss.backbones import build_backbone

    demo = build_backbone("demo-colortexture")  # no layer4: the schema default means its own layer
    assert embedding.resolve_layer(demo, "layer4") == demo.embed_layer == "features"
    assert "no layer 'layer4' (the default of embedding.layer)" in capsys.readouterr().err
    out = tmp_path / "f.zarr"
    with pytest.raises(ValueError, match=r"config key 'embedding.layer' is 'last', but backbone 'stand-in' has "
                                         r"layers layer3, layer4; expected one of them"):
        embed_shard(table, 0, 1, out, StandInBackbone(), layer="last", image_size=64, batch_size=5, device="cpu",
                    workers=0, progress=False)
    assert not out.exists()


def test_store_reader_errors(tmp_path, table):
    with pytest.raises(FileNotFoundError, match="nowhere.zarr"):
        EmbeddingStore([tmp_path / "nowhere.zarr"])
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    embed_shard(table, 0, 2, a, StandInBackbone(), image_size=64, batch_size=5, device="cpu", workers=0, progress=False)
    embed_shard(table, 1, 2, b, StandInBackbone(), layer="layer3", image_size=64, batch_size=5, device="cpu",
                workers=0, progress=False)
    with pytest.raises(ValueError, match="layer"):
        EmbeddingStore([a, b])


def test_more_shards_than_images_gives_empty_but_valid_stores(table, tmp_path):
    out = tmp_path / "shard-6-of-7.zarr"
    embed_shard(table, 6, 7, out, StandInBackbone(), image_size=64, batch_size=2, device="cpu", workers=0,
                progress=False)
    store = EmbeddingStore(out)
    assert len(store) == 0 and store.grid == (8, 8) and list(store.iter_batches(4)) == []


def test_a_bad_checkpoint_names_the_embedding_key(table, tmp_path, capsys):
    """A folder given as embedding.checkpoint: the stage's one error line names the config key."""
    import json

    from umtfss.cli import main

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "resnet50.pth").write_bytes(b"")
    config = json.dumps({"embedding": {"backbone": "resnet50-imagenet", "checkpoint": str(tmp_path / "weights")}})
    assert main(["embed", "--config", config, "--images", str(table), "--shard", "0", "--num-shards", "1",
                 "--out", str(tmp_path / "out.zarr")]) != 0
    err = capsys.readouterr().err
    assert "'embedding.checkpoint' is" in err and "a folder (it holds resnet50.pth)" in err, err
    assert not (tmp_path / "out.zarr").exists()


def test_embed_never_replaces_another_kind_of_store(table, tmp_path):
    """--out given a label store (a Zarr store, but not embeddings): refused before any work, left whole."""
    from umtfss.stores import create_label_store

    labels = tmp_path / "labels.zarr"
    create_label_store(labels, 2, (3, 3), attrs={"clusters": 4})
    with pytest.raises(ValueError, match="without 'features/zarr.json'"):
        embed_shard(table, 0, 1, labels, StandInBackbone(), image_size=64, device="cpu", progress=False)
    assert (labels / "labels" / "zarr.json").is_file()
