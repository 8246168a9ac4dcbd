"""The FSS model: shapes, gradients, frozen backbone, parameter groups, and prototype vs vanilla attention."""

import copy

import pytest
import torch
from torch import nn

from umtfss.config import load
from umtfss.model import (
    FSSModel,
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


def make_model(attention="prototype", fg=3, bg=5, positional="sine", layers=2):
    torch.manual_seed(0)
    cfg = {"dim": 32, "heads": 4, "layers": layers, "dropout": 0.1, "attention": attention,
           "prototypes_fg": fg, "prototypes_bg": bg, "hash_bits": 16, "hash_iterations": 5}
    model = build_model(cfg, TinyBackbone())
    if positional != "sine":
        torch.manual_seed(0)
        model = FSSModel(TinyBackbone(), positional=positional, **cfg)
    return model


def episode(batch=2, shots=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.rand(batch, 3, SIZE, SIZE, generator=generator)
    supports = torch.rand(batch, shots, 3, SIZE, SIZE, generator=generator)
    masks = torch.zeros(batch, shots, SIZE, SIZE)
    masks[..., 4:20, 6:26] = 1.0
    masks[:, :, 20:, :8] = (torch.rand(batch, shots, SIZE - 20, 8, generator=generator) > 0.5).float()
    return query, supports, masks


@pytest.mark.parametrize("attention,shots,positional", [
    ("prototype", 1, "sine"), ("prototype", 2, "learned"), ("vanilla", 2, "none"),
])
def test_shapes_and_every_trainable_parameter_gets_a_finite_gradient(attention, shots, positional):
    model = make_model(attention, positional=positional).train()
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
    prototype = PrototypeCrossAttention(32, 4, dropout=0.0, prototypes_fg=12, prototypes_bg=12, hash_bits=8).eval()
    prototype.block.load_state_dict(vanilla.block.state_dict())
    torch.testing.assert_close(prototype(query, support, foreground), vanilla(query, support, foreground))
    # with fewer prototypes than pixels the two differ, so the equality above is not vacuous
    few = PrototypeCrossAttention(32, 4, dropout=0.0, prototypes_fg=2, prototypes_bg=2, hash_bits=8).eval()
    few.block.load_state_dict(vanilla.block.state_dict())
    assert not torch.allclose(few(query, support, foreground), vanilla(query, support, foreground), atol=1e-4)


def test_models_agree_when_prototypes_cover_every_support_pixel():
    """Whole model, 2 shots: 2*16 support cells <= K_fg and K_bg, so both attentions see the same tokens."""
    vanilla = make_model("vanilla").eval()
    prototype = make_model("prototype", fg=32, bg=32).eval()
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
    with pytest.raises(ValueError, match="supports must be"):
        make_model()(torch.rand(1, 3, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE), torch.rand(1, 1, SIZE, SIZE))


@pytest.mark.parametrize("attention", ["prototype", "vanilla"])
def test_padded_cells_are_never_attended_to(attention):
    """With validity masks, tokens of padded query / support cells cannot change any valid query output."""
    from umtfss.model.fss import AttentionLayer

    torch.manual_seed(0)
    model = make_model(attention, fg=50, bg=50)
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
        out, _ = layer(query, support, foreground, shots, query_valid, support_valid)
        noisy_query, noisy_support = query.clone(), support.clone()
        noisy_query[:, 12:] = torch.randn(batch, 4, dim) * 10
        noisy_support[:, 10:] = torch.randn(batch * shots, 6, dim) * 10
        again, _ = layer(noisy_query, noisy_support, foreground, shots, query_valid, support_valid)
        torch.testing.assert_close(again[:, :12], out[:, :12])
        unmasked, _ = layer(noisy_query, noisy_support, foreground, shots)
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
