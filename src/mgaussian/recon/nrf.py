"""Neural residual field (the seed's NRF): Fourier features (6 bands) -> 4 x 64 SiLU MLP ->
scale x tanh. Coordinates are normalised to [-1, 1] over the reconstruction box."""

from __future__ import annotations

__all__ = ["NeuralResidualField"]

import math

import torch
from torch import nn


class NeuralResidualField(nn.Module):
    def __init__(self, lo, hi, bands: int = 6, width: int = 64, depth: int = 4, scale: float = 0.1):
        super().__init__()
        self.register_buffer("lo", torch.as_tensor(lo, dtype=torch.float32))
        self.register_buffer("hi", torch.as_tensor(hi, dtype=torch.float32))
        self.register_buffer("freqs", (2.0 ** torch.arange(bands, dtype=torch.float32)) * math.pi)
        self.scale = float(scale)
        d_in = 3 + 6 * bands
        layers = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.SiLU()]
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        # start at zero residual: the last layer's weights start small
        with torch.no_grad():
            self.mlp[-1].weight.mul_(0.01)
            self.mlp[-1].bias.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        u = 2 * (x - self.lo) / (self.hi - self.lo) - 1
        a = u[..., None] * self.freqs  # [..., 3, bands]
        return torch.cat([u, torch.sin(a).flatten(-2), torch.cos(a).flatten(-2)], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., 3] world mm -> residual [...]."""
        return self.scale * torch.tanh(self.mlp(self.encode(x))[..., 0])
