"""demo-colortexture: a frozen feature extractor of fixed colour and Gabor-texture filters (no weights)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 8
ORIENTATIONS = 4
PYRAMID_LEVELS = 3          # Gabor wavelength 4 px at full, half and quarter resolution: 4, 8, 16 px
GABOR_WAVELENGTH = 4.0
GABOR_SIGMA = 2.0

# sRGB (D65) -> XYZ, and the D65 white point.
_RGB_TO_XYZ = ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505))
_WHITE = (0.95047, 1.0, 1.08883)

# Fixed standardisation: (x - centre) / spread per channel group, chosen from the value ranges of
# natural photographs (CIELab: L in 0..100, a/b roughly -60..60; log texture contrast about -6..0).
LAB_CENTRE = (50.0, 0.0, 0.0)
LAB_SPREAD = (25.0, 20.0, 20.0)
TEXTURE_CENTRE = -3.0
TEXTURE_SPREAD = 1.2
TEXTURE_FLOOR = 0.03  # contrast below this (sensor / JPEG noise) counts as flat
# Relative weight of the colour and texture groups in the concatenated "features" map.
COLOR_WEIGHT = 1.0
TEXTURE_WEIGHT = 1.0
# A constant channel appended to "features". Downstream every pixel feature is L2-normalised; without
# it a cell close to the average (grey, mildly textured) would get an arbitrary direction, with it
# the normalised features keep roughly the Euclidean geometry of the standardised ones.
REFERENCE_LEVEL = 4.0


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] sRGB in [0,1] -> CIELab [B,3,H,W] (L 0..100)."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    xyz = xyz / torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    eps = 216 / 24389
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), (24389 / 27 * xyz + 16) / 116)
    lightness = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([lightness, a, b], dim=1)


def gabor_bank(wavelength: float, sigma: float, orientations: int) -> torch.Tensor:
    """Even and odd (quadrature) zero-mean Gabor kernels, [2*orientations, 1, k, k]."""
    half = int(math.ceil(2.5 * sigma))
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    envelope = torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    kernels = []
    for k in range(orientations):
        angle = math.pi * k / orientations
        along = x * math.cos(angle) + y * math.sin(angle)
        for carrier in (torch.cos, torch.sin):
            kernel = envelope * carrier(2 * math.pi * along / wavelength)
            kernel = kernel - envelope * (kernel.sum() / envelope.sum())  # no response to flat regions
            kernels.append(kernel / kernel.abs().sum())
    return torch.stack(kernels)[:, None].float()


def cell_pool(x: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """Average over a (stride+1)^2 window centred on every stride-th pixel (like a ResNet's grid)."""
    return F.avg_pool2d(x, kernel_size=stride + 1, stride=stride, padding=stride // 2, count_include_pad=False)


def neighbourhood_pool(x: torch.Tensor) -> torch.Tensor:
    """Average over the 3x3 neighbouring grid cells (a second, coarser scale)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class ColorTextureBackbone(nn.Module):
    """Hand-designed per-pixel features on the stride-8 grid: CIELab colour and Gabor texture energy.

    Used by the demo in place of a self-supervised network, which cannot be downloaded on machines
    without internet. Nothing is learned: filters and standardisation constants are fixed.
    """

    name = "demo-colortexture"
    mid_layers = ("color", "texture")
    high_layer = "features"
    embed_layer = "features"
    checkpoint_sha256 = None

    def __init__(self, output_stride: int = STRIDE):
        super().__init__()
        if output_stride != STRIDE:
            raise ValueError(f"demo-colortexture has output stride {STRIDE} only, got output_stride={output_stride}")
        self.register_buffer("gabor", gabor_bank(GABOR_WAVELENGTH, GABOR_SIGMA, ORIENTATIONS), persistent=False)
        self.register_buffer("lab_centre", torch.tensor(LAB_CENTRE).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_spread", torch.tensor(LAB_SPREAD).view(1, 3, 1, 1), persistent=False)
        color_channels = 3 * 2
        texture_channels = ORIENTATIONS * PYRAMID_LEVELS * 2
        self.channels = {"color": color_channels, "texture": texture_channels,
                         "features": color_channels // 2 + texture_channels // 2 + 1}
        self.strides = {key: STRIDE for key in self.channels}
        self.eval()

    def train(self, mode: bool = True):
        """Always stays in eval mode: the backbone is frozen."""
        return super().train(False)

    def _color(self, lab: torch.Tensor) -> torch.Tensor:
        cells = cell_pool((lab - self.lab_centre) / self.lab_spread)
        return torch.cat([cells, neighbourhood_pool(cells)], dim=1)

    def _texture(self, lightness: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """Log Gabor contrast (energy / local mean lightness) at 3 scales and 4 orientations."""
        full_hw = lightness.shape[-2:]
        level = lightness
        energies = []
        pad = self.gabor.shape[-1] // 2
        for depth in range(PYRAMID_LEVELS):
            if depth:
                level = F.avg_pool2d(level, 2, ceil_mode=True)
            response = F.conv2d(F.pad(level, (pad,) * 4, mode="replicate"), self.gabor)
            energy = response.view(response.shape[0], ORIENTATIONS, 2, *response.shape[-2:]).pow(2).sum(2).sqrt()
            if depth:
                energy = F.interpolate(energy, size=full_hw, mode="bilinear", align_corners=False)
            energies.append(energy)
        energy = cell_pool(torch.cat(energies, dim=1))
        brightness = cell_pool(lightness).clamp_min(0.05)
        contrast = (torch.log(energy / brightness + TEXTURE_FLOOR) - TEXTURE_CENTRE) / TEXTURE_SPREAD
        return torch.cat([contrast, neighbourhood_pool(contrast)], dim=1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"demo-colortexture expects images [B,3,H,W], got shape {tuple(x.shape)}")
        lab = rgb_to_lab(x.float().clamp(0, 1))
        color = self._color(lab)
        texture = self._texture(lab[:, :1] / 100.0, color.shape[-2:])
        return {"color": color, "texture": texture, "features": self._combine(color, texture)}

    def _combine(self, color: torch.Tensor, texture: torch.Tensor) -> torch.Tensor:
        """Cell-scale colour and texture, each group scaled to equal expected weight, plus the reference."""
        color_cells = color[:, : color.shape[1] // 2]
        texture_cells = texture[:, : texture.shape[1] // 2]
        reference = torch.full_like(color_cells[:, :1], REFERENCE_LEVEL)
        return torch.cat([color_cells * (COLOR_WEIGHT / math.sqrt(color_cells.shape[1])),
                          texture_cells * (TEXTURE_WEIGHT / math.sqrt(texture_cells.shape[1])),
                          reference], dim=1)
