"""Save / load only the trained part of a model whose backbone is frozen (DESIGN.md section 2: the backbone is frozen).

`TrainableStateMixin` gives an ``nn.Module`` subclass that sets ``frozen_prefix`` (the state-dict key prefix of its
frozen backbone, e.g. ``"backbone."`` for the embedding models, ``"backbone.body."`` inside Mask R-CNN):

- ``trainable_parameters()``: the parameters with ``requires_grad`` (what the optimiser gets);
- ``trainable_state_dict()``: every state-dict entry outside ``frozen_prefix`` (buffers such as BatchNorm statistics
  of the neck / head included);
- ``load_trainable_state_dict(sd, origin)``: loads exactly those keys; missing / unexpected keys or a shape mismatch
  raise `CheckpointError` naming ``origin`` and the keys, before anything is loaded.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["TrainableStateMixin"]


class TrainableStateMixin:
    """Mixin for ``nn.Module`` subclasses; list it before the ``nn.Module`` base."""

    frozen_prefix: str

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefix)}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor], origin: str = "state dict") -> None:
        """Load everything but the frozen backbone; key or shape mismatches raise `CheckpointError` naming them."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{origin} does not match {type(self).__name__}: {len(missing)} missing {missing[:5]}, "
                f"{len(unexpected)} unexpected {unexpected[:5]}"
            )
        for key, ref in expected.items():
            if tuple(state_dict[key].shape) != tuple(ref.shape):
                raise CheckpointError(f"{origin}: {key} has shape {tuple(state_dict[key].shape)}, the model "
                                      f"expects {tuple(ref.shape)}")
        result = self.load_state_dict(dict(state_dict), strict=False)
        assert not result.unexpected_keys and all(k.startswith(self.frozen_prefix) for k in result.missing_keys)
