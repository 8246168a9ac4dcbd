"""Backbone registry and checkpoint loading, on checkpoint files written here in each published format."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from umtfss.backbones import FeatureBackbone, build_backbone, freeze, list_backbones
from umtfss.backbones.checkpoints import (
    load_into,
    load_state_dict,
    resolve_checkpoint,
    sha256_file,
    unwrap_state_dict,
)
from umtfss.backbones.vit import DINO_ARCHS, build_dino_vit, convert_dino_checkpoint

torch.set_num_threads(1)

REGISTERED = {
    "resnet50-imagenet",
    "resnet50-mocov2",
    "resnet50-deepstem",
    "dino-vits8",
    "dino-vits16",
    "dino-vitb8",
    "dino-vitb16",
    "demo-colortexture",
}


@pytest.fixture(scope="module")
def resnet50_weights():
    """A randomly initialised torchvision ResNet-50 state dict, classifier included (as published)."""
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).state_dict()


def _assert_weights_equal(module: nn.Module, expected: dict[str, torch.Tensor]):
    loaded = module.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def _body(weights):
    return {k: v for k, v in weights.items() if not k.startswith("fc.")}


def test_registry_lists_every_name_and_rejects_unknown():
    assert set(list_backbones()) == REGISTERED
    with pytest.raises(ValueError, match="resnet50-imagenet"):
        build_backbone("resnet101-imagenet", random_init=True)
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet50-imagenet", output_stride=4, random_init=True)


def test_torchvision_checkpoint_loads_exactly(tmp_path, resnet50_weights):
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(resnet50_weights, path)
    backbone = build_backbone("resnet50-imagenet", checkpoint=path)
    _assert_weights_equal(backbone.net, _body(resnet50_weights))
    assert backbone.checkpoint_sha256 == sha256_file(path)


def test_mocov2_checkpoint_loads_query_encoder(tmp_path, resnet50_weights):
    state = {f"module.encoder_q.{k}": v for k, v in _body(resnet50_weights).items()}
    state.update(
        {
            "module.encoder_q.fc.0.weight": torch.randn(16, 2048),
            "module.encoder_q.fc.0.bias": torch.randn(16),
            "module.encoder_q.fc.2.weight": torch.randn(8, 16),
            "module.encoder_q.fc.2.bias": torch.randn(8),
            # the key encoder differs from the query encoder and must not be loaded
            "module.encoder_k.conv1.weight": torch.zeros(64, 3, 7, 7),
            "module.queue": torch.randn(8, 32),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long),
        }
    )
    checkpoint = {
        "epoch": 800,
        "arch": "resnet50",
        "state_dict": state,
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.randn(4)}},
            "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}],
        },
    }
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(checkpoint, path)
    backbone = build_backbone("resnet50-mocov2", checkpoint=path, output_stride=16)
    _assert_weights_equal(backbone.net, _body(resnet50_weights))

    torch.save(resnet50_weights, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="encoder_q"):
        build_backbone("resnet50-mocov2", checkpoint=tmp_path / "plain.pth")


def test_dino_release_loads_through_the_registry_at_full_size(tmp_path):
    torch.manual_seed(1)
    published = build_dino_vit("dino-vits16").state_dict()
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(published, path)
    backbone = build_backbone("dino-vits16", checkpoint=path)
    _assert_weights_equal(backbone, published)
    features = backbone(torch.rand(1, 3, 64, 48))
    assert features["last"].shape == (1, 384, 4, 3)


def test_dino_training_checkpoint_uses_teacher_and_strips_prefixes(tmp_path):
    torch.manual_seed(2)
    teacher = build_dino_vit("dino-vits16", depth=2).state_dict()
    student = build_dino_vit("dino-vits16", depth=2).state_dict()
    checkpoint = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, "head.last_layer.weight": torch.randn(4, 8)},
        "student": {f"module.backbone.{k}": v for k, v in student.items()},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),  # as DINO's main_dino.py saves it
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    model = build_dino_vit("dino-vits16", depth=2)
    load_into(model, convert_dino_checkpoint(load_state_dict(path), path), path)
    _assert_weights_equal(model, teacher)

    student_only = {"student": checkpoint["student"]}
    model = build_dino_vit("dino-vits16", depth=2)
    load_into(model, convert_dino_checkpoint(student_only, path), path)
    _assert_weights_equal(model, student)


@pytest.mark.parametrize("name", sorted(DINO_ARCHS))
def test_dino_names_build_the_published_sizes(name):
    dim, depth, heads, patch = DINO_ARCHS[name]
    with torch.device("meta"):  # shapes only: no memory, no time
        backbone = build_backbone(name, random_init=True)
    assert (dim, depth, heads, patch) == {
        "dino-vits8": (384, 12, 6, 8),
        "dino-vits16": (384, 12, 6, 16),
        "dino-vitb8": (768, 12, 12, 8),
        "dino-vitb16": (768, 12, 12, 16),
    }[name]
    assert len(backbone.blocks) == depth and backbone.blocks[0].attn.heads == heads
    assert backbone.pos_embed.shape == (1, 1 + (224 // patch) ** 2, dim)
    assert backbone.patch_embed.proj.weight.shape == (dim, 3, patch, patch)
    assert backbone.blocks[0].attn.qkv.weight.shape == (3 * dim, dim)
    assert backbone.blocks[0].mlp.fc1.weight.shape == (4 * dim, dim)
    assert backbone.channels == {"last": dim} and backbone.strides == {"last": patch}


def _pspnet_resnet50_v2(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict laid out as PSPNet's resnet50_v2.pth (the reference code's initmodel), written by hand
    from a torchvision one: three 3x3 stem convs 3-64-64-128, layer1 taking 128 channels, the classifier
    kept, and no BatchNorm batch counters (the file predates them)."""
    generator = torch.Generator().manual_seed(3)
    published = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    for index, (cin, cout) in enumerate([(3, 64), (64, 64), (64, 128)], start=1):
        published[f"conv{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=generator) * 0.1
        published[f"bn{index}.weight"] = torch.rand(cout, generator=generator) + 0.5
        published[f"bn{index}.bias"] = torch.randn(cout, generator=generator) * 0.1
        published[f"bn{index}.running_mean"] = torch.randn(cout, generator=generator) * 0.1
        published[f"bn{index}.running_var"] = torch.rand(cout, generator=generator) + 0.5
    published["layer1.0.conv1.weight"] = torch.randn(64, 128, 1, 1, generator=generator) * 0.1
    published["layer1.0.downsample.0.weight"] = torch.randn(256, 128, 1, 1, generator=generator) * 0.1
    return published


def test_deepstem_checkpoint_of_the_reference_code_loads_and_runs_its_stem(tmp_path, resnet50_weights):
    published = _pspnet_resnet50_v2(resnet50_weights)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(published, path)
    backbone = build_backbone("resnet50-deepstem", checkpoint=path)
    loaded = backbone.net.state_dict()
    for key, value in _body(published).items():
        assert torch.equal(loaded[key], value), key
    assert backbone.checkpoint_sha256 == sha256_file(path)
    assert [backbone.strides[f"layer{i}"] for i in range(1, 5)] == [4, 8, 8, 8]

    images = torch.rand(1, 3, 41, 41)
    x = (images - backbone.pixel_mean) / backbone.pixel_std
    for index, stride in ((1, 2), (2, 1), (3, 1)):  # the stem written out from the checkpoint's tensors
        x = F.conv2d(x, published[f"conv{index}.weight"], stride=stride, padding=1)
        x = F.batch_norm(x, published[f"bn{index}.running_mean"], published[f"bn{index}.running_var"],
                         published[f"bn{index}.weight"], published[f"bn{index}.bias"], training=False)
        x = F.relu(x)
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    with torch.no_grad():
        features = backbone(images)
        assert torch.allclose(backbone.stem((images - backbone.pixel_mean) / backbone.pixel_std), x, atol=1e-5)
        assert torch.allclose(features["layer1"], backbone.net.layer1(x), atol=1e-5)
    assert features["layer4"].shape == (1, 2048, 6, 6) and features["layer2"].shape == (1, 512, 6, 6)


def test_deepstem_needs_a_local_checkpoint_and_refuses_a_7x7_one(tmp_path, resnet50_weights):
    with pytest.raises(ValueError, match=r"resnet50-deepstem.*no download URL.*resnet50_v2\.pth.*'checkpoint'"):
        build_backbone("resnet50-deepstem")
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(resnet50_weights, path)
    with pytest.raises(ValueError) as caught:
        build_backbone("resnet50-deepstem", checkpoint=path)
    message = str(caught.value)
    assert "missing keys: conv2.weight" in message
    assert "conv1.weight (64, 3, 7, 7) vs (64, 3, 3, 3)" in message


def test_checkpoints_without_batchnorm_counters_load(tmp_path, resnet50_weights):
    """Files saved before PyTorch 0.4.1 have no num_batches_tracked; the counter is no weight."""
    old = {k: v for k, v in resnet50_weights.items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(resnet50_weights)
    path = tmp_path / "old.pth"
    torch.save(old, path)
    backbone = build_backbone("resnet50-imagenet", checkpoint=path)
    _assert_weights_equal(backbone.net, _body(resnet50_weights))
    broken = dict(old)
    del broken["layer1.0.bn1.running_var"]  # a real statistic stays required
    torch.save(broken, path)
    with pytest.raises(ValueError, match="missing keys: layer1.0.bn1.running_var"):
        build_backbone("resnet50-imagenet", checkpoint=path)


def test_wrong_architecture_lists_missing_and_misshapen_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError) as caught:
        build_backbone("resnet50-imagenet", checkpoint=path)
    message = str(caught.value)
    assert str(path) in message
    assert "missing keys: layer1.0.conv3.weight" in message
    assert "wrong shape" in message and "layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in message


def test_load_into_lists_first_ten_keys_with_counts():
    module = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    state = {f"extra.{i}": torch.zeros(1) for i in range(3)}
    with pytest.raises(ValueError) as caught:
        load_into(module, state, "some/file.pth")
    message = str(caught.value)
    assert "'some/file.pth'" in message
    assert "30 missing keys: 0.weight, 0.bias" in message and "(20 more)" in message
    assert "3 unexpected keys: extra.0, extra.1, extra.2" in message
    assert "14.bias" not in message  # only the first ten are listed


def test_corrupt_and_truncated_files_raise_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="garbage.pth.*could not be read"):
        load_state_dict(garbage)
    whole = tmp_path / "whole.pth"
    torch.save({"w": torch.randn(256, 256)}, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth.*could not be read"):
        build_backbone("dino-vits16", checkpoint=truncated)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_backbone("resnet50-imagenet", checkpoint=tmp_path / "absent.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a dict"):
        load_state_dict(tmp_path / "list.pth")


def test_unsafe_pickles_are_refused(tmp_path):
    path = tmp_path / "pickled_module.pth"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a pickled object, not tensors
    with pytest.raises(ValueError, match="pickled_module.pth"):
        load_state_dict(path)


def test_sha256_is_verified_by_full_digest_or_prefix(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(3)}, path)
    digest = sha256_file(path)
    assert resolve_checkpoint(path, None, digest, tmp_path) == path
    assert resolve_checkpoint(path, None, digest[:8].upper(), tmp_path) == path
    wrong = "0" * 64
    with pytest.raises(ValueError) as caught:
        resolve_checkpoint(path, None, wrong, tmp_path)
    assert str(path) in str(caught.value) and wrong in str(caught.value) and digest in str(caught.value)
    with pytest.raises(ValueError, match="hexadecimal"):
        resolve_checkpoint(path, None, "not-a-digest", tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        build_backbone("dino-vits16", checkpoint=path, checkpoint_sha256=wrong)


def test_url_is_downloaded_once_into_the_cache(tmp_path):
    source = tmp_path / "served" / "model.pth"
    source.parent.mkdir()
    torch.save({"w": torch.arange(5.0)}, source)
    cache = tmp_path / "cache"
    cached = resolve_checkpoint(None, source.as_uri(), sha256_file(source), cache)
    assert cached == cache / "model.pth" and cached.read_bytes() == source.read_bytes()
    source.unlink()  # the second call must not need the source any more
    assert resolve_checkpoint(None, source.as_uri(), None, cache) == cached
    with pytest.raises(ValueError, match="could not download.*checkpoint path"):
        resolve_checkpoint(None, (tmp_path / "missing.pth").as_uri(), None, cache)
    # no partial file left behind; the hidden record names the URL the cached file came from
    assert sorted(p.name for p in cache.iterdir()) == [".model.pth.url", "model.pth"]
    with pytest.raises(ValueError, match="no checkpoint"):
        resolve_checkpoint(None, None, None, cache)


def test_the_cache_folder_follows_umtfss_cache_set_after_import(tmp_path, monkeypatch):
    source = tmp_path / "served" / "model.pth"
    source.parent.mkdir()
    torch.save({"w": torch.arange(3.0)}, source)
    monkeypatch.setenv("UMTFSS_CACHE", str(tmp_path / "late"))  # umtfss is imported already
    assert resolve_checkpoint(None, source.as_uri(), None) == tmp_path / "late" / "model.pth"


@pytest.mark.parametrize("stride", [8, 16])
def test_resnet_output_shapes_and_strides(stride):
    backbone = build_backbone("resnet50-imagenet", output_stride=stride, random_init=True)
    assert backbone.mid_layers == ("layer2", "layer3") and backbone.high_layer == "layer4"
    assert backbone.embed_layer == "layer4"
    expected_strides = {8: [4, 8, 8, 8], 16: [4, 8, 16, 16]}[stride]
    assert [backbone.strides[f"layer{i}"] for i in range(1, 5)] == expected_strides
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 64, 64))
    assert set(features) == set(backbone.channels)
    for layer, value in features.items():
        size = math.ceil(64 / backbone.strides[layer])
        assert value.shape == (2, backbone.channels[layer], size, size), layer


def test_vit_grid_is_ceil_of_input_over_patch_and_pos_embed_interpolates():
    backbone = build_backbone("dino-vits8", random_init=True)
    backbone.blocks = backbone.blocks[:1]  # the shape logic does not depend on depth
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 60, 33))
    assert features["last"].shape == (1, 384, 8, 5)
    assert torch.equal(backbone.grid_pos_embed(28, 28), backbone.pos_embed)
    with torch.no_grad():
        backbone.pos_embed[:, 1:] = 0.25  # a constant embedding stays constant when resized
    resized = backbone.grid_pos_embed(7, 5)
    assert resized.shape == (1, 36, 384)
    assert torch.allclose(resized[:, 1:], torch.full_like(resized[:, 1:], 0.25), atol=1e-5)


def test_input_is_normalised_internally():
    backbone = build_backbone("resnet50-imagenet", output_stride=32, random_init=True)
    images = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        via_forward = backbone(images)["layer4"]
        via_extract = backbone.extract((images - mean) / std)["layer4"]
    assert torch.allclose(via_forward, via_extract)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        backbone((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        backbone(torch.rand(1, 1, 32, 32))


class _Parent(nn.Module):
    """A model holding a frozen backbone and a trainable head, as the FSS model does."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(2048, 2, 1)


def test_backbone_stays_frozen_inside_a_training_parent():
    backbone = build_backbone("resnet50-imagenet", output_stride=32, random_init=True)
    assert isinstance(backbone, FeatureBackbone)
    parent = _Parent(backbone).train()
    assert parent.training and parent.head.training
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    bn = backbone.net.bn1
    before = (bn.running_mean.clone(), bn.running_var.clone())
    logits = parent.head(backbone(torch.rand(2, 3, 32, 32))["layer4"])
    logits.sum().backward()
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert parent.head.weight.grad is not None
    assert all(p.grad is None for p in backbone.parameters())


def test_freeze_guards_modules_not_derived_from_feature_backbone():
    plain = freeze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    parent = nn.ModuleDict({"backbone": plain, "head": nn.Linear(2, 2)}).train()
    assert parent["head"].training and not plain.training and not plain[1].training
    assert not any(p.requires_grad for p in plain.parameters())


def test_demo_backbone_takes_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no weights"):
        build_backbone("demo-colortexture", checkpoint=tmp_path / "x.pth")


def test_demo_backbone_is_registered_frozen():
    pytest.importorskip("umtfss.backbones.demo", reason="demo backbone module not written yet")
    backbone = build_backbone("demo-colortexture")
    assert backbone.name == "demo-colortexture" and backbone.checkpoint_sha256 is None
    nn.ModuleDict({"backbone": backbone}).train()
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_unwrap_rejects_checkpoints_without_tensors(tmp_path):
    with pytest.raises(ValueError, match="holds no tensors"):
        unwrap_state_dict({"epoch": 3, "arch": "resnet50"}, tmp_path / "meta.pth")


def test_the_published_digest_applies_when_a_config_names_the_published_url(monkeypatch):
    """configs/pascal.yaml names torchvision's URL: its published digest is still checked."""
    import umtfss.backbones as backbones

    seen = []

    def stop(checkpoint, url, sha256, cache_dir, section=None):
        seen.append((url, sha256))
        raise RuntimeError("no download in a test")

    monkeypatch.setattr(backbones, "resolve_checkpoint", stop)
    spec = backbones.backbone_spec("resnet50-imagenet")
    assert spec.sha256
    pin = "ab" * 32
    for url, sha256, expected in [(None, None, spec.sha256), (spec.url, None, spec.sha256),
                                  ("https://example.org/mine.pth", None, None), (spec.url, pin, pin)]:
        with pytest.raises(RuntimeError, match="no download"):
            backbones.build_backbone("resnet50-imagenet", checkpoint_url=url, checkpoint_sha256=sha256)
        assert seen[-1] == (url or spec.url, expected)


def test_dino_position_embedding_is_interpolated_as_dino_does():
    """DINO samples the pretrained grid at scale (n + 0.1) / sqrt(N), not at the output size."""
    torch.manual_seed(4)
    vit = build_dino_vit("dino-vits16", depth=1)
    n = vit.pretrain_grid
    grid = vit.pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    got = vit.grid_pos_embed(59, 44)
    assert got.shape == (1, 1 + 59 * 44, vit.pos_embed.shape[-1])
    dino = F.interpolate(grid, scale_factor=(59.1 / math.sqrt(n * n), 44.1 / math.sqrt(n * n)), mode="bicubic")
    torch.testing.assert_close(got[:, 1:], dino.permute(0, 2, 3, 1).reshape(1, 59 * 44, -1))
    by_size = F.interpolate(grid, size=(59, 44), mode="bicubic")
    assert not torch.allclose(dino, by_size)
    assert torch.equal(got[:, :1], vit.pos_embed[:, :1])


# --- checkpoints as a user with their own weights and URLs gives them -------------------------------


class _Served:
    """A local HTTP server for download tests: path -> (bytes sent, Content-Length announced)."""

    def __init__(self, files):
        import http.server
        import threading

        files = dict(files)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path not in files:
                    self.send_error(404)
                    return
                body, announced = files[self.path]
                self.send_response(200)
                if announced is None:  # chunked, and the connection drops inside the first chunk
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n" % (2 * len(body)) + body)
                else:
                    self.send_header("Content-Length", str(announced))
                    self.end_headers()
                    self.wfile.write(body)
                self.close_connection = True  # a transfer cut short: fewer bytes than announced

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _files(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_checksum_mismatch_on_download_keeps_nothing_in_the_cache(tmp_path):
    """A pinned digest is checked before the download enters the cache, so a rerun downloads again."""
    source = tmp_path / "served" / "moco_v2_800ep_pretrain.pth.tar"
    source.parent.mkdir()
    torch.save({"w": torch.arange(4.0)}, source)
    cache, wrong = tmp_path / "cache", "ab" * 32
    with pytest.raises(ValueError) as caught:
        resolve_checkpoint(None, source.as_uri(), wrong, cache, section="embedding")
    message = str(caught.value)
    assert source.as_uri() in message and wrong in message and sha256_file(source) in message
    assert "'embedding.checkpoint_sha256'" in message and "nothing was kept" in message
    assert _files(cache) == []
    # the right pin then downloads; a later wrong pin names the cached file and how to fetch it again
    cached = resolve_checkpoint(None, source.as_uri(), sha256_file(source), cache, section="embedding")
    with pytest.raises(ValueError, match=rf"delete '{cached}' to download .* or correct 'embedding.checkpoint_sha256'"):
        resolve_checkpoint(None, source.as_uri(), wrong, cache, section="embedding")


def test_http_download_verified_and_a_cut_transfer_refused(tmp_path):
    torch.save({"w": torch.randn(64)}, tmp_path / "w.pth")
    body = (tmp_path / "w.pth").read_bytes()
    server = _Served({"/ok/w.pth": (body, len(body)), "/cut/w.pth": (body[:100], len(body)),
                      "/chunked/w.pth": (body[:100], None)})
    try:
        cache = tmp_path / "cache"
        cached = resolve_checkpoint(None, f"{server.url}/ok/w.pth", sha256_file(tmp_path / "w.pth"), cache)
        assert cached.read_bytes() == body
        other = tmp_path / "other"
        with pytest.raises(ValueError, match=rf"stopped after 100 of {len(body)} bytes"):
            resolve_checkpoint(None, f"{server.url}/cut/w.pth", None, other)  # unpinned: the length still counts
        assert _files(other) == []
        with pytest.raises(ValueError, match=r"could not download.*IncompleteRead"):
            resolve_checkpoint(None, f"{server.url}/chunked/w.pth", None, other)
        assert _files(other) == []
        with pytest.raises(ValueError, match=r"could not download.*HTTPError.*404"):
            resolve_checkpoint(None, f"{server.url}/absent/w.pth", None, other)
        assert _files(other) == []
    finally:
        server.close()


def test_an_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    import umtfss.backbones.checkpoints as checkpoints

    class Broken:
        headers = {"Content-Length": "10"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, size):
            raise KeyboardInterrupt  # Ctrl-C during the transfer

    monkeypatch.setattr(checkpoints, "urlopen", lambda *args, **kwargs: Broken())
    with pytest.raises(KeyboardInterrupt):
        resolve_checkpoint(None, "https://example.org/model.pth", None, tmp_path / "cache")
    assert _files(tmp_path / "cache") == []


def test_two_urls_with_one_file_name_do_not_share_a_cached_file(tmp_path):
    """Two training runs each publish `checkpoint.pth`: the second URL must not get the first's weights."""
    first, second = tmp_path / "run1" / "checkpoint.pth", tmp_path / "run2" / "checkpoint.pth"
    for index, path in enumerate((first, second)):
        path.parent.mkdir()
        torch.save({"w": torch.full((2,), float(index))}, path)
    cache = tmp_path / "cache"
    got_first = resolve_checkpoint(None, first.as_uri(), None, cache)
    got_second = resolve_checkpoint(None, second.as_uri(), None, cache)
    assert got_first.read_bytes() == first.read_bytes() and got_second.read_bytes() == second.read_bytes()
    assert resolve_checkpoint(None, first.as_uri(), None, cache) == got_first  # each still cached once
    assert resolve_checkpoint(None, second.as_uri(), None, cache) == got_second


def test_folders_paths_given_as_urls_and_empty_files_fail_with_a_message(tmp_path, monkeypatch):
    folder = tmp_path / "dino"
    folder.mkdir()
    torch.save({"w": torch.zeros(1)}, folder / "checkpoint.pth")
    with pytest.raises(IsADirectoryError, match=r"'model.checkpoint' is '.*dino', a folder \(it holds checkpoint.pth"):
        build_backbone("dino-vits16", checkpoint=folder, config_section="model")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(IsADirectoryError, match="a folder"):
        build_backbone("dino-vits16", checkpoint="~/dino")  # ~ is the user's home
    for url in (str(folder / "checkpoint.pth"), "~/dino/checkpoint.pth"):
        with pytest.raises(ValueError, match=r"'embedding.checkpoint_url' is .* not a URL.*set 'embedding.checkpoint'"):
            build_backbone("dino-vits16", checkpoint_url=url, config_section="embedding", cache_dir=tmp_path / "c")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")  # a download that never started
    with pytest.raises(ValueError, match=r"'embedding.checkpoint'.*empty.pth' could not be read \(EOFError"):
        build_backbone("resnet50-imagenet", checkpoint=empty, config_section="embedding")


def test_dino_checkpoint_trained_at_another_image_size_loads(tmp_path):
    """A ViT-S/16 fine-tuned at 448 px has a 28x28 position grid; the forward interpolates any grid."""
    torch.manual_seed(5)
    published = build_dino_vit("dino-vits16").state_dict()
    published["pos_embed"] = torch.randn(1, 1 + 28 * 28, 384)
    path = tmp_path / "dino_vits16_448.pth"
    torch.save(published, path)
    backbone = build_backbone("dino-vits16", checkpoint=path)
    _assert_weights_equal(backbone, published)
    assert torch.equal(backbone.grid_pos_embed(28, 28), published["pos_embed"])
    with torch.no_grad():
        assert backbone(torch.rand(1, 3, 64, 48))["last"].shape == (1, 384, 4, 3)
    # a patch-8 ViT-S at 224 has the same 28x28 grid: its patch embedding still gives it away
    small8 = build_dino_vit("dino-vits8").state_dict()
    torch.save(small8, path)
    with pytest.raises(ValueError, match=r"patch 8.*\(backbone 'dino-vits8'\).*patch_embed.proj.weight \(384, 3, 8, 8"):
        build_backbone("dino-vits16", checkpoint=path)


def _stand_in(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes that share one element: a ViT-B state dict in a few kilobytes."""
    return {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}


def test_wrong_architecture_is_named_with_the_backbone_that_fits(tmp_path):
    with torch.device("meta"):
        vitb16 = {k: v.shape for k, v in build_dino_vit("dino-vitb16").state_dict().items()}
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in _stand_in(vitb16).items()}}, path)
    with pytest.raises(ValueError) as caught:
        build_backbone("dino-vits16", checkpoint=path, config_section="embedding")
    message = str(caught.value)
    assert message.startswith("backbone 'dino-vits16' ('embedding.checkpoint'): the checkpoint holds a ViT of "
                              "width 768, patch 16, 12 blocks (backbone 'dino-vitb16')")
    assert str(path) in message and "cls_token (1, 1, 768) vs (1, 1, 384)" in message

    with torch.device("meta"):
        resnet101 = {k: v.shape for k, v in torchvision.models.resnet101().state_dict().items()}
    path = tmp_path / "resnet101.pth"
    torch.save(_stand_in(resnet101), path)
    with pytest.raises(ValueError, match=r"'model.checkpoint'.*\[3, 4, 23, 3\] blocks per layer \(ResNet-101\).*"
                                         r"unexpected keys: layer3.6"):
        build_backbone("resnet50-imagenet", checkpoint=path, config_section="model")


def test_a_moco_checkpoint_given_to_the_imagenet_backbone_names_the_right_one(tmp_path, resnet50_weights):
    state = {f"module.encoder_q.{k}": v for k, v in resnet50_weights.items()}
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"state_dict": state, "epoch": 800}, path)
    with pytest.raises(ValueError, match=r"MoCo checkpoint, for backbone 'resnet50-mocov2'"):
        build_backbone("resnet50-imagenet", checkpoint=path)
    backbone = build_backbone("resnet50-mocov2", checkpoint=path)  # a v1 head (fc.weight) is dropped too
    _assert_weights_equal(backbone.net, _body(resnet50_weights))
