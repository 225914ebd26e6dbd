"""The model protocol: what the rest of medgen may ask of a registered model, by attribute, explicitly.

Every model is an nn.Module built from typed keyword arguments (registry.create_model). Beyond forward():

- Sampling (`GenerativeModel`): `latent_dim` (the size of one latent vector z, all decoders together)
  and `sample(z [N, latent_dim], labels [N]) -> images`. models/sampling.py draws z and calls it;
  training writes montages from it; synth and cv-evaluate sample through it.
- `example_inputs(batch_size, generator) -> dict` (`HasExampleInputs`): forward() keyword arguments on
  the CPU. The model checklist test and runtime.bf16_conv_hazards (one batch-1 forward that
  measures each conv's input size) use it; without it they fall back to an image batch `x` built from
  `in_channels`, `image_size` and `spatial_dims`.
- `compile_children` (`Compilable`): names of the child modules torch.compile may wrap
  (runtime.compile_model). Children whose loss needs a double backward (WGAN-GP critics) must not be
  listed. A model without the attribute is compiled whole.
- `tiny_kwargs(spatial_dims)` (classmethod): small constructor arguments for the checklist test.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@runtime_checkable
class GenerativeModel(Protocol):
    latent_dim: int

    def sample(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class HasExampleInputs(Protocol):
    def example_inputs(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]: ...


class Compilable(Protocol):
    compile_children: ClassVar[tuple[str, ...]]
