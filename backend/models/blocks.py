"""YOLO-NAS building blocks: Conv-BN-ReLU, QARepVGG, the CSP layer with its bottleneck, and SPP.

Follows super-gradients' YOLO-NAS (Apache-2.0) as described in docs/yolo_nas.md §2, and
QARepVGG (Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", arXiv 2212.01593).
Module and attribute names reproduce the official state-dict keys so official checkpoints load unchanged.
All convolutions keep the spatial size (padding = kernel // 2) unless they have stride 2, which halves it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

# Official YOLO-NAS sets these on every BatchNorm after construction (PyTorch convention: 0.03 is the weight
# of the new batch statistic).
BN_EPS = 1e-3
BN_MOMENTUM = 0.03

FusionState = Literal["none", "partial", "full"]


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds an eval-mode BatchNorm into the convolution in front of it.

    Args:
        weight: (out, in/groups, k, k) convolution weight.
        bias: (out,) convolution bias, or None.
        bn: the BatchNorm2d that follows the convolution.

    Returns:
        The weight and bias of one convolution equal to conv followed by bn (with running statistics).
    """
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("fold_batch_norm needs a BatchNorm with running statistics")
    scale = bn.weight / torch.sqrt(var + bn.eps)  # (out,)
    fused_weight = weight * scale.reshape(-1, 1, 1, 1)
    conv_bias = bias if bias is not None else torch.zeros_like(mean)
    fused_bias = (conv_bias - mean) * scale + bn.bias
    return fused_weight, fused_bias


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) → BatchNorm → ReLU; keys `conv.*`, `bn.*`. Used in CSP, SPP and the neck."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = batch_norm(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class HeadConvBNReLU(nn.Module):
    """The heads' Conv-BN-ReLU: the same math as `ConvBNReLU`, official keys under `seq.conv`, `seq.bn`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.seq = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2, bias=False),
                bn=batch_norm(out_channels),
                act=nn.ReLU(inplace=True),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class QARepVGGBlock(nn.Module):
    """QARepVGG block as YOLO-NAS uses it: 3x3+BN, 1x1 with bias, optional identity, summed → post BN → ReLU.

    `fuse(full=False)` merges the three branches into `rbr_reparam` and keeps `post_bn` (trainable; the form
    quantization starts from). `fuse(full=True)` also folds `post_bn`, leaving one 3x3 conv + ReLU.
    `rbr_reparam` exists from construction, as in the official model, so parameter counts and checkpoints
    match; it is unused until fusion.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, use_identity: bool = True):
        super().__init__()
        if use_identity and (in_channels != out_channels or stride != 1):
            raise ValueError("the identity branch needs in_channels == out_channels and stride 1")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.use_identity = use_identity
        self.fusion: FusionState = "none"
        self.branch_3x3 = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                bn=batch_norm(out_channels),
            )
        )
        self.branch_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=True)
        self.post_bn = batch_norm(out_channels)
        self.rbr_reparam = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=True)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) → (B, out, H/stride, W/stride)
        if self.fusion == "full":
            return self.act(self.rbr_reparam(x))
        if self.fusion == "partial":
            return self.act(self.post_bn(self.rbr_reparam(x)))
        y = self.branch_3x3(x) + self._branch_1x1(x)
        if self.use_identity:
            y = y + x
        return self.act(self.post_bn(y))

    def _branch_1x1(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 branch. At stride s it is the 1x1 conv at stride 1 of every s-th row and column (a 1x1 kernel with
        no padding reads only those pixels), computed that way: the strided form's weight gradient in channels-last
        crashes oneDNN on AVX2 CPUs for 3 or 4 input channels (the stem; torch 2.13, see docs/training_speed.md),
        and no discarded output is computed."""
        if self.stride == 1:
            return self.branch_1x1(x)
        step = self.stride
        return F.conv2d(x[:, :, ::step, ::step], self.branch_1x1.weight, self.branch_1x1.bias)

    def _merged_branches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (out, in, 3, 3) kernel and (out,) bias of one conv equal to the sum of the three branches."""
        conv, bn = cast(nn.Conv2d, self.branch_3x3.conv), cast(nn.BatchNorm2d, self.branch_3x3.bn)
        kernel, bias = fold_batch_norm(conv.weight, None, bn)
        # A 1x1 kernel zero-padded to 3x3 at the centre is exact, also at stride 2, because the 3x3 pads by 1.
        kernel = kernel + F.pad(self.branch_1x1.weight, [1, 1, 1, 1])
        bias = bias + cast(torch.Tensor, self.branch_1x1.bias)
        if self.use_identity:
            identity = torch.zeros_like(kernel)
            channels = torch.arange(self.out_channels)
            identity[channels, channels, 1, 1] = 1.0
            kernel = kernel + identity
        return kernel, bias

    @torch.no_grad()
    def fuse(self, full: bool = False) -> None:
        """Re-parameterises the block in place (eval-mode statistics). Idempotent; full fusion is one-way."""
        if self.fusion == "none":
            kernel, bias = self._merged_branches()
            self.rbr_reparam.weight.copy_(kernel)
            cast(torch.Tensor, self.rbr_reparam.bias).copy_(bias)
            del self.branch_3x3, self.branch_1x1
            self.fusion = "partial"
        if full and self.fusion == "partial":
            kernel, bias = fold_batch_norm(self.rbr_reparam.weight, self.rbr_reparam.bias, self.post_bn)
            self.rbr_reparam.weight.copy_(kernel)
            cast(torch.Tensor, self.rbr_reparam.bias).copy_(bias)
            del self.post_bn
            self.rbr_reparam.requires_grad_(False)
            self.fusion = "full"


class YoloNASBottleneck(nn.Module):
    """y = alpha·x + cv2(cv1(x)), with a learnable scalar alpha (official init 1.0).

    Backbone and up-stages use QARepVGG blocks (with identity) for cv1/cv2; down-stages use 3x3 Conv-BN-ReLU.
    """

    def __init__(self, channels: int, use_qarepvgg: bool):
        super().__init__()
        if use_qarepvgg:
            self.cv1: nn.Module = QARepVGGBlock(channels, channels)
            self.cv2: nn.Module = QARepVGGBlock(channels, channels)
        else:
            self.cv1 = ConvBNReLU(channels, channels, 3)
            self.cv2 = ConvBNReLU(channels, channels, 3)
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.cv2(self.cv1(x))


class CSPLayer(nn.Module):
    """YOLO-NAS CSP layer: a chain of bottlenecks beside a 1x1 path, concatenated and mixed by a 1x1 conv.

    Concatenation order (matters for checkpoints): [chain outputs..., conv2(x)], where the chain outputs are the
    last bottleneck's output, or with `concat_intermediates` [conv1(x), b1, ..., bn].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        hidden_channels: int,
        use_qarepvgg: bool,
        concat_intermediates: bool = False,
    ):
        super().__init__()
        self.concat_intermediates = concat_intermediates
        concat_channels = hidden_channels * (2 + num_blocks * int(concat_intermediates))
        # Registration order follows the official model, so state-dict keys come out in the same order.
        self.conv1 = ConvBNReLU(in_channels, hidden_channels, 1)
        self.conv2 = ConvBNReLU(in_channels, hidden_channels, 1)
        self.conv3 = ConvBNReLU(concat_channels, out_channels, 1)
        self.bottlenecks = nn.Sequential(*[YoloNASBottleneck(hidden_channels, use_qarepvgg) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) → (B, out, H, W)
        y = self.conv1(x)
        chain = [y]
        for bottleneck in self.bottlenecks:
            y = bottleneck(y)
            chain.append(y)
        if not self.concat_intermediates:
            chain = [y]
        return self.conv3(torch.cat([*chain, self.conv2(x)], dim=1))


class SPP(nn.Module):
    """Spatial pyramid pooling: 1x1 halving conv, max-pools 5/9/13 in parallel, concat [x, p5, p9, p13], 1x1."""

    def __init__(self, in_channels: int, out_channels: int, pool_sizes: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBNReLU(in_channels, hidden, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in pool_sizes)
        self.cv2 = ConvBNReLU(hidden * (len(pool_sizes) + 1), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) → (B, out, H, W)
        x = self.cv1(x)
        return self.cv2(torch.cat([x, *(pool(x) for pool in self.m)], dim=1))
