"""The FSS model: shapes, gradients, frozen backbone, parameter groups, and prototype vs vanilla attention."""

import copy

import pytest
import torch
from torch import nn

from umtfss.config import load
from umtfss.model import (
    MultiHeadAttention,
    PrototypeCrossAttention,
    VanillaCrossAttention,
    build_model,
)

torch.set_num_threads(1)
SIZE = 32  # input side; the stand-in backbone has stride 8 -> 4x4 grid


class TinyBackbone(nn.Module):
    """Stand-in FeatureBackbone: fixed strided convs, one BatchNorm, frozen, eval mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.stem = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.mid = nn.Conv2d(8, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.high = nn.Conv2d(6, 10, 3, padding=1)
        self.name = "tiny"
        self.channels = {"a": 8, "b": 6, "c": 10}
        self.strides = {"a": 8, "b": 8, "c": 8}
        self.mid_layers = ("a", "b")
        self.high_layer = "c"
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def forward(self, x):
        a = torch.relu(self.stem(x))
        b = torch.relu(self.norm(self.mid(a)))
        return {"a": a, "b": b, "c": torch.relu(self.high(b))}


def make_model(attention="prototype", fg=3, bg=5, positional="sine", layers=2, **extra):
    torch.manual_seed(0)
    cfg = {"dim": 32, "heads": 4, "layers": layers, "dropout": 0.1, "attention": attention,
           "prototypes_fg": fg, "prototypes_bg": bg, "hash_bits": 16, "hash_iterations": 5, "positional": positional,
           **extra}
    return build_model(cfg, TinyBackbone())


def episode(batch=2, shots=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.rand(batch, 3, SIZE, SIZE, generator=generator)
    supports = torch.rand(batch, shots, 3, SIZE, SIZE, generator=generator)
    masks = torch.zeros(batch, shots, SIZE, SIZE)
    masks[..., 4:20, 6:26] = 1.0
    masks[:, :, 20:, :8] = (torch.rand(batch, shots, SIZE - 20, 8, generator=generator) > 0.5).float()
    return query, supports, masks


REFERENCE_MODEL = {"prototype_source": "merged", "self_attention": "deformable"}


@pytest.mark.parametrize("attention,shots,positional,extra", [
    ("prototype", 1, "sine", {}), ("prototype", 2, "learned", {}), ("vanilla", 2, "none", {}),
    ("prototype", 2, "sine", REFERENCE_MODEL), ("vanilla", 1, "sine", REFERENCE_MODEL),
    ("prototype", 2, "sine", {"support_merge": "mask_channel", "normalize_prototypes": False, "mlp_ratio": 4}),
])
def test_shapes_and_every_trainable_parameter_gets_a_finite_gradient(attention, shots, positional, extra):
    model = make_model(attention, positional=positional, **extra).train()
    logits = model(*episode(shots=shots))
    assert logits.shape == (2, 2, SIZE, SIZE)
    logits.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, parameter in trainable:
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)


def test_backbone_stays_frozen_through_training_steps():
    model = make_model()
    before = copy.deepcopy(model.backbone.state_dict())  # includes BatchNorm running statistics
    sgd = torch.optim.SGD(model.other_parameters(), lr=0.1, momentum=0.9)
    adamw = torch.optim.AdamW(model.transformer_parameters(), lr=1e-2)
    model.train()
    assert not model.backbone.training
    for _ in range(2):
        loss = model(*episode()).logsumexp(dim=1).mean()
        sgd.zero_grad(), adamw.zero_grad()
        loss.backward()
        sgd.step(), adamw.step()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    after = model.backbone.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"backbone entry {key} changed"


def test_parameter_groups_partition_the_trainable_parameters():
    model = make_model(positional="learned")
    transformer = {id(p) for p in model.transformer_parameters()}
    other = {id(p) for p in model.other_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    backbone = {id(p) for p in model.backbone.parameters()}
    assert transformer and other
    assert not transformer & other
    assert transformer | other == trainable
    assert not (transformer | other) & backbone
    assert id(model.learned_positional.table) in transformer
    assert all(id(p) in transformer for p in model.transformer[0].cross.parameters())
    assert all(id(p) in other for p in model.head.parameters())


def test_prototype_attention_equals_vanilla_when_every_pixel_is_a_prototype():
    torch.manual_seed(0)
    query, support = torch.randn(2, 9, 32), torch.randn(2, 12, 32)
    foreground = torch.zeros(2, 12, dtype=torch.bool)
    foreground[0, :5] = True
    foreground[1, 4:6] = True
    vanilla = VanillaCrossAttention(32, 4, dropout=0.0).eval()
    prototype = PrototypeCrossAttention(32, 4, dropout=0.0, prototypes_fg=12, prototypes_bg=12, hash_bits=8,
                                        normalize=False).eval()
    prototype.block.load_state_dict(vanilla.block.state_dict())
    torch.testing.assert_close(prototype(query, support, foreground), vanilla(query, support, foreground))
    # with fewer prototypes than pixels the two differ, so the equality above is not vacuous
    few = PrototypeCrossAttention(32, 4, dropout=0.0, prototypes_fg=2, prototypes_bg=2, hash_bits=8, normalize=False).eval()
    few.block.load_state_dict(vanilla.block.state_dict())
    assert not torch.allclose(few(query, support, foreground), vanilla(query, support, foreground), atol=1e-4)
    # normalised (reference code): every valid prototype is a unit vector, the same directions as before
    unit = PrototypeCrossAttention(32, 4, dropout=0.0, prototypes_fg=2, prototypes_bg=2, hash_bits=8).eval()
    tokens, valid = unit.prototypes(support, foreground)
    raw, _ = few.prototypes(support, foreground)
    torch.testing.assert_close(tokens[valid].norm(dim=-1), torch.ones(int(valid.sum())))
    torch.testing.assert_close(tokens[valid], torch.nn.functional.normalize(raw[valid], dim=-1))


def test_models_agree_when_prototypes_cover_every_support_pixel():
    """Whole model, 2 shots: 2*16 support cells <= K_fg and K_bg, so both attentions see the same tokens."""
    vanilla = make_model("vanilla").eval()
    prototype = make_model("prototype", fg=32, bg=32, normalize_prototypes=False).eval()
    missing, unexpected = prototype.load_state_dict(vanilla.state_dict(), strict=False)
    assert unexpected == [] and all(name.endswith("projection") for name in missing)
    data = episode(shots=2)
    with torch.no_grad():
        torch.testing.assert_close(prototype(*data), vanilla(*data), rtol=1e-4, atol=1e-5)


def test_batched_forward_equals_one_by_one_and_is_deterministic():
    model = make_model().eval()
    query, supports, masks = episode(batch=3, shots=2, seed=4)
    with torch.no_grad():
        batched = model(query, supports, masks)
        again = model(query, supports, masks)
        singles = torch.cat([model(query[i : i + 1], supports[i : i + 1], masks[i : i + 1]) for i in range(3)])
    assert torch.equal(batched, again)
    torch.testing.assert_close(singles, batched, rtol=1e-4, atol=1e-5)
    assert any(name.endswith("cross.projection") for name, _ in model.named_buffers())


def test_empty_support_mask_gives_finite_logits():
    model = make_model().eval()
    query, supports, masks = episode()
    masks[1] = 0.0
    with torch.no_grad():
        assert torch.isfinite(model(query, supports, masks)).all()


def test_key_padding_mask_hides_keys_and_all_masked_rows_are_zero():
    attention = MultiHeadAttention(16, 4, dropout=0.0).eval()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 3:] = False
    keep[1] = False
    changed = y.clone()
    changed[0, 3:] = torch.randn(4, 16) * 10
    out = attention(x, y, keep)
    torch.testing.assert_close(out[0], attention(x, changed, keep)[0])
    torch.testing.assert_close(out[1], attention.to_out.bias.expand(5, 16))  # zero attention output


def test_build_model_reads_the_config_and_rejects_bad_values():
    config = load({"model": {"dim": 32, "heads": 4, "layers": 1, "attention": "vanilla"}})
    model = build_model(config["model"], TinyBackbone())
    assert len(model.transformer) == 1 and isinstance(model.transformer[0].cross, VanillaCrossAttention)
    with pytest.raises(ValueError, match="attention"):
        build_model({"dim": 32, "heads": 4, "attention": "dense"}, TinyBackbone())
    with pytest.raises(ValueError, match="divisible"):
        build_model({"dim": 30, "heads": 4}, TinyBackbone())
    with pytest.raises(ValueError, match="model.positional is 'rope'"):
        build_model({"dim": 32, "heads": 4, "positional": "rope"}, TinyBackbone())
    with pytest.raises(ValueError, match="supports must be"):
        make_model()(torch.rand(1, 3, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE), torch.rand(1, 1, SIZE, SIZE))


@pytest.mark.parametrize("attention,self_attention", [("prototype", "global"), ("vanilla", "global"),
                                                      ("prototype", "deformable")])
def test_padded_cells_are_never_attended_to(attention, self_attention):
    """With validity masks, tokens of padded query / support cells cannot change any valid query output."""
    from umtfss.model.fss import AttentionLayer

    torch.manual_seed(0)
    model = make_model(attention, fg=50, bg=50, self_attention=self_attention)
    layer = model.transformer[0].eval()
    assert isinstance(layer, AttentionLayer)
    batch, shots, cells, dim = 2, 2, 16, 32
    query, support = torch.randn(batch, cells, dim), torch.randn(batch * shots, cells, dim)
    foreground = torch.zeros(batch, shots * cells, dtype=torch.bool)
    foreground[:, :5] = True
    foreground[:, cells:cells + 4] = True
    query_valid = torch.ones(batch, cells, dtype=torch.bool)
    query_valid[:, 12:] = False               # bottom row of a 4x4 grid is padding
    support_valid = torch.ones(batch * shots, cells, dtype=torch.bool)
    support_valid[:, 10:] = False
    with torch.no_grad():
        grid = {"grid": (4, 4)}
        out, _ = layer(query, support, foreground, shots, query_valid, support_valid, **grid)
        noisy_query, noisy_support = query.clone(), support.clone()
        noisy_query[:, 12:] = torch.randn(batch, 4, dim) * 10
        noisy_support[:, 10:] = torch.randn(batch * shots, 6, dim) * 10
        again, _ = layer(noisy_query, noisy_support, foreground, shots, query_valid, support_valid, **grid)
        torch.testing.assert_close(again[:, :12], out[:, :12])
        unmasked, _ = layer(noisy_query, noisy_support, foreground, shots, **grid)
        assert not torch.allclose(unmasked[:, :12], out[:, :12])  # without the masks the padding leaks in


def test_mask_padding_switch_and_unpadded_inputs():
    """255 in the support masks (and query_valid) change the result only with mask_padding; plain 0/1
    masks without query_valid give the same logits either way."""
    model = make_model().eval()
    plain = copy.deepcopy(model)
    plain.mask_padding = False
    query, supports, masks = episode(shots=2)
    with torch.no_grad():
        torch.testing.assert_close(model(query, supports, masks), plain(query, supports, masks))
        padded = masks.clone()
        padded[..., 24:, :] = 255.0                        # the bottom grid row of every support is padding
        query_valid = torch.ones(query.shape[0], SIZE, SIZE, dtype=torch.bool)
        query_valid[:, :, 24:] = False
        masked = model(query, supports, padded, query_valid)
        assert torch.isfinite(masked).all()
        assert not torch.allclose(masked, plain(query, supports, padded, query_valid))
        # with the switch off, 255 is background: the same as passing 0 there
        background = padded.clone()
        background[background == 255] = 0
        torch.testing.assert_close(plain(query, supports, padded, query_valid), plain(query, supports, background))
    from umtfss.config import ConfigError

    with pytest.raises(ConfigError, match="model.mask_padding"):
        load({"model": {"mask_padding": "yes"}})


def test_deformable_attention_samples_the_cells_its_offsets_point_to():
    """Zero predicted offsets read each token's own cell; an offset of +1 cell in x reads the right
    neighbour (zeros beyond the edge); the positional encoding only moves the samples."""
    from umtfss.model.attention import DeformableAttention

    torch.manual_seed(0)
    attention = DeformableAttention(16, heads=2, points=3).eval()
    height, width = 3, 4
    x = torch.randn(2, height * width, 16)
    value = attention.to_value(x).view(2, height, width, 16)
    with torch.no_grad():
        attention.to_offsets.bias.zero_()                  # every point at the token's own cell centre
        own = attention(x, height, width)
        torch.testing.assert_close(own, attention.to_out(value.reshape(2, -1, 16)))
        attention.to_offsets.bias.view(2, 3, 2)[..., 0] = 1.0  # one cell to the right, every head and point
        right = attention(x, height, width)
        shifted = torch.cat([value[:, :, 1:], torch.zeros(2, height, 1, 16)], dim=2)
        torch.testing.assert_close(right, attention.to_out(shifted.reshape(2, -1, 16)))
        # positions feed only the offsets/weights: with position-independent offsets they change nothing
        torch.testing.assert_close(attention(x, height, width, positional=torch.randn(height * width, 16)), right)
    with pytest.raises(ValueError, match="grid"):
        attention(x, 4, 4)


def test_deformable_attention_offsets_learn():
    from umtfss.model.attention import DeformableAttention

    torch.manual_seed(0)
    attention = DeformableAttention(16, heads=2, points=3)
    x = torch.randn(2, 12, 16)
    attention(x, 3, 4).square().sum().backward()
    assert attention.to_offsets.weight.grad.abs().sum() > 0 and attention.to_weights.weight.grad.abs().sum() > 0


def test_reference_model_clusters_once_from_the_merged_support():
    """prototype_source merged: one clustering before the layers (layer 0's), no support self-attention."""
    model = make_model(**REFERENCE_MODEL).eval()
    assert all(layer.self_support is None for layer in model.transformer)
    with torch.no_grad():
        model(*episode(shots=2))
    assert model.transformer[0].cross.last_clusters is not None
    assert model.transformer[1].cross.last_clusters is None
    per_layer = make_model().eval()
    with torch.no_grad():
        per_layer(*episode(shots=2))
    assert all(layer.cross.last_clusters is not None for layer in per_layer.transformer)


def test_support_merge_own_prototype_uses_each_shots_own_vector():
    """Reference code: each support is merged with its own masked-average vector and no mask channel."""
    from umtfss.model.fss import masked_average_pool

    model = make_model().eval()
    seen = {}
    model.merge_support.register_forward_hook(lambda module, inputs, output: seen.update(input=inputs[0]))
    query, supports, masks = episode(shots=2)
    masks[:, 1] = 0.0
    masks[:, 1, :8, :8] = 1.0                               # shot 2 has another object
    with torch.no_grad():
        model(query, supports, masks)
        merged = seen["input"]                              # [B*K, 2d, h, w]
        assert merged.shape[1] == 2 * model.dim
        mid = model.reduce_support(model._middle(model._backbone_features(supports.flatten(0, 1))))
        grid = torch.nn.functional.interpolate(masks.flatten(0, 1)[:, None], size=mid.shape[-2:], mode="bilinear",
                                               align_corners=True)
        own = masked_average_pool(mid, grid)
        torch.testing.assert_close(merged[:, model.dim:, 0, 0], own)
        assert not torch.allclose(own[0], own[1])
    assert not hasattr(model, "merge")
    legacy = make_model(support_merge="mask_channel")
    assert legacy.merge[0].in_channels == 2 * legacy.dim + 1 and not hasattr(legacy, "merge_support")


def test_head_has_the_reference_dropout():
    model = make_model(head_dropout=0.25)
    dropouts = [m for m in model.head if isinstance(m, torch.nn.Dropout2d)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.25 and model.head[0].bias is None


def test_positional_config_key_chooses_the_encoding_and_sine_is_the_default():
    with pytest.raises(Exception, match="rope"):
        load({"model": {"positional": "rope"}})
    assert load({})["model"]["positional"] == "sine"
    chosen = {kind: build_model(load({"model": {"dim": 32, "heads": 4, "positional": kind}})["model"], TinyBackbone())
              for kind in ("sine", "learned", "none")}
    assert [model.positional_kind for model in chosen.values()] == ["sine", "learned", "none"]
    assert chosen["learned"].learned_positional is not None and chosen["sine"].learned_positional is None
    assert chosen["sine"]._positional(3, 4, "cpu").shape == (12, 32) and chosen["none"]._positional(3, 4, "cpu") is None


def test_padding_aware_sine_encoding_matches_an_unpadded_grid_of_the_image_size():
    """Reference code (deformable mode): positions are normalised to the valid extent of each sample."""
    from umtfss.model.fss import sine_positional_encoding

    plain = sine_positional_encoding(4, 5, 16)
    everything = torch.ones(1, 20, dtype=torch.bool)
    torch.testing.assert_close(sine_positional_encoding(4, 5, 16, valid=everything)[0], plain, atol=1e-5, rtol=1e-5)
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[0, 3:, :] = False          # sample 0: a 3x5 image padded at the bottom
    valid[1, :, 3:] = False          # sample 1: a 4x3 image padded at the right
    code = sine_positional_encoding(4, 5, 16, valid=valid.flatten(1)).view(2, 4, 5, 16)
    torch.testing.assert_close(code[0, :3].reshape(15, 16), sine_positional_encoding(3, 5, 16), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(code[1, :, :3].reshape(12, 16), sine_positional_encoding(4, 3, 16), atol=1e-5, rtol=1e-5)


def test_reference_layer_details_are_the_defaults_and_can_be_switched():
    """Reference code: no biases in the cross-attention projections and the MLPs (the self-attention's
    projections keep theirs), nearest cell masks, a 2x2 centre patch for an empty support."""
    model = make_model()
    layer = model.transformer[0]
    assert layer.cross.block.attention.to_query.bias is None and layer.cross.block.attention.to_out.bias is None
    assert layer.cross.block.mlp[0].bias is None and layer.self_query.mlp[3].bias is None
    assert layer.self_query.attention.to_query.bias is not None
    assert (model.grid_masks, model.empty_support) == ("nearest", "center_patch")
    biased = make_model(linear_bias=True, attention="vanilla").transformer[0]
    assert biased.cross.block.attention.to_key.bias is not None and biased.self_support.mlp[0].bias is not None
    assert make_model(self_attention="deformable").transformer[0].self_query.mlp[0].bias is None
    with pytest.raises(ValueError, match="model.grid_masks"):
        make_model(grid_masks="bicubic")
    with pytest.raises(ValueError, match="model.empty_support"):
        make_model(empty_support="random")


def test_support_foreground_cells_by_nearest_or_bilinear_resize_and_the_centre_patch():
    from umtfss.model.fss import _resize

    masks = torch.zeros(3, 16, 16)
    masks[0, 4, 8] = 1       # a pixel that the nearest resize 16 -> 4 reads (rows and columns 0, 4, 8, 12)
    masks[1, 5:7, 5:7] = 1   # a tiny object between the pixels it reads
    masks[2] = 1             # foreground everywhere
    soft = _resize(masks[:, None], (4, 4))
    nearest = make_model()._foreground_cells(masks, soft)
    assert nearest[0].nonzero().tolist() == [[1, 2]]
    assert nearest[1].nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]  # missed: the 2x2 centre patch
    assert nearest[2].sum() == 12 and not any(nearest[2][r, c] for r in (0, 3) for c in (0, 3))
    plain = make_model(empty_support="none")._foreground_cells(masks, soft)
    assert not plain[1].any() and plain[2].all()
    bilinear = make_model(grid_masks="bilinear", empty_support="none")._foreground_cells(masks, soft)
    assert bilinear[1].nonzero().tolist() == [[1, 1]]  # the peak cell of the tiny object (bilinear reads pixel 5)
    assert not bilinear[0].any()  # a one-pixel object that bilinear does not read (pixels 0, 5, 10, 15) is lost too


def test_padded_cells_by_nearest_or_bilinear_resize():
    valid = torch.ones(1, 16, 16, dtype=torch.bool)
    valid[:, 10:] = False  # rows 10-15 are padding
    rows = lambda model: model._valid_cells(valid, (4, 4)).view(4, 4)[:, 0].tolist()  # noqa: E731
    assert rows(make_model()) == [True, True, True, False]  # nearest reads pixel rows 0, 4, 8, 12
    assert rows(make_model(grid_masks="bilinear")) == [True, True, False, False]  # bilinear: 0, 5, 10, 15


def test_hash_projection_has_a_bias_row_and_can_be_drawn_at_every_call():
    query, supports, masks = episode()
    fixed = make_model().eval()
    assert fixed.transformer[0].cross.projection.shape == (33, 16)  # dim 32 plus the bias row
    assert make_model(hash_bias=False).transformer[0].cross.projection.shape == (32, 16)
    per_call = make_model(hash_draw="per_call").eval()
    cross = per_call.transformer[0].cross

    def clusters(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            logits = per_call(query, supports, masks)
        return logits, cross.last_clusters[1].assign  # background, clustered with a fresh projection

    first, second, again = clusters(0), clusters(1), clusters(0)
    assert not torch.equal(first[1], second[1])  # a new projection each call
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # reproducible from the seed
    with pytest.raises(ValueError, match="model.hash_draw"):
        make_model(hash_draw="sometimes")


# ------------------------------------------------------------------------------ prior mask


def test_prior_mask_against_a_brute_force_loop():
    """Per query cell: max cosine over the support cells the mask touches, min-max per shot, shot mean."""
    from umtfss.model.fss import prior_mask

    torch.manual_seed(3)
    query, support = torch.randn(2, 6, 4, 4), torch.randn(2, 3, 6, 4, 4)
    masks = torch.zeros(2, 3, 4, 4)  # at the feature grid's size: no resize
    masks[:, :, 1:3, :2] = 1
    masks[1, 2] = 0  # an empty shot: its prior is 0
    got = prior_mask(query, support, masks)
    expected = torch.zeros(2, 4 * 4)
    for b in range(2):
        for k in range(3):
            cells = [m for m in range(16) if masks[b, k].flatten()[m] > 0]
            if not cells:
                continue
            best = torch.tensor([max(float(torch.cosine_similarity(query[b].flatten(1)[:, n],
                                                                    support[b, k].flatten(1)[:, m], dim=0))
                                     for m in cells) for n in range(16)])
            expected[b] += (best - best.min()) / (best.max() - best.min() + 1e-7)
    torch.testing.assert_close(got.flatten(1), expected / 3, atol=1e-5, rtol=0)


def test_prior_mask_of_signed_features_ignores_the_masked_out_cells():
    """Masked-out cells (zero vectors, cosine 0) must not lift a query cell whose best match is negative."""
    from umtfss.model.fss import prior_mask

    v, u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    query = torch.stack([v, -v, u, v], dim=1).view(1, 2, 2, 2)  # cosines to the support's -v: -1, 1, 0, -1
    support = (-v)[None, None, :, None, None].repeat(1, 1, 1, 2, 2)
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    prior = prior_mask(query, support, masks).flatten()
    torch.testing.assert_close(prior, torch.tensor([0.0, 1.0, 0.5, 0.0]), atol=1e-5, rtol=0)


def test_prior_mask_stays_float32_under_autocast():
    """Mixed precision (training.amp, evaluation.cpu_precision) must not round the prior's cosines to bfloat16."""
    from umtfss.model.fss import prior_mask

    torch.manual_seed(5)
    query, support = torch.randn(2, 64, 12, 12), torch.randn(2, 2, 64, 12, 12)
    masks = (torch.rand(2, 2, 48, 48) > 0.5).float()
    expected = prior_mask(query, support, masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = prior_mask(query, support, masks)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_deformable_attention_samples_in_float32_under_autocast(monkeypatch):
    """A bfloat16 sampling grid moves samples by up to a tenth of a cell: the grid and values stay float32."""
    from umtfss.model import attention as attention_module

    seen = []
    real = attention_module.F.grid_sample

    def recording(value, grid, **kwargs):
        seen.append((value.dtype, grid.dtype))
        return real(value, grid, **kwargs)

    monkeypatch.setattr(attention_module.F, "grid_sample", recording)
    torch.manual_seed(0)
    block = attention_module.DeformableAttention(16, heads=2, points=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.randn(2, 12, 16), 3, 4)
    assert seen == [(torch.float32, torch.float32)] and torch.isfinite(out).all()
