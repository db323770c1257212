"""Saving and loading networks without pickled code: weights as a tensor-only state dict (read with
`torch.load(weights_only=True)`, which refuses any other object) beside a JSON description (what to
build: the kind, its config, the label codes, and for the prototype model its provenance). Loading
rebuilds the network through its constructor, as model zoos do.

    save(model, path)    # path (weights) and path.with_suffix(".json")
    model = load(path)   # ECGProtoNet or ResNet1DClassifier, in eval mode
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

import ecgproto
from ecgproto.errors import UserError

FORMAT = 1
PROTOTYPE_MODEL, BLACK_BOX = "ecgproto.ECGProtoNet", "ecgproto.ResNet1DClassifier"


class ModelFileError(UserError):
    """A model file that is missing, from an older ecgproto, or not a plain weights file."""


def _plain(value: Any) -> Any:
    """JSON for numpy scalars in provenance rows."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def describe(model: nn.Module) -> dict[str, Any]:
    from ecgproto.model.baseline import ResNet1DClassifier
    from ecgproto.model.network import ECGProtoNet

    if isinstance(model, ECGProtoNet):
        return {
            "format": FORMAT,
            "kind": PROTOTYPE_MODEL,
            "ecgproto_version": ecgproto.__version__,
            "config": model.config,
            "codes": list(model.codes),
            "provenance": model.provenance,
        }
    if isinstance(model, ResNet1DClassifier):
        return {"format": FORMAT, "kind": BLACK_BOX, "ecgproto_version": ecgproto.__version__, **model.spec()}
    raise TypeError(f"cannot save a {type(model).__name__}")


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(model: nn.Module, path: Path) -> None:
    """Weights at `path`, description at `path.with_suffix('.json')`; each written atomically."""
    from ecgproto.data.store import atomic_write_bytes

    path = Path(path)
    save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(describe(model), default=_plain).encode())


def load_weights(path: Path) -> dict[str, Any]:
    """A state dict (or checkpoint of tensors and plain values); anything else is refused unread."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as exc:
        raise ModelFileError(
            f"{path}: not a plain weights file ({str(exc).splitlines()[0][:120]}); refusing to load it, since "
            "unpickling it could run code - use a model saved by ecgproto, or train one again"
        ) from exc


# Options earlier versions saved in every model description, and the one value this version still builds
# (None: any value, the option did nothing without a retired one). docs/experiments.md says why each went.
_RETIRED_BRANCH = {"sharpness": 1.0, "latent": "standardised", "topk": None}
_RETIRED_FUSION = {"mode": "sparse_nonneg"}


def _without_retired_options(config: dict[str, Any], meta_file: Path) -> dict[str, Any]:
    """A saved model's configuration without the options this version retired, when it used their one kept
    value; a model that relied on a retired design is refused, naming the option."""
    out = {**config, "branches": {k: dict(v) for k, v in config.get("branches", {}).items()}}
    out["fusion"] = dict(config.get("fusion", {}))
    sections = [(f"branches.{k}", v, _RETIRED_BRANCH) for k, v in out["branches"].items()]
    for where, section, retired in [*sections, ("fusion", out["fusion"], _RETIRED_FUSION)]:
        for key, kept in retired.items():
            if key not in section:
                continue
            value = section.pop(key)
            if kept is not None and value != kept:
                raise ModelFileError(
                    f"{meta_file}: trained with {where}.{key} = {value!r}, a design this version no longer builds "
                    f"(only {kept!r}); train the model again with this version"
                )
    return out


def load(path: Path) -> nn.Module:
    """Rebuild the network `path` holds (see `save`), in eval mode."""
    from ecgproto.data.labels import load_label_set
    from ecgproto.model.baseline import ResNet1DClassifier
    from ecgproto.model.config import ModelConfig
    from ecgproto.model.network import ECGProtoNet

    path = Path(path)
    meta_file = path.with_suffix(".json")
    if not meta_file.exists():
        raise ModelFileError(
            f"{path}: no {meta_file.name} beside it; this model was saved by an older ecgproto "
            "(a pickled module, which is no longer loaded) - train it again with this version"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{meta_file}: model format {meta.get('format')!r}, this ecgproto reads {FORMAT}")
    state = load_weights(path)
    if meta["kind"] == BLACK_BOX:
        model: nn.Module = ResNet1DClassifier(
            meta["n_labels"], tuple(meta["widths"]), tuple(meta["blocks"]), meta.get("n_leads", 12)
        )
    elif meta["kind"] == PROTOTYPE_MODEL:
        labels = load_label_set()
        if list(labels.codes) != list(meta["codes"]):
            raise ModelFileError(
                f"{meta_file}: trained on another label set than this ecgproto's "
                f"({len(meta['codes'])} vs {len(labels.codes)} labels)"
            )
        try:
            config = ModelConfig.model_validate(_without_retired_options(meta["config"], meta_file))
        except ValidationError as exc:  # e.g. a pooling this version retired
            first = exc.errors()[0]
            raise ModelFileError(
                f"{meta_file}: its configuration is not one this version builds ({'.'.join(map(str, first['loc']))}: "
                f"{first['msg']}); train the model again with this version"
            ) from exc
        if "heads" not in meta["config"].get("fusion", {}):  # saved before bootstrap heads and calibration
            config.fusion.heads = 0
            state.setdefault("temperature", torch.ones(()))
            state.setdefault("uncertainty_quantiles", torch.full((101,), float("nan")))
            state.setdefault("logit_offset", torch.zeros(len(labels)))
        net = ECGProtoNet(config, labels)
        for key, value in net.state_dict().items():  # saved before near-duplicates were merged: all distinct
            if key.endswith(".merged_into"):
                state.setdefault(key, value)
        net.source_signals = torch.empty_like(state["source_signals"])  # its size comes from the projection
        net.provenance = list(meta["provenance"])
        model = net
    else:
        raise ModelFileError(f"{meta_file}: unknown model kind {meta['kind']!r}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: the weights do not fit the described network ({str(exc)[:200]})") from exc
    return model.eval()
