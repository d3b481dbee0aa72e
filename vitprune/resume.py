"""Training checkpoints and exact resume: model, optimizer state and progress in one safetensors file.

A checkpoint records the run's configuration (and a digest of its starting weights); `resume`
continues only the run that wrote it, so an interrupted run ends exactly where an uninterrupted
one would, and a changed configuration is refused or, on request, moved aside and restarted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitprune.checkpoint import OPTIM_PREFIX, read_checkpoint, save_model
from vitprune.errors import ModelError

# keys that may change between an interrupted run and its resumption (epochs may not: the schedule depends on it)
RESUMABLE_CHANGES = {"progress", "threads"}
# header key of a checkpoint's training state (epoch, history, configuration, optimizer groups: None once finished)
TRAIN_KEY = "vitprune_train"


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = opt.state_dict()
    tensors = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{OPTIM_PREFIX}{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def _restore_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            idx, name = key[len(OPTIM_PREFIX):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None, info: dict[str, Any]) -> None:
    """One atomic safetensors file: model weights + spec, optimizer tensors, training state as JSON.

    A finished run (opt=None) keeps no optimizer state: nothing is left to resume, and it is 3x smaller.
    """
    tensors, groups = _optim_tensors(opt) if opt is not None else ({}, None)
    save_model(model, path, extra_tensors=tensors,
               metadata={TRAIN_KEY: json.dumps({**info, "param_groups": groups})})


def weights_digest(model: nn.Module) -> str:
    """Fingerprint of a model's weights: a checkpoint resumes only the run that started from them."""
    h = hashlib.sha1()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


RECORD_FIELDS = {"epoch": int, "history": list, "config": dict}


def train_record(meta: dict[str, str], ckpt: Path) -> dict[str, Any]:
    """The training record in a checkpoint's header, refused clearly when it is damaged."""
    try:
        info = json.loads(meta.get(TRAIN_KEY, "{}"))
    except json.JSONDecodeError:
        info = None
    ok = isinstance(info, dict) and all(isinstance(info.get(k), t) for k, t in RECORD_FIELDS.items()) \
        and isinstance(info.get("param_groups"), (list, type(None)))
    if not ok:
        raise ModelError(f"checkpoint '{ckpt}': its training record (header key '{TRAIN_KEY}') is damaged: not a "
                         f"JSON object with {', '.join(RECORD_FIELDS)} and param_groups; delete the checkpoint to "
                         "train this stage again")
    return info


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))


def resume_from(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, config: dict[str, Any],
            on_config_change: str, rank: int) -> tuple[int, list[dict[str, Any]]]:
    """(epoch to start at, history so far) from a checkpoint of the same configuration."""
    tensors, meta = read_checkpoint(ckpt)
    info = train_record(meta, ckpt)
    changed = _config_changes(info.get("config", {}), config)
    if changed and on_config_change == "error":
        raise ModelError(f"checkpoint '{ckpt}' was made with different settings ({', '.join(changed)}); "
                         "use another run name or delete it to start over")
    if changed:
        digest = hashlib.sha1(json.dumps(info.get("config", {}), sort_keys=True).encode()).hexdigest()[:8]
        aside = ckpt.with_name(f"{ckpt.name.removesuffix('.ckpt.safetensors')}.ckpt.{digest}.safetensors")
        if rank == 0:
            os.replace(ckpt, aside)
            warnings.warn(f"{ckpt.name}: settings changed ({', '.join(changed)}); the old checkpoint is kept as "
                          f"'{aside}' and training starts over", stacklevel=3)
        return 0, []
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)})
    if info["param_groups"] is not None:
        _restore_optim(opt, tensors, info["param_groups"])
    return info["epoch"], info["history"]
