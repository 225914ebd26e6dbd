"""Building blocks shared by the generative models, for any `spatial_dims` (2 or 3).

Layers come from MONAI (`monai.networks.blocks.Convolution`, which wraps the Conv/Norm/Act
factories). What MONAI lacks is written here: the DCGAN-style trunks (k4 s2 conv stacks), the
class-conditioned linear layer and the projection head of a projection discriminator.

Channel plan shared by every trunk: at resolution image_size / 2**k (k >= 1) a feature map has
`base_width * 2**(k-1)` channels, so the 4^d bottleneck of a 64^d image has 8 * base_width channels
(the 3dbraingen layout; base_width 64 gives 512).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import GaussianFilter
from torch import nn

from medgen.errors import MedgenError

NORMS = ("batch", "instance", "layer", "none")
UPSAMPLES = ("transpose", "nearest")
BOTTLENECK = 4  # spatial size of the smallest feature map


def num_stages(image_size: int, what: str = "model") -> int:
    """Number of x2 stages between the 4^d bottleneck and `image_size` (log2(image_size / 4)).

    Args:
        image_size: edge length of the (cubic/square) image; must be 4 * 2**k with k >= 1.
        what: name used in the error message.
    """
    n = math.log2(image_size / BOTTLENECK) if image_size > 0 else -1
    if n < 1 or n != int(n):
        raise MedgenError(f"{what}: image_size must be 8, 16, 32, 64, 128, ... (4 * 2**k), got {image_size}")
    return int(n)


def stage_channels(base_width: int, k: int) -> int:
    """Channels of a feature map downsampled k >= 1 times from full resolution."""
    return base_width * 2 ** (k - 1)


def norm_arg(norm: str, what: str = "model") -> str | tuple | None:
    """Translate a norm name (batch | instance | layer | none) into a MONAI norm argument.

    "layer" is GroupNorm with one group (normalises over channels and space per sample, the
    layer norm recommended for WGAN-GP critics); "instance" is affine instance norm.
    """
    if norm not in NORMS:
        raise MedgenError(f"{what}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return {
        "batch": "batch",
        "instance": ("instance", {"affine": True}),
        "layer": ("group", {"num_groups": 1}),
        "none": None,
    }[norm]


class DownBlock(Convolution):
    """k4 s2 p1 convolution -> norm -> LeakyReLU(0.2): halves every spatial size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        norm: batch | instance | layer | none.
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, *, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch",
                 negative_slope: float = 0.2) -> None:
        n = norm_arg(norm)
        super().__init__(spatial_dims, in_channels, out_channels, strides=2, kernel_size=4, padding=1,
                         act=("leakyrelu", {"negative_slope": negative_slope}), norm=n, bias=n is None)


class UpBlock(nn.Sequential):
    """Doubles every spatial size: transposed k4 s2 p1 conv, or nearest upsampling + k3 conv.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        upsample: "transpose" (DCGAN, 3dbraingen) or "nearest" (upsample + conv, no checkerboard).
        norm: batch | instance | layer | none.
        act: MONAI activation name or (name, kwargs); None for a bare convolution (output layers).
    """

    def __init__(self, *, spatial_dims: int, in_channels: int, out_channels: int, upsample: str = "transpose",
                 norm: str = "batch", act: str | tuple | None = "relu") -> None:
        if upsample not in UPSAMPLES:
            raise MedgenError(f"model: upsample must be one of {', '.join(UPSAMPLES)}, got {upsample!r}")
        n = norm_arg(norm)
        conv_only = n is None and act is None
        if upsample == "transpose":
            layers = [Convolution(spatial_dims, in_channels, out_channels, strides=2, kernel_size=4, padding=1,
                                  output_padding=0, is_transposed=True, act=act, norm=n, bias=n is None,
                                  conv_only=conv_only)]
        else:
            layers = [nn.Upsample(scale_factor=2, mode="nearest"),
                      Convolution(spatial_dims, in_channels, out_channels, strides=1, kernel_size=3, padding=1,
                                  act=act, norm=n, bias=n is None, conv_only=conv_only)]
        super().__init__(*layers)


def is_soft(labels: torch.Tensor) -> bool:
    """Whether labels are class weights [B, K] (a soft condition) rather than class indices [B]."""
    return labels.is_floating_point() and labels.ndim == 2


def embed_labels(embedding: nn.Embedding, labels: torch.Tensor) -> torch.Tensor:
    """Rows of `embedding` for labels [B] (class indices), or for labels [B, K] (class weights, a soft condition:
    the weighted mean of the classes' rows) -> [B, F]."""
    if is_soft(labels):
        return labels.to(embedding.weight.dtype) @ embedding.weight  # [B, K] @ [K, F] -> [B, F]
    return embedding(labels)


def checkerboard_coefficients(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """Finest-scale diagonal Haar coefficients of x [B, C, *S]: each 2^d block (the even crop) summed with
    alternating (checkerboard) signs and divided by `divisor`, per channel -> [B, C, *S / 2].

    divisor 2^(d/2) makes the filter orthonormal (white noise of sd s gives coefficients of sd s); 2^d gives the
    signed block mean. Smooth images give about none.
    """
    d = x.ndim - 2
    kernel = torch.ones((2,) * d, dtype=x.dtype, device=x.device)
    for axis in range(d):
        index = [slice(None)] * d
        index[axis] = 1
        kernel[tuple(index)] *= -1
    kernel = (kernel / divisor).expand(x.shape[1], 1, *kernel.shape)  # one filter per channel
    conv = nn.functional.conv3d if d == 3 else nn.functional.conv2d
    even = x[(slice(None), slice(None), *[slice(0, n - n % 2) for n in x.shape[2:]])]
    return conv(even, kernel, stride=2, groups=x.shape[1])


SAMPLE_PRIORS = ("standard", "fitted")


class FittedCodePrior(nn.Module):
    """Per-class Gaussian over a trained encoder's codes, to sample from: z ~ N(0, I) -> loc_y + tril_y z.

    Why: with a small KL weight (or an adversarial code critic that does not win) the codes of the training
    volumes fill a small, tilted part of N(0, I); decoding N(0, I) draws then lands where the decoder saw no code,
    and the samples look alike. Fitting a Gaussian to the codes after training (ex-post density estimation, Ghosh
    et al. 2020) samples where the codes are. Until `fit` runs it is the identity (the standard prior).

    Args:
        num_classes: K (one Gaussian per class).
        latent_dim: L.
    """

    def __init__(self, num_classes: int, latent_dim: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(max(num_classes, 1), latent_dim))  # [K, L]
        self.register_buffer("tril", torch.eye(latent_dim).repeat(max(num_classes, 1), 1, 1))  # [K, L, L]

    @torch.no_grad()
    def fit(self, codes: torch.Tensor, labels: torch.Tensor) -> None:
        """Fit each class's mean and Ledoit-Wolf shrunk covariance (codes [N, L], labels [N]); a class with
        fewer than 2 codes keeps its Gaussian."""
        from sklearn.covariance import LedoitWolf  # only when fitting

        codes, labels = codes.detach().double().cpu(), labels.detach().cpu()
        for k in range(self.loc.shape[0]):
            ck = codes[labels == k]
            if ck.shape[0] < 2:
                continue
            cov = torch.as_tensor(LedoitWolf().fit(ck.numpy()).covariance_)
            cov = cov + 1e-6 * torch.eye(cov.shape[0], dtype=cov.dtype)  # positive definite for Cholesky
            self.loc[k] = ck.mean(0).to(self.loc)
            self.tril[k] = torch.linalg.cholesky(cov).to(self.tril)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z [B, L] and labels [B] (or class weights [B, K]) -> codes [B, L]."""
        return gaussian_codes(self.loc, self.tril, z, labels)


def gaussian_codes(loc: torch.Tensor, tril: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """loc_y + tril_y z for per-class means loc [K, L] and Cholesky factors tril [K, L, L]; class weights labels
    [B, K] take the weighted mean of the means and of the factors."""
    if is_soft(labels):
        w = labels.to(loc.dtype)
        loc, tril = w @ loc, torch.einsum("bk,kij->bij", w, tril)
    else:
        loc, tril = loc[labels], tril[labels]
    return (loc + torch.einsum("bij,bj->bi", tril, z.to(loc.dtype))).to(z.dtype)


def fitted_prior(what: str, sample_prior: str, num_classes: int, latent_dim: int) -> FittedCodePrior | None:
    """The FittedCodePrior a `sample_prior` setting asks for (None for "standard"); one error line otherwise."""
    if sample_prior not in SAMPLE_PRIORS:
        raise MedgenError(f"{what}: sample_prior must be one of {', '.join(SAMPLE_PRIORS)}, got {sample_prior!r}")
    return FittedCodePrior(num_classes, latent_dim) if sample_prior == "fitted" else None


def noise_sd(x: torch.Tensor, threshold: float = float("-inf")) -> torch.Tensor:
    """Donoho's robust noise estimate per image: median |finest diagonal Haar coefficient| / 0.6745 over the 2^d
    blocks whose voxels all lie above `threshold` (the foreground); x [B, C, *S] -> [B]."""
    d = x.ndim - 2
    coef = checkerboard_coefficients(x.float(), 2 ** (d / 2)).abs()  # [B, C, *S / 2]; white noise of sd s: sd s
    pool = nn.functional.max_pool3d if d == 3 else nn.functional.max_pool2d
    even = x.float()[(slice(None), slice(None), *[slice(0, n - n % 2) for n in x.shape[2:]])]
    inside = -pool(-even, 2) > threshold  # [B, C, *S / 2]: the block's darkest voxel is foreground
    out = []
    for c, m in zip(coef, inside, strict=True):
        values = c[m] if bool(m.any()) else c.flatten()
        out.append(values.median() / 0.6745)
    return torch.stack(out)


def content_generator(x: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded by the bytes of x: the same image gets the same draws, whatever the batching."""
    digest = hashlib.blake2b(x.detach().float().cpu().numpy().tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def blur_inside(x: torch.Tensor, fg: torch.Tensor, sigma: float) -> torch.Tensor:
    """x [B, C, *S] blurred by a Gaussian of `sigma` voxels over the foreground fg (0/1, like x) only: each voxel
    the weighted mean of its foreground neighbours, so the background does not bleed into the brain's edge."""
    blur = GaussianFilter(x.ndim - 2, sigma).to(x.device)
    return blur(x * fg) / blur(fg).clamp(min=1e-3)


class FittedIntensities(nn.Module):
    """Per-class intensity distribution and noise level of the training volumes, to map samples onto.

    Why: a generator trained for a fixed time draws the anatomy before the intensity histogram and the noise (at
    64^3 after 30 CPU minutes: too few dark CSF / partial-volume voxels, a soft brain edge, half the real noise),
    and a real-vs-synthetic test tells the sets apart by those alone; so does a classifier of the class. Each
    sample is (1) mapped, by rank, onto a quantile function drawn from the class's training volumes (histogram
    matching: the order of the voxels, hence the anatomy, stays), (2) given Gaussian noise in the foreground up
    to a noise level drawn from the class's training volumes (Donoho's estimate; log-normal), and (3) matched
    again. The quantile functions are drawn from a Gaussian over the class's per-volume quantile functions (mean
    and `rank` principal directions), so that the samples' histograms vary as much as real subjects' do: one mean
    histogram for every sample is itself a giveaway (their histogram features spread 5-10x less than real).
    Optionally, before (1), the generator's own voxel-scale texture (speckle, checkerboards: high-frequency
    energy 4 real SDs above the training volumes' on the 30-minute gan) is smoothed away inside the brain (a
    Gaussian of `smooth` voxels, normalised by the smoothed brain mask so the edge stays sharp): the noise of the
    output is then the fitted one; for an output already smoother than the training volumes (the vae's) it costs
    detail. Optionally too (`sharpen`), the opposite for an output smoother than the training volumes (the
    alpha-gan's tissue edges: edge energy 1.1 real SDs below the training volumes'): the detail x - blur(x) inside
    the brain (a Gaussian of SHARPEN_SIGMA voxels, normalised as above) is added back with a gain, fitted on the
    model's own samples (`fit_gain`) so that the output's mean detail energy equals the training volumes'; no
    voxel is moved across the brain / background split.
    Brain-extracted volumes (a background at the minimum intensity) are matched in two parts, so that
    averaging quantile functions over subjects with different brain sizes does not invent edge intensities no
    real volume has: voxels below a threshold halfway between the background and the darkest foreground become
    background, the rest are matched to the mean quantile function of the foreground. Until `fit` runs it is the
    identity.

    Args:
        num_classes: K (one quantile function and noise level per class).
        num_quantiles: points of each quantile function.
        rank: principal directions of the per-class quantile-function variation (0: the class mean for all).
        smooth: SD in voxels of the Gaussian that removes the generator's voxel-scale texture (0: none).
        sharpen: restore the training volumes' edge detail with a fitted gain (see `fit_gain`).
    """

    MIN_BACKGROUND = 0.01  # mean background fraction below which the volumes are matched as a whole
    SHARPEN_SIGMA = 0.7  # voxels: the scale of the detail that `sharpen` restores
    MAX_GAIN = 4.0

    def __init__(self, num_classes: int, num_quantiles: int = 1024, rank: int = 8, smooth: float = 0.0,
                 sharpen: bool = False) -> None:
        super().__init__()
        self.smooth = float(smooth)
        self.sharpen = bool(sharpen)
        k = max(num_classes, 1)
        self.register_buffer("quantiles", torch.zeros(k, num_quantiles))  # [K, Q] of the foreground
        self.register_buffer("directions", torch.zeros(k, rank, num_quantiles))  # [K, R, Q] unit principal axes
        self.register_buffer("spread", torch.zeros(k, rank))  # [K, R] SD along each axis
        self.register_buffer("log_noise", torch.zeros(k, 2))  # [K, (mean, sd)] of the log noise sd
        self.register_buffer("background", torch.tensor(-1.0))  # the background intensity
        self.register_buffer("threshold", torch.tensor(-2.0))  # at or below: background (finite: checkpoints)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("detail_target", torch.tensor(0.0))  # training volumes' mean detail energy
        self.register_buffer("gain", torch.tensor(0.0))  # of the detail added back (sharpen; set by fit_gain)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Fit to images [N, C, *S] with labels [N]: the background (the minimum intensity, when at least 1 % of
        the voxels hold it on average), the threshold, each class's mean over its volumes of the foreground
        quantile functions at probabilities (j + 0.5) / Q with their principal directions of variation, and the
        mean and SD of its log noise levels (a class without volumes: those of all)."""
        q = self.quantiles.shape[1]
        probs = (torch.arange(q, dtype=torch.float64) + 0.5) / q
        flat = [x.detach().double().cpu().flatten() for x in images]
        low = min(float(v.min()) for v in flat)
        is_bg = [v <= low + 1e-3 for v in flat]
        split = float(torch.stack([m.double().mean() for m in is_bg]).mean()) >= self.MIN_BACKGROUND
        fg = [v[~m] if split and bool((~m).any()) else v for v, m in zip(flat, is_bg, strict=True)]
        per_volume = torch.stack([torch.quantile(v, probs) for v in fg])  # [N, Q]
        threshold = (low + float(per_volume[:, 0].mean())) / 2 if split else low - 1.0  # no background: none
        log_sd = torch.log(noise_sd(images.detach().cpu(), threshold).double().clamp(min=1e-6))  # [N]
        labels = labels.detach().cpu()
        for k in range(self.quantiles.shape[0]):
            rows = (labels == k) if bool((labels == k).any()) else torch.ones_like(labels, dtype=torch.bool)
            group, n_k = per_volume[rows], int(rows.sum())  # [Nk, Q]
            self.quantiles[k] = group.mean(0).to(self.quantiles)
            self.directions[k].zero_()
            self.spread[k].zero_()
            r = min(self.spread.shape[1], n_k - 1)
            if r > 0:
                _, sv, vh = torch.linalg.svd(group - group.mean(0), full_matrices=False)
                self.directions[k, :r] = vh[:r].to(self.directions)
                self.spread[k, :r] = (sv[:r] / (n_k - 1) ** 0.5).to(self.spread)
            spread = log_sd[rows].std() if n_k > 1 else torch.tensor(0.0)
            self.log_noise[k] = torch.stack([log_sd[rows].mean(), spread]).to(self.log_noise)
        self.background.fill_(low)
        self.threshold.fill_(threshold)
        if self.sharpen:
            energy = torch.cat([self.detail_energy(images[i : i + 32].detach().cpu().float(), threshold)
                                for i in range(0, images.shape[0], 32)])
            self.detail_target.fill_(float(energy.mean()))
        self.fitted.fill_(True)

    @torch.no_grad()
    def fit_gain(self, samples: torch.Tensor, labels: torch.Tensor, steps: int = 4) -> float:
        """Set the gain of `sharpen` so that the layer's output for the model's raw samples [B, C, *S] with labels
        [B] has the training volumes' mean detail energy: secant steps on the gain in [0, MAX_GAIN] (the energy
        grows about linearly with it); 0 when the samples already have as much detail. Returns the gain."""
        if not (self.sharpen and bool(self.fitted)):
            return float(self.gain)
        threshold, target = float(self.threshold), float(self.detail_target)

        def excess(gain: float) -> float:
            self.gain.fill_(gain)
            return float(self.detail_energy(self(samples, labels).float(), threshold).mean()) - target

        a0, e0 = 0.0, excess(0.0)
        if e0 >= 0:
            self.gain.fill_(0.0)
            return 0.0
        a1, e1 = 1.0, excess(1.0)
        for _ in range(steps):
            if abs(e1) < 1e-3 * target or abs(e1 - e0) < 1e-9:  # converged (0.1 %), or flat
                break
            a0, e0, a1 = a1, e1, min(max(a1 - e1 * (a1 - a0) / (e1 - e0), 0.0), self.MAX_GAIN)
            e1 = excess(a1)
        self.gain.fill_(a1)
        return a1

    def detail(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """x [B, C, *S] minus its blur (SHARPEN_SIGMA) inside the foreground (voxels above threshold); 0 outside."""
        fg = (x > threshold).to(x.dtype)
        return (x - blur_inside(x, fg, self.SHARPEN_SIGMA)) * fg

    def detail_energy(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """Mean |detail| over the foreground of each image x [B, C, *S] -> [B]."""
        fg = (x > threshold).flatten(1).to(x.dtype)
        return (self.detail(x, threshold).abs().flatten(1) * fg).sum(1) / fg.sum(1).clamp(min=1)

    def match(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """x [B, V] mapped by rank onto the quantile functions table [B, Q] (the background apart)."""
        q = table.shape[1]
        bg = x <= self.threshold.to(x)  # [B, V]
        n_bg = bg.sum(1, keepdim=True).to(x.dtype)  # [B, 1]: background voxels sort first
        n_fg = (x.shape[1] - n_bg).clamp(min=1)
        ranks = torch.empty_like(x)
        ranks.scatter_(1, x.argsort(dim=1), torch.arange(x.shape[1], device=x.device, dtype=x.dtype).expand_as(x))
        pos = ((ranks - n_bg + 0.5) / n_fg * q - 0.5).clamp(0, q - 1)  # foreground rank -> quantile table
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=q - 1)
        w = pos - lo
        out = torch.gather(table, 1, lo) * (1 - w) + torch.gather(table, 1, hi) * w
        return torch.where(bg, self.background.to(out), out)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images x [B, C, *S] with labels [B] (or class weights [B, K]: the weighted mean quantile function, its
        variation and log noise) -> the same voxel order with the class's intensities and noise; x unchanged
        before `fit`. The draws come from generators seeded by each image's bytes (same image, same output)."""
        if not bool(self.fitted):
            return x
        k = self.quantiles.shape[0]
        w = (labels.float() if is_soft(labels)
             else nn.functional.one_hot(labels.long(), k).float()).to(x.device)  # [B, K]
        quantiles, log_noise = self.quantiles.to(x.device, torch.float32), self.log_noise.to(x.device, torch.float32)
        axes = (self.spread[..., None] * self.directions).to(x.device, torch.float32)  # [K, R, Q]
        draws = [content_generator(x[i]) for i in range(x.shape[0])]
        coef = torch.stack([torch.randn(axes.shape[1], generator=g) for g in draws]).to(x.device)  # [B, R]
        # one quantile function per sample: the class mean plus a Gaussian draw along its principal axes
        table = (w @ quantiles + torch.einsum("bk,br,krq->bq", w, coef, axes)).sort(dim=1).values  # [B, Q]
        log_noise = w @ log_noise  # [B, 2]
        threshold = float(self.threshold)
        smooth = self.smoothed(x.float(), threshold)
        if self.sharpen and float(self.gain) > 0:
            sharp = smooth + float(self.gain) * self.detail(smooth, threshold)
            # no voxel crosses the brain / background split: sharpened, the brain's dark rim fell below it (3 % of
            # the brain at gain 0.68) and the matching made it background, which the anatomy features saw
            smooth = torch.where(smooth > threshold, sharp.clamp(min=threshold + 1e-3), smooth)
        matched = self.match(smooth.reshape(x.shape[0], -1), table).reshape(x.shape)  # [B, C, *S]
        have = noise_sd(matched, threshold).to(matched)  # [B]
        noisy = []
        for i, g in enumerate(draws):
            target = torch.exp(log_noise[i, 0] + log_noise[i, 1] * torch.randn((), generator=g).to(matched))
            extra = (target**2 - have[i] ** 2).clamp(min=0).sqrt()
            fresh = torch.randn(tuple(x.shape[1:]), generator=g).to(matched)
            noisy.append(torch.where(matched[i] > threshold, matched[i] + extra * fresh, matched[i]))
        out = self.match(torch.stack(noisy).reshape(x.shape[0], -1), table)
        return out.reshape(x.shape).to(x.dtype)

    def smoothed(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """x [B, C, *S] smoothed inside its foreground (voxels above threshold) only; the background as it is."""
        if self.smooth <= 0:
            return x
        fg = (x > threshold).to(x.dtype)
        return torch.where(fg > 0, blur_inside(x, fg, self.smooth), x)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints written before the quantile-function variation existed: no variation (their behaviour)
        # and before `sharpen`: no detail added (gain 0)
        for name in ("directions", "spread", "detail_target", "gain"):
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fitted_intensities(match_intensities: bool, num_classes: int, smooth: float = 0.0,
                       sharpen: bool = False) -> FittedIntensities | None:
    """The FittedIntensities a `match_intensities` / `intensity_smooth` / `intensity_sharpen` setting asks for
    (None when off)."""
    if smooth < 0:
        raise MedgenError(f"intensity_smooth must be >= 0 (voxels), got {smooth}")
    if sharpen and not match_intensities:
        raise MedgenError("intensity_sharpen needs match_intensities: true")
    return FittedIntensities(num_classes, smooth=smooth, sharpen=sharpen) if match_intensities else None


class ClassConditionedLinear(nn.Module):
    """Linear layer on [x, one_hot(label)]: W x + E[label], with E a learned class embedding.

    This is the class-embedding helper of the conditional models: a learned embedding concatenated
    to x and followed by a linear layer is the same function, without building the concatenation.

    Args:
        in_features: size of x (0 for an embedding only).
        out_features: output size.
        num_classes: number of classes (0 for an unconditional layer).
    """

    def __init__(self, *, in_features: int, out_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.embed = nn.Embedding(num_classes, out_features) if num_classes > 0 else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """x [B, in_features]; labels [B] class indices, or [B, num_classes] class weights (a soft condition,
        e.g. between two classes: the weighted mean of their embeddings)."""
        out = self.linear(x)
        if self.embed is not None:
            out = out + embed_labels(self.embed, labels)
        return out


class DownTrunk(nn.Sequential):
    """Stack of DownBlocks from `image_size` down to the 4^d bottleneck.

    The first block has no normalisation (DCGAN convention); output: [B, base_width * 2**(n-1), 4, ...].

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        image_size: input edge length (4 * 2**n).
        base_width: channels after the first block.
        norm: normalisation of the other blocks.
    """

    def __init__(self, *, spatial_dims: int, in_channels: int, image_size: int, base_width: int,
                 norm: str) -> None:
        n = num_stages(image_size)
        chans = [in_channels] + [stage_channels(base_width, k) for k in range(1, n + 1)]
        blocks = [DownBlock(spatial_dims=spatial_dims, in_channels=chans[k], out_channels=chans[k + 1],
                            norm="none" if k == 0 else norm) for k in range(n)]
        super().__init__(*blocks)
        self.out_channels = chans[-1]


class ProjectionHead(nn.Module):
    """Critic head on the 4^d bottleneck: a full-size conv (a linear layer on the flattened map,
    as in 3dbraingen) plus the class projection term <embed(label), features> (Miyato & Koyama 2018).

    Args:
        spatial_dims: 2 or 3.
        in_channels: bottleneck channels.
        num_classes: number of classes (0: no projection term).
    """

    def __init__(self, *, spatial_dims: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.linear = Convolution(spatial_dims, in_channels, 1, kernel_size=BOTTLENECK, padding=0, conv_only=True)
        size = in_channels * BOTTLENECK**spatial_dims
        self.embed = nn.Embedding(num_classes, size) if num_classes > 0 else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.linear(h).reshape(h.shape[0])  # [B, 1, 1, ...] -> [B]
        if self.embed is not None:
            # [B, C*4^d] -> [B, C, 4, ...]; elementwise product works for any memory format.
            e = self.embed(labels).view(h.shape)
            out = out + (e * h).sum(dim=tuple(range(1, h.ndim)))
        return out

