"""Batched augmentation of uint8 image tensors, each sample with its own random parameters.

The device path of :mod:`sepp.data`: small datasets live on the accelerator as uint8 and are augmented there,
because PIL/torchvision augmentation in DataLoader workers cannot keep up with a GPU step on CIFAR-size
images. The recipe and the random distributions are those of :func:`sepp.data.transforms.view_transform`
(torchvision v2); the arithmetic is torchvision's on float images. Every random number is drawn with
``torch`` on the images' device, so a call never waits for the device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from sepp.data.recipes import ViewSpec

# ITU-R 601 luma weights, as in torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of float RGB images ``[B, 3, H, W]`` -> ``[B, 1, H, W]``."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # torchvision's formulation (after Pillow), so hue shifts agree with F.adjust_hue to float rounding.
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    span = maxc - minc
    s = span / torch.where(eqc, torch.ones_like(maxc), maxc)
    span = torch.where(eqc, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Closed form of the six-sextant table: channel n is v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6.
    h6 = h * 6.0
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, 1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``factor`` (fraction of a turn, in [-0.5, 0.5])."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + factor.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v).clamp_(0.0, 1.0)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample 1-D Gaussian kernels ``[B, K]``, sampled as torchvision's gaussian_blur does."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    grid = torch.linspace(-lim, lim, kernel_size, device=sigma.device, dtype=sigma.dtype)
    return torch.softmax(-(grid / sigma[:, None]).pow(2), dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image with its own sigma: separable depthwise convolution, reflect padding."""
    b, c, hh, ww = x.shape
    k = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # [B*C, K]
    pad = kernel_size // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, b * c, hh + 2 * pad, ww + 2 * pad)
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    return y.view(b, c, hh, ww)


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(_per_sample(apply) & (x >= threshold), 1.0 - x, x)


def _clamp_to_box(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                  width: torch.Tensor) -> torch.Tensor:
    """Each image with everything outside its box replaced by the nearest box pixel (edge replication)."""
    b, c, hh, ww = x.shape
    rows = torch.arange(hh, device=x.device).expand(b, hh)
    cols = torch.arange(ww, device=x.device).expand(b, ww)
    rows = torch.minimum(torch.maximum(rows, top[:, None]), (top + height - 1)[:, None])
    cols = torch.minimum(torch.maximum(cols, left[:, None]), (left + width - 1)[:, None])
    x = x.gather(2, rows[:, None, :, None].expand(b, c, hh, ww))
    return x.gather(3, cols[:, None, None, :].expand(b, c, hh, ww))


def resized_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                 width: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box ``(top, left, height, width)`` (int64 ``[B]`` each) of float images, resampled to
    ``size x size``; torchvision's ``resized_crop`` per sample.

    roi_align with ``aligned=True`` samples bilinearly at the source points of ``F.interpolate(...,
    align_corners=False)`` on the crop (one sample per output pixel when enlarging). Samples within half a
    pixel of the box edge would blend in pixels outside the crop, where torchvision replicates the crop's
    edge; replicating the edge first makes the two agree. When a crop is shrunk, each output pixel averages
    a grid of samples over its footprint, a box filter in place of torchvision's antialiasing. The grid is
    fixed per call (the largest shrink factor the input allows) rather than adaptive per box, because
    torchvision's pure-PyTorch fallback (taken under deterministic algorithms on CUDA) would otherwise
    allocate a full-image grid per output pixel.
    """
    b, _, hh, ww = x.shape
    x = _clamp_to_box(x, top, left, height, width)
    grid = max(1, math.ceil(max(hh, ww) / size))
    boxes = torch.stack([torch.arange(b, device=x.device), left, top, left + width, top + height], dim=1)
    return roi_align(x, boxes.to(x.dtype), output_size=(size, size), spatial_scale=1.0, sampling_ratio=grid,
                     aligned=True)


def _crop_boxes(s: ViewSpec, batch: int, height: int, width: int, rand, uniform):
    """RandomResizedCrop's boxes ``(top, left, height, width)`` (int64 ``[batch]``), drawn with ``rand`` /
    ``uniform``: ten attempts per sample at once, the first that fits wins; torchvision's fallback otherwise."""
    attempts = 10
    area = float(height * width)
    target = area * uniform(s.crop_scale[0], s.crop_scale[1], batch, attempts)
    aspect = torch.exp(uniform(math.log(s.crop_ratio[0]), math.log(s.crop_ratio[1]), batch, attempts))
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first True (0 when none)
    cw = cw.gather(1, first).squeeze(1)
    ch = ch.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    # torchvision's fallback: the whole image, clamped to the allowed aspect ratios, centred.
    in_ratio = width / height
    if in_ratio < min(s.crop_ratio):
        fw, fh = width, int(round(width / min(s.crop_ratio)))
    elif in_ratio > max(s.crop_ratio):
        fw, fh = int(round(height * max(s.crop_ratio))), height
    else:
        fw, fh = width, height
    cw = torch.where(found, cw, torch.full_like(cw, fw)).long()
    ch = torch.where(found, ch, torch.full_like(ch, fh)).long()
    u = rand(2, batch)
    top = torch.minimum((u[0] * (height - ch + 1)).long(), height - ch)
    left = torch.minimum((u[1] * (width - cw + 1)).long(), width - cw)
    top = torch.where(found, top, (height - ch) // 2)
    left = torch.where(found, left, (width - cw) // 2)
    return top, left, ch, cw


class BatchAugment:
    """One view distribution (a :class:`ViewSpec`) applied to a batch of uint8 images on any device.

    ``aug(images_uint8[B, 3, H, W], generator=None) -> float32 [B, 3, size, size]`` (normalised), each sample
    with its own crop, flip, jitter, grayscale, blur and solarize draws, in the recipe's order.
    """

    def __init__(self, spec: ViewSpec):
        self.spec = spec
        # Per-device constants, built once: creating them from Python lists in every call would copy host to
        # device (and synchronise) each batch.
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"BatchAugment({self.spec})"

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device)
            std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, 3, 1, 1).to(device)
            self._consts[device] = (mean, std)
        return self._consts[device]

    def sample_params(self, batch: int, height: int, width: int, device: torch.device | str,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """All random parameters of ``batch`` views of ``height x width`` images, as tensors on ``device``.

        Keys: ``top, left, height, width`` (int64 crop boxes), ``flip, jitter, gray, blur, solarize`` (bool),
        ``brightness, contrast, saturation, hue, sigma`` (float32) and ``order`` (int64 ``[B, 4]``, a random
        permutation of brightness=0, contrast=1, saturation=2, hue=3 per sample).
        """
        s = self.spec

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, device=device, generator=generator)

        def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return lo + (hi - lo) * rand(*shape)

        top, left, ch, cw = _crop_boxes(s, batch, height, width, rand, uniform)

        def factor(x: float) -> torch.Tensor:
            return uniform(max(0.0, 1.0 - x), 1.0 + x, batch)

        return {
            "top": top, "left": left, "height": ch, "width": cw,
            "flip": rand(batch) < s.flip_p,
            "jitter": rand(batch) < s.jitter_p,
            "brightness": factor(s.brightness),
            "contrast": factor(s.contrast),
            "saturation": factor(s.saturation),
            "hue": uniform(-s.hue, s.hue, batch),
            "order": rand(batch, 4).argsort(dim=1),
            "gray": rand(batch) < s.gray_p,
            "blur": rand(batch) < s.blur_p,
            "sigma": uniform(s.blur_sigma[0], s.blur_sigma[1], batch),
            "solarize": rand(batch) < s.solarize_p,
        }

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The deterministic part: uint8 (or [0, 1] float) images and drawn parameters -> normalised views."""
        s = self.spec
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = resized_crop(x, params["top"], params["left"], params["height"], params["width"], s.size)
        x = torch.where(_per_sample(params["flip"]), x.flip(-1), x)
        if s.jitter_p > 0:
            x = self._jitter(x, params)
        if s.gray_p > 0:
            x = torch.where(_per_sample(params["gray"]), grayscale(x).expand_as(x), x)
        if s.blur_p > 0:
            x = torch.where(_per_sample(params["blur"]), gaussian_blur(x, params["sigma"], s.blur_kernel), x)
        if s.solarize_p > 0:
            x = solarize(x, params["solarize"], s.solarize_threshold)
        mean, std = self._mean_std(x.device)
        return (x - mean) / std

    def _jitter(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        # Four slots; in each, every sample runs the op its permutation puts there. Brightness, contrast and
        # saturation with factor 1 are exact identities, so those ops run on the whole batch with neutral
        # factors elsewhere; the hue round trip through HSV is not exact, so its result is selected.
        s, on, order = self.spec, params["jitter"], params["order"]
        one = torch.ones_like(params["brightness"])
        for slot in range(4):
            op = order[:, slot]
            if s.brightness > 0:
                x = adjust_brightness(x, torch.where(on & (op == 0), params["brightness"], one))
            if s.contrast > 0:
                x = adjust_contrast(x, torch.where(on & (op == 1), params["contrast"], one))
            if s.saturation > 0:
                x = adjust_saturation(x, torch.where(on & (op == 2), params["saturation"], one))
            if s.hue > 0:
                x = torch.where(_per_sample(on & (op == 3)), adjust_hue(x, params["hue"]), x)
        return x

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        b, _, hh, ww = images.shape
        return self.apply(images, self.sample_params(b, hh, ww, images.device, generator))
