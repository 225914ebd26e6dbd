"""Parallel-decoder VAE (DESIGN.md section 6): one shared encoder, K decoders, softmax-weighted mixture.

Decoder k has its own latent head (mu_k, logvar_k) and outputs an image plus a confidence logit per
pixel; the softmax of the logits over k gives per-pixel weights and the reconstruction is
sum_k w_k * image_k. Each decoder tends to take one object (or tissue), so argmax_k w_k is an
unsupervised segmentation. The same code runs on 2D scenes and 3D volumes (`spatial_dims`).

The K decoders run as one network with grouped convolutions (groups=K): decoder k owns channel
group k of every layer, so they share no weights, yet the whole bank is one conv call per stage.

Two decoder kinds (`decoder`):
- "upsample": a linear map to a 4^d feature map, then x2 upsampling stages (the first version);
- "broadcast": a spatial broadcast decoder (Watters et al. 2019): each latent is tiled over a
  `broadcast_size`^d grid, coordinate channels in [-1, 1] are appended, and stride-1 convolutions (then
  x2 upsampling stages up to `image_size`, if the grid is smaller) decode it. Position has to be read
  from the coordinates, which makes a decoder draw one compact region: the ingredient MONet, IODINE
  and Slot Attention share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.blocks import Convolution
from torch import nn

from medgen.errors import MedgenError
from medgen.models.blocks import BOTTLENECK, UPSAMPLES, DownTrunk, num_stages, stage_channels
from medgen.models.registry import register_model


@dataclass
class ParallelVAEOutput:
    """Outputs of ParallelVAE.forward.

    Attributes:
        recon: weighted reconstruction [B, C, *S] in [-1, 1].
        images: per-decoder images [B, K, C, *S] in [-1, 1].
        logits: per-decoder confidence logits [B, K, 1, *S].
        weights: softmax of the logits over K [B, K, 1, *S].
        mu: posterior means [B, K, L].
        logvar: posterior log-variances [B, K, L].
    """

    recon: torch.Tensor
    images: torch.Tensor
    logits: torch.Tensor
    weights: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


def per_decoder_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Decoder k's own linear map applied to its row: x [B, K, I], weight [K, I, O], bias [K, O] -> [B, K, O]."""
    return torch.einsum("bki,kio->bko", x, weight.to(x.dtype)) + bias


class DecoderBank(nn.Module):
    """K independent decoders run together: latents [B, K, L] -> per-decoder outputs [B, K, C+1, *S].

    Args:
        spatial_dims: 2 or 3.
        out_channels: channels per decoder (image channels + 1 confidence logit).
        image_size: output edge length.
        base_width: per-decoder channels at half resolution (doubling towards the bottleneck).
        num_decoders: K.
        latent_per_decoder: L, latent size per decoder.
        upsample: "nearest" (upsample + k3 conv) or "transpose" (k4 s2 transposed conv).
    """

    def __init__(self, *, spatial_dims: int, out_channels: int, image_size: int, base_width: int,
                 num_decoders: int, latent_per_decoder: int, upsample: str = "nearest") -> None:
        super().__init__()
        if upsample not in UPSAMPLES:
            raise MedgenError(f"model 'parallel-vae': upsample must be one of {', '.join(UPSAMPLES)}, got {upsample!r}")
        n = num_stages(image_size, "model 'parallel-vae'")
        k = num_decoders
        self.spatial_dims, self.k, self.out_channels = spatial_dims, k, out_channels
        self.top = stage_channels(base_width, n)
        features = self.top * BOTTLENECK**spatial_dims
        # one linear map per decoder: weight [K, L, F] (per_decoder_linear)
        self.fc_weight = nn.Parameter(torch.randn(k, latent_per_decoder, features) / latent_per_decoder**0.5)
        self.fc_bias = nn.Parameter(torch.zeros(k, features))
        layers: list[nn.Module] = [nn.ReLU()]
        chans = [stage_channels(base_width, s) for s in range(n, 0, -1)] + [out_channels]
        for i in range(n):
            cin, cout, last = k * chans[i], k * chans[i + 1], i == n - 1
            # the last stage outputs the per-decoder image and logit: no norm, no activation
            extra = dict(conv_only=True) if last else dict(act="relu", norm="batch")
            if upsample == "transpose":
                layers.append(Convolution(spatial_dims, cin, cout, strides=2, kernel_size=4, padding=1,
                                          is_transposed=True, output_padding=0, groups=k, **extra))
            else:  # nearest upsampling + k3 conv: no checkerboard in the weights (cleaner segmentations)
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           Convolution(spatial_dims, cin, cout, kernel_size=3, padding=1, groups=k, **extra)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        h = per_decoder_linear(z, self.fc_weight, self.fc_bias)  # [B, K, F]
        # [B, K, F] -> [B, K * top, 4, ...] (decoder k owns channel group k)
        h = h.reshape(b, self.k * self.top, *(BOTTLENECK,) * self.spatial_dims)
        out = self.net(h)
        # [B, K * (C + 1), *S] -> [B, K, C + 1, *S]
        return out.reshape(b, self.k, self.out_channels, *out.shape[2:])


DECODERS = ("upsample", "broadcast")
GROWS = ("conv", "interpolate")
ENCODERS = ("conv", "slots")
SLOT_INITS = ("learned", "random")


def halvings(image_size: int, size: int) -> int | None:
    """j with size == image_size / 2**j (j >= 0), or None when there is none."""
    j = math.log2(image_size / size) if size > 0 else -1
    return int(j) if j >= 0 and j == int(j) else None


def coordinate_grid(spatial_dims: int, size: int) -> torch.Tensor:
    """Coordinate channels [D, size, ...] with values in [-1, 1] (channel i varies along axis i)."""
    axes = torch.linspace(-1.0, 1.0, size)
    return torch.stack(torch.meshgrid(*(axes,) * spatial_dims, indexing="ij"))


class BroadcastDecoderBank(nn.Module):
    """K spatial broadcast decoders run together: latents [B, K, L] -> outputs [B, K, C+1, *S].

    Args:
        spatial_dims: 2 or 3.
        out_channels: channels per decoder (image channels + 1 confidence logit).
        image_size: output edge length.
        width: channels of every hidden layer of one decoder.
        num_decoders: K.
        latent_per_decoder: L.
        broadcast_size: edge of the grid the latent is tiled over (image_size / 2**j); smaller grids are
            followed by x2 nearest-upsampling + k3 conv stages.
        layers: stride-1 k3 conv layers on the broadcast grid.
        grow: how a grid smaller than the image reaches image_size: "conv" (x2 nearest upsampling + k3 conv
            stages) or "interpolate" (decode on the grid, then resize the images and logits, linearly; the
            cost of a decoder then stays that of the grid).
        shared: one set of decoder weights applied to every latent (as in Slot Attention) instead of K
            independent decoders: each weight learns from all K slots' objects (same cost).
    """

    def __init__(self, *, spatial_dims: int, out_channels: int, image_size: int, width: int, num_decoders: int,
                 latent_per_decoder: int, broadcast_size: int, layers: int, grow: str = "conv",
                 shared: bool = False) -> None:
        super().__init__()
        what = "model 'parallel-vae'"
        ups = halvings(image_size, broadcast_size)
        if broadcast_size < 4 or ups is None:
            raise MedgenError(f"{what}: broadcast_size must be image_size / 2**j and >= 4, got {broadcast_size} "
                              f"for image_size {image_size}")
        if layers < 1:
            raise MedgenError(f"{what}: decoder_layers must be >= 1, got {layers}")
        if grow not in GROWS:
            raise MedgenError(f"{what}: broadcast_grow must be one of {', '.join(GROWS)}, got {grow!r}")
        d = spatial_dims
        k = 1 if shared else num_decoders  # channel groups of every conv
        self.spatial_dims, self.k, self.out_channels, self.size = d, num_decoders, out_channels, broadcast_size
        self.image_size, self.grow, self.shared = image_size, grow, shared
        self.register_buffer("coords", coordinate_grid(d, broadcast_size), persistent=False)  # [D, *G]
        mods: list[nn.Module] = []
        cin = latent_per_decoder + d
        for _ in range(layers):
            mods.append(Convolution(d, k * cin, k * width, kernel_size=3, padding=1, groups=k, act="relu", norm=None))
            cin = width
        for _ in range(ups if grow == "conv" else 0):
            mods += [nn.Upsample(scale_factor=2, mode="nearest"),
                     Convolution(d, k * width, k * width, kernel_size=3, padding=1, groups=k, act="relu", norm=None)]
        mods.append(Convolution(d, k * width, k * out_channels, kernel_size=1, padding=0, groups=k, conv_only=True))
        self.net = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, k, latent = z.shape
        grid = (self.size,) * self.spatial_dims
        # [B, K, L] -> [B, K, L, *G] (the latent tiled over the grid) ++ coordinates [B, K, D, *G]
        tiled = z.reshape(b, k, latent, *(1,) * self.spatial_dims).expand(b, k, latent, *grid)
        coords = self.coords.to(z.dtype).expand(b, k, *self.coords.shape)
        h = torch.cat([tiled, coords], dim=2)
        # shared: [B, K, L+D, *G] -> [B*K, L+D, *G] (one decoder, K times); else [B, K*(L+D), *G] (K groups)
        h = h.reshape(b * k, latent + self.spatial_dims, *grid) if self.shared else \
            h.reshape(b, k * (latent + self.spatial_dims), *grid)
        out = self.net(h)
        if out.shape[-1] != self.image_size:  # grow == "interpolate": resize every decoder's maps
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            out = nn.functional.interpolate(out, size=(self.image_size,) * self.spatial_dims, mode=mode,
                                            align_corners=False)
        # [B, K * (C + 1), *S] -> [B, K, C + 1, *S]
        return out.reshape(b, k, self.out_channels, *out.shape[2:])


class SlotEncoder(nn.Module):
    """Shared encoder with slot attention (Locatello et al. 2020): images [B, C, *S] -> (mu, logvar) [B, K, L].

    A conv stack (four layers, stride 2 until the grid is reached) maps the image to a `feature_size`^d grid
    of tokens (plus a learned position embedding of coordinate channels); K slots (see `init` for where they
    start) then take `iterations` rounds of attention in which the softmax runs over the slots: slots compete for every token, so each token ends
    up explained by one slot. That competition is what a single global feature vector split into K heads
    lacks. Each slot then has its own latent head (mu_k, logvar_k), as in the conv encoder.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        image_size: input edge length.
        feature_size: edge of the token grid (image_size / 2**j).
        slot_size: D, channels of the conv stack, the tokens and the slots.
        num_slots: K.
        latent_per_decoder: L.
        iterations: attention rounds.
        init: "learned" (one learned starting vector per slot: slot k tends to keep a role, e.g. a region) or
            "random" (every slot starts from one learned Gaussian, mu + sigma * noise, as in Slot Attention: no
            slot can own a region, so the slots bind to what the image holds). Without noise (inference) the
            draws are a fixed set stored with the model.
        detach: back-propagate through the last round only, the earlier rounds' slots passed straight through
            to the learned starts (implicit differentiation, Chang et al. 2022; with learned starts, BO-QSA,
            Jia et al. 2023): stabler, cheaper gradients.
    """

    def __init__(self, *, spatial_dims: int, in_channels: int, image_size: int, feature_size: int, slot_size: int,
                 num_slots: int, latent_per_decoder: int, iterations: int, init: str = "learned",
                 detach: bool = False) -> None:
        super().__init__()
        what = "model 'parallel-vae'"
        downs = halvings(image_size, feature_size)
        if feature_size < 4 or downs is None or downs > 4:
            raise MedgenError(f"{what}: slot_feature_size must be image_size / 2**j (j <= 4) and >= 4, got "
                              f"{feature_size} for image_size {image_size}")
        if iterations < 1:
            raise MedgenError(f"{what}: slot_iterations must be >= 1, got {iterations}")
        if init not in SLOT_INITS:
            raise MedgenError(f"{what}: slot_init must be one of {', '.join(SLOT_INITS)}, got {init!r}")
        d, dim = spatial_dims, slot_size
        self.latent, self.iterations, self.scale = latent_per_decoder, iterations, slot_size**-0.5
        self.detach, self.init, self.slot_size = detach, init, slot_size
        strides = [2] * downs + [1] * (4 - downs)
        convs, cin, kernel = [], in_channels, 5 if d == 2 else 3  # k5 as the slot-attention paper in 2D; k5^3 costs 5x k3^3
        for s in strides:
            convs.append(Convolution(d, cin, dim, strides=s, kernel_size=kernel, padding=kernel // 2, act="relu",
                                     norm=None))
            cin = dim
        self.convs = nn.Sequential(*convs)
        grid = coordinate_grid(d, feature_size)
        self.register_buffer("coords", torch.cat([grid, -grid]), persistent=False)  # [2D, *G]
        self.position = nn.Linear(2 * d, dim)
        self.token_mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.norm_tokens = nn.LayerNorm(dim)
        self.to_k, self.to_v = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.norm_slots, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.gru = nn.GRUCell(dim, dim)
        self.slot_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        if init == "random":
            self.slots_mu = nn.Parameter(torch.randn(1, dim) * dim**-0.5)
            self.slots_log_sigma = nn.Parameter(torch.full((1, dim), math.log(dim**-0.5)))
            self.register_buffer("inference_noise", torch.randn(num_slots, dim))  # the fixed draws without noise
        else:
            self.slots_init = nn.Parameter(torch.randn(num_slots, dim) * dim**-0.5)  # one start per decoder
        # one latent head per slot: weight [K, D, 2L] (per_decoder_linear)
        self.head_weight = nn.Parameter(torch.randn(num_slots, dim, 2 * latent_per_decoder) * dim**-0.5 * 0.1)
        self.head_bias = nn.Parameter(torch.zeros(num_slots, 2 * latent_per_decoder))

    def round(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One attention round: slots [B, K, D], keys / values [B, N, D] -> (slots, attention [B, K, N])."""
        q = self.to_q(self.norm_slots(slots))  # [B, K, D]
        attn = torch.softmax(torch.einsum("bnd,bkd->bkn", keys, q) * self.scale, dim=1)  # softmax over slots
        share = (attn + 1e-8) / (attn + 1e-8).sum(dim=2, keepdim=True)  # weighted mean over tokens
        updates = torch.einsum("bkn,bnd->bkd", share, values)
        # GRUCell takes [B*K, D]
        slots = self.gru(updates.reshape(-1, updates.shape[-1]), slots.reshape(-1, slots.shape[-1])).view_as(slots)
        return slots + self.slot_mlp(self.norm_mlp(slots)), attn

    def starts(self, batch: int, noise: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Starting slots [B, K, D]; noise [B, K, D] (random init only; None: the stored inference draws)."""
        if self.init == "learned":
            return self.slots_init.to(dtype).expand(batch, -1, -1)
        eps = self.inference_noise.expand(batch, -1, -1) if noise is None else noise
        return (self.slots_mu + self.slots_log_sigma.exp() * eps).to(dtype)

    def attend(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, C, *S] -> (slots [B, K, D], attention of the last round [B, K, N] over the N tokens).

        Args:
            x: images.
            noise: standard normal [B, K, D] for random starting slots (None: the stored inference draws).
        """
        b = x.shape[0]
        h = self.convs(x)  # [B, D, *G]
        pos = self.position(self.coords.to(h.dtype).flatten(1).t())  # [N, D]
        # [B, D, *G] -> [B, N, D]
        tokens = self.token_mlp(h.flatten(2).transpose(1, 2) + pos)
        tokens = self.norm_tokens(tokens)
        keys, values = self.to_k(tokens), self.to_v(tokens)  # [B, N, D]
        init = self.starts(b, noise, h.dtype)  # [B, K, D]
        slots, rounds = init, self.iterations
        if self.detach and rounds > 1:
            with torch.no_grad():
                for _ in range(rounds - 1):
                    slots, _ = self.round(slots, keys, values)
            slots, rounds = slots + init - init.detach(), 1  # value of the rounds so far, gradient to the starts
        for _ in range(rounds):
            slots, attn = self.round(slots, keys, values)
        return slots, attn

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        slots, _ = self.attend(x, noise)
        stats = per_decoder_linear(slots, self.head_weight, self.head_bias)  # [B, K, 2L]
        return stats[..., : self.latent], stats[..., self.latent :]


@register_model("parallel-vae")
class ParallelVAE(nn.Module):
    """Shared encoder, K decoders with their own latent heads, softmax-weighted reconstruction.

    Args:
        spatial_dims: 2 (scenes) or 3 (volumes).
        in_channels: image channels (3 for RGB scenes, 1 for MRI).
        image_size: edge length of the square/cubic input (4 * 2**k).
        num_decoders: K, number of decoders (slots).
        latent_per_decoder: latent size of each decoder; the model's `latent_dim` (the size of one sampled
            z, the sampling protocol) is num_decoders * latent_per_decoder.
        base_width: channels of the first encoder stage and of each decoder's last stage.
        num_classes: accepted for the loop's uniform kwargs; the model is unconditional.
        norm: encoder normalisation (batch | instance | layer | none).
        upsample: "upsample" decoders' upsampling, "nearest" (upsample + conv) or "transpose" (k4 s2 transposed conv).
        decoder: "upsample" (linear map to 4^d, then x2 stages) or "broadcast" (spatial broadcast decoder).
        decoder_width: hidden channels of each broadcast decoder (0: 2 * base_width).
        decoder_layers: stride-1 conv layers of each broadcast decoder on its broadcast grid.
        broadcast_size: edge of the broadcast grid (0: image_size).
        broadcast_grow: from a grid smaller than the image: "conv" (x2 upsampling + conv stages) or
            "interpolate" (decode on the grid, resize the images and logits linearly: cheap).
        encoder: "conv" (k4 s2 trunk to 4^d, one linear map to all K heads) or "slots" (slot attention:
            the K latents compete for the image's locations).
        slot_size: channels of the slot encoder's conv stack, tokens and slots.
        slot_feature_size: edge of the slot encoder's token grid (0: image_size / 2, at most 32).
        slot_iterations: attention rounds of the slot encoder.
        slot_init: "learned" (one start per slot) or "random" (one learned Gaussian for all slots).
        slot_detach: gradients through the slot encoder's last round only (straight through to the starts).
        decoder_shared: broadcast decoders share one set of weights (each slot still has its own latent head).
        appearance_size: 0: each decoder draws a full-resolution image. a >= 1 (image_size / 2**j): decoder k's
            image is a linear map of z_k to an a^d grid of colours, resized linearly to the image (a = 1: one
            colour per decoder and image), and its decoder draws only the confidence logits. All spatial detail
            then lives in the masks, so the mixture can only explain the input by splitting it into regions of
            one colour each (objects, tissue classes) instead of one decoder redrawing everything.
        appearance_shading: with appearance_size >= 1, each decoder also draws a shade map in (0, 1) beside its
            logits and its image is its colour times that shade (in [0, 1] intensities; Lambert shading). A lit
            face, a dark face and a shadow of one surface then fit one decoder, which only a change of colour
            (a different object) makes leave: with a flat colour per decoder, brightness steps split objects.
    """

    def __init__(self, *, spatial_dims: int = 2, in_channels: int = 3, image_size: int = 128, num_decoders: int = 5,
                 latent_per_decoder: int = 100, base_width: int = 16, num_classes: int = 0, norm: str = "batch",
                 upsample: str = "nearest", decoder: str = "upsample", decoder_width: int = 0,
                 decoder_layers: int = 4, broadcast_size: int = 0, broadcast_grow: str = "conv",
                 encoder: str = "conv", slot_size: int = 64, slot_feature_size: int = 0,
                 slot_iterations: int = 3, slot_init: str = "learned", slot_detach: bool = False,
                 decoder_shared: bool = False, appearance_size: int = 0, appearance_shading: bool = False) -> None:
        super().__init__()
        what = "model 'parallel-vae'"
        if appearance_size < 0 or (appearance_size and halvings(image_size, appearance_size) is None):
            raise MedgenError(f"{what}: appearance_size must be 0 (full-resolution decoder images) or image_size / "
                              f"2**j, got {appearance_size} for image_size {image_size}")
        if appearance_shading and not appearance_size:
            raise MedgenError(f"{what}: appearance_shading needs appearance_size >= 1 (the shade multiplies the "
                              f"decoder's colour)")
        if spatial_dims not in (2, 3):
            raise MedgenError(f"{what}: spatial_dims must be 2 or 3, got {spatial_dims}")
        for key, value in (("in_channels", in_channels), ("num_decoders", num_decoders),
                           ("latent_per_decoder", latent_per_decoder), ("base_width", base_width)):
            if value < 1:
                raise MedgenError(f"{what}: {key} must be >= 1, got {value}")
        if decoder not in DECODERS:
            raise MedgenError(f"{what}: decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if encoder not in ENCODERS:
            raise MedgenError(f"{what}: encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
        if slot_size < 1:
            raise MedgenError(f"{what}: slot_size must be >= 1, got {slot_size}")
        if decoder_width < 0:
            raise MedgenError(f"{what}: decoder_width must be >= 0 (0: 2 * base_width), got {decoder_width}")
        self.spatial_dims, self.in_channels, self.image_size = spatial_dims, in_channels, image_size
        self.num_decoders, self.latent_per_decoder = num_decoders, latent_per_decoder
        self.latent_dim = num_decoders * latent_per_decoder  # one z for sample(): all decoders' latents
        self.num_classes = num_classes
        self.encoder_kind = encoder
        if encoder == "slots":
            self.encoder: nn.Module = SlotEncoder(
                spatial_dims=spatial_dims, in_channels=in_channels, image_size=image_size,
                feature_size=slot_feature_size or min(image_size // 2, 32), slot_size=slot_size,
                num_slots=num_decoders, latent_per_decoder=latent_per_decoder, iterations=slot_iterations,
                init=slot_init, detach=slot_detach)
        else:
            self.encoder = DownTrunk(spatial_dims=spatial_dims, in_channels=in_channels, image_size=image_size,
                                     base_width=base_width, norm=norm)
            features = self.encoder.out_channels * BOTTLENECK**spatial_dims
            self.heads = nn.Linear(features, num_decoders * 2 * latent_per_decoder)  # all K latent heads in one matmul
        self.decoder_kind = decoder
        self.appearance_size, self.appearance_shading = appearance_size, appearance_shading
        # with an appearance head the decoders draw only the logits (and the shade map when shading)
        drawn = (2 if appearance_shading else 1) if appearance_size else in_channels + 1
        if appearance_size:
            grid = in_channels * appearance_size**spatial_dims
            self.appearance_weight = nn.Parameter(torch.randn(num_decoders, latent_per_decoder, grid)
                                                  / latent_per_decoder**0.5 * 0.1)
            # decoders start with colours spread evenly over [-0.9, 0.9]: distinct components, as k-means seeds.
            # A shade can only darken a colour, and a near-black one stays near black whatever its shade (it
            # wins no pixel and learns nothing): with shading the colours start bright, over [0, 0.9].
            low = 0.0 if appearance_shading else -0.9
            spread = torch.atanh(torch.linspace(low, 0.9, num_decoders)) if num_decoders > 1 else torch.zeros(1)
            self.appearance_bias = nn.Parameter(spread[:, None].repeat(1, grid))
        if decoder == "broadcast":
            self.decoders: nn.Module = BroadcastDecoderBank(
                spatial_dims=spatial_dims, out_channels=drawn, image_size=image_size,
                width=decoder_width or 2 * base_width, num_decoders=num_decoders,
                latent_per_decoder=latent_per_decoder, broadcast_size=broadcast_size or image_size,
                layers=decoder_layers, grow=broadcast_grow, shared=decoder_shared)
        else:
            self.decoders = DecoderBank(spatial_dims=spatial_dims, out_channels=drawn, image_size=image_size,
                                        base_width=base_width, num_decoders=num_decoders,
                                        latent_per_decoder=latent_per_decoder, upsample=upsample)

    @property
    def slot_noise_shape(self) -> tuple[int, int] | None:
        """(K, D) of the noise random starting slots take per image; None when the encoder takes none."""
        if self.encoder_kind == "slots" and self.encoder.init == "random":
            return self.num_decoders, self.encoder.slot_size
        return None

    def encode(self, x: torch.Tensor, slot_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, C, *S] (and slot_noise [B, K, D] for random starting slots) -> (mu, logvar), each [B, K, L]."""
        if self.encoder_kind == "slots":
            mu, logvar = self.encoder(x, slot_noise)
            return mu, logvar.clamp(-12.0, 8.0)
        h = self.encoder(x).flatten(1)
        # [B, K * 2 * L] -> [B, K, 2, L]
        stats = self.heads(h).view(x.shape[0], self.num_decoders, 2, self.latent_per_decoder)
        return stats[:, :, 0], stats[:, :, 1].clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents [B, K, L] -> (recon [B,C,*S], images [B,K,C,*S], logits [B,K,1,*S], weights [B,K,1,*S])."""
        out = self.decoders(z)
        if self.appearance_size:
            images, logits = self.appearance(z).to(out.dtype), out[:, :, :1]
            if self.appearance_shading:  # out [B, K, 2, *S]: logit, shade; image = colour * shade in [0, 1]
                images = 2 * ((images + 1) / 2) * torch.sigmoid(out[:, :, 1:]) - 1
        else:
            images, logits = torch.tanh(out[:, :, : self.in_channels]), out[:, :, self.in_channels :]
        weights = torch.softmax(logits.float(), dim=1).to(images.dtype)
        recon = (weights * images).sum(dim=1)
        return recon, images, logits, weights

    def appearance(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, K, L] -> the decoders' images [B, K, C, *S] from the appearance head (appearance_size > 0)."""
        b, k, _ = z.shape
        d, a, size = self.spatial_dims, self.appearance_size, self.image_size
        grid = per_decoder_linear(z, self.appearance_weight, self.appearance_bias)  # [B, K, F]
        # [B, K, C * a^d] -> [B * K, C, a, ...]
        grid = torch.tanh(grid).reshape(b * k, self.in_channels, *(a,) * d)
        if a == size:
            images = grid
        elif a == 1:
            images = grid.expand(b * k, self.in_channels, *(size,) * d)
        else:
            mode = "bilinear" if d == 2 else "trilinear"
            images = nn.functional.interpolate(grid, size=(size,) * d, mode=mode, align_corners=False)
        # [B * K, C, *S] -> [B, K, C, *S]
        return images.reshape(b, k, self.in_channels, *images.shape[2:])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, slot_noise: torch.Tensor | None = None) -> ParallelVAEOutput:
        """Encode, draw z = mu + sigma * noise (z = mu when noise is None), decode.

        Args:
            x: images [B, C, *S] in [-1, 1].
            labels: ignored (unconditional model; accepted for the uniform interface).
            noise: standard normal [B, K, L] or [B, K*L] for the reparameterisation; None decodes the mean.
            slot_noise: standard normal [B, K, D] for random starting slots (`slot_noise_shape`); None: the
                model's stored draws (deterministic inference).
        """
        mu, logvar = self.encode(x, slot_noise)
        z = mu if noise is None else mu + torch.exp(0.5 * logvar) * noise.view_as(mu)
        recon, images, logits, weights = self.decode(z)
        return ParallelVAEOutput(recon=recon, images=images, logits=logits, weights=weights, mu=mu, logvar=logvar)

    def sample(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Decode latents z [B, K*L] (labels ignored) to images [B, C, *S] in [-1, 1]."""
        # [B, K * L] -> [B, K, L]
        return self.decode(z.view(z.shape[0], self.num_decoders, self.latent_per_decoder))[0]

    @classmethod
    def tiny_kwargs(cls, spatial_dims: int) -> dict[str, Any]:
        """Small constructor arguments for the model checklist test."""
        return dict(spatial_dims=spatial_dims, in_channels=3 if spatial_dims == 2 else 1, image_size=16,
                    num_decoders=3, latent_per_decoder=4, base_width=4)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """forward() keyword arguments for the checklist test (CPU tensors)."""
        shape = (batch_size, self.in_channels) + (self.image_size,) * self.spatial_dims
        return dict(x=torch.rand(shape, generator=generator) * 2 - 1)
