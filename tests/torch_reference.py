"""A PyTorch transcription of the reference CRNN and loss (SPEC sections 6 and 7), for tests.

Written from the SPEC, with exactly the reference's state_dict layout (68 keys for the paper
size). Importable as `torch_reference` once tests/ is on sys.path: pytest puts it there, and
the benchmarks insert it.

Layouts are PyTorch's: features (B, C, T, F), cams (B, 1, num_cameras).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TorchConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return nn.functional.avg_pool2d(x, kernel_size=2)


class TorchCRNN(nn.Module):
    """features (B, C, T, F), cams (B, 1, num_cameras) -> (B, T / 16, 2)."""

    def __init__(self, in_channels: int = 16, conv_features: Sequence[int] = (64, 128, 256, 512),
                 gru_hidden: int = 256, gru_layers: int = 2, fc1_features: int = 32,
                 num_cameras: int = 11, pooling: str = "avg"):
        super().__init__()
        widths = [in_channels, *conv_features]
        for i in range(len(conv_features)):
            setattr(self, f"conv_block{i + 1}", TorchConvBlock(widths[i], widths[i + 1]))
        self.n_blocks = len(conv_features)
        self.pooling = pooling
        self.gru_block = nn.GRU(conv_features[-1], gru_hidden, num_layers=gru_layers,
                                batch_first=True, bidirectional=True, dropout=0.0)
        self.fc1 = nn.Linear(2 * gru_hidden, fc1_features)
        self.fc2 = nn.Linear(fc1_features + num_cameras, 2)

    def forward(self, x, cams):
        for i in range(self.n_blocks):
            x = getattr(self, f"conv_block{i + 1}")(x)
        x = torch.mean(x, dim=3) if self.pooling == "avg" else torch.max(x, dim=3).values
        x = x.transpose(1, 2)  # (B, T', C)
        x, _ = self.gru_block(x)
        x = self.fc1(x)
        x = torch.cat([x, cams.repeat(1, x.shape[1], 1)], dim=2)
        return torch.sigmoid(self.fc2(x))


def randomize_(model: TorchCRNN, seed: int) -> TorchCRNN:
    """Random weights and non-trivial BN affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith("running_mean"):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=gen))
            elif ".bn" in name and name.endswith("weight"):
                tensor.copy_(0.8 + 0.4 * torch.rand(tensor.shape, generator=gen))
            elif ".bn" in name and name.endswith("bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.startswith("conv_block"):
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            else:  # GRU and linear layers: wide enough that outputs spread over (0, 1)
                bound = 3.0 / tensor.shape[-1] ** 0.5 if tensor.ndim == 2 else 0.5
                tensor.copy_((2 * torch.rand(tensor.shape, generator=gen) - 1) * bound)
    return model


def outputs_with_flax_weights(variables, features, cams, train: bool, pooling: str = "avg"):
    """Our CRNN's variables (a trained or exported model) run in this transcription.

    The variables go through `converters.flax_to_torch.to_state_dict` (itself tested against
    PyTorch loading it with strict=True), and the network's size is read from their shapes.
    features (B, T, F, C) float32 channels-last, cams (B, num_cameras) one-hot -> numpy
    (B, T / 16, 2); `train` picks batch statistics (True) or the running ones.
    """
    import numpy as np
    from converters import flax_to_torch

    model_config = flax_to_torch.model_config_of(variables)
    model = TorchCRNN(model_config.pop("in_channels"), pooling=pooling, **model_config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in flax_to_torch.to_state_dict(variables).items()})
    model.train(train)
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(features, np.float32)).permute(0, 3, 1, 2),
                     torch.from_numpy(np.asarray(cams, np.float32))[:, None, :]).numpy()


def asdl_loss_reference(outputs, target_coords, pseudo_labels, speech_activity):
    """The loss as the reference writes it: Python loops over batch items and frames, summed.

    outputs (B, T, 2), the others (B, T) -> scalar tensor.
    """
    loss = 0.0
    for b in range(outputs.shape[0]):
        for t in range(outputs.shape[1]):
            loss = loss + (outputs[b, t, 1] - speech_activity[b, t]) ** 2
            if speech_activity[b, t] == 1 and pseudo_labels[b, t] == 1:
                loss = loss + (outputs[b, t, 0] - target_coords[b, t]) ** 2
    return loss
