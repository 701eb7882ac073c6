"""The PyTorch peer of the benchmarks: the CIFAR ResNet-18 and a SAM step as PyTorch users write it.

* :class:`ResNet` -- kuangliu/pytorch-cifar's CIFAR ResNet (3x3 stem, no max-pool, stages of
  64/128/256/512 filters, 1x1 projection shortcuts), the same architecture and parameter count
  (11,173,962 for 10 classes) as the Flax ``resnet18`` of ``experiments.models``.
* :class:`SAM` -- the two-step optimizer wrapping a base optimizer: ``first_step`` adds
  e_w = rho g / ||g|| to the weights, a closure runs the second forward-backward pass,
  ``second_step`` subtracts e_w and calls the base optimizer's step.
* :func:`sam_train_step` -- one training step as in the popular public examples: forward,
  backward, ``optimizer.step(closure)`` where the closure runs the second pass with the
  BatchNorm running statistics frozen (momentum 0), so they come from the first pass only, as in
  the Flax step.

The batch is augmented on the device (random crop with 4-pixel padding, horizontal flip) and
normalized, as the JAX step does, so both sides do the same work. Imported only by the torch
benchmark: PyTorch is an optional dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with BasicBlocks; ``ResNet()`` is ResNet-18."""

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        num_filters: int = 64,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, num_filters, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters)
        layers, in_planes = [], num_filters
        for stage, blocks in enumerate(num_blocks):
            planes = num_filters * 2**stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around a base optimizer (the two-step PyTorch pattern).

    ``SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)``. Call
    ``step(closure)`` after the first backward pass; the closure reevaluates the loss and calls
    ``backward()``.
    """

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, **kwargs):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}.")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = [
            p.grad.norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None
        ]
        return torch.norm(torch.stack(norms), p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w <- w + e_w with e_w = rho g / ||g||."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """w <- w - e_w, then the base optimizer's step with the gradient at w + e_w."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or "e_w" not in self.state[p]:
                    continue
                p.sub_(self.state[p]["e_w"])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        if closure is None:
            raise ValueError("SAM needs a closure that reevaluates the loss and calls backward().")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()


def _set_bn_momentum(model: nn.Module, frozen: bool) -> None:
    """Momentum 0 freezes BatchNorm's running statistics (the second pass must not move them)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if frozen:
                module.backup_momentum = module.momentum
                module.momentum = 0
            elif hasattr(module, "backup_momentum"):
                module.momentum = module.backup_momentum


def augment_and_normalize(
    images_uint8: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    padding: int = 4,
    channels_last: bool = False,
) -> torch.Tensor:
    """NHWC uint8 -> NCHW float: random crop (zero padding) and flip per image, normalized."""
    batch, height, width, _ = images_uint8.shape
    device = images_uint8.device
    x = images_uint8.permute(0, 3, 1, 2).float()
    x = F.pad(x, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (batch,), device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), device=device)
    rows = (top[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width, device=device))[:, None, None, :]
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    channel_index = torch.arange(x.shape[1], device=device)[None, :, None, None]
    x = x[batch_index, channel_index, rows, cols]
    flip = torch.rand(batch, device=device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    x = (x - mean[None, :, None, None]) / std[None, :, None, None]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def sam_train_step(
    model: nn.Module,
    optimizer: SAM,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """One SAM step: first pass and backward, then ``optimizer.step(closure)``. Returns the loss
    of the first pass (not synchronized)."""
    model.train()
    x = augment_and_normalize(images_uint8, mean, std, channels_last=channels_last)
    device_type = x.device.type

    def loss_of_batch() -> torch.Tensor:
        with torch.autocast(
            device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            return F.cross_entropy(model(x), labels)

    loss = loss_of_batch()
    loss.backward()

    def closure() -> torch.Tensor:
        _set_bn_momentum(model, frozen=True)
        second = loss_of_batch()
        second.backward()
        _set_bn_momentum(model, frozen=False)
        return second

    optimizer.step(closure)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
