"""The checkpoint format: safetensors weights with a JSON architecture spec in the header; atomic writes.

Dense, gated, pruned and factorized models all round-trip through `save_model`/`load_model`: the
spec names the timm constructor and its arguments, each block's pruned widths and gates, and the
factorized layers' ranks. Nothing is pickled. Every file is written to a temporary name beside
its target and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitprune.errors import ModelError, VitpruneError
from vitprune.layers import ATTN_GATES, MLP_GATES, FactorizedLinear, PrunableAttention, PrunableMlp, new_gate
from vitprune.models import BUILD_ERRORS, create_vit, describe_timm, pretrained_config

SPEC_KEY = "vitprune_spec"
SPEC_FORMAT = "vitprune/1"
OPTIM_PREFIX = "__optim__."
INPUT_KEY = "vitprune_input"
PARAMS_KEY = "vitprune_params"
_TEMP = re.compile(r"^\..+\.pid(\d+)\.[^.]+\.tmp$")  # .<name>.pid<PID>.<random>.tmp (a folder)


# ---------------------------------------------------------------- atomic files

def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) then rename onto `path`, so readers never see a half-written file.

    The temporary file sits in a folder named after this process (.<name>.pid<PID>.<random>.tmp), which
    also catches the writer's own temporary files; `clean_stray_temps` removes those of dead processes, and
    every write does so in its folder first.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"'{path}' is a directory; give a file path to write")
    if path.parent.exists() and not path.parent.is_dir():
        raise ModelError(f"cannot write '{path}': '{path.parent}' is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stray_temps(path.parent)  # what a killed writer left here goes with the next write
    folder = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp")
    tmp = os.path.join(folder, path.name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # keep results readable to others, as a plain write would
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def share_file(source: Path, path: Path) -> None:
    """Publish `source`'s content under `path` too (atomically): a hard link where the file system has them,
    so the bytes take disk space once, else a copy. Rewrites of either name (atomic renames) never touch the other."""
    def link_or_copy(tmp: str) -> None:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    atomic_write(path, link_or_copy)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stray_temps(folder: str | Path) -> list[Path]:
    """Remove temporary files that a killed writer left in `folder` (those of live processes stay)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMP.match(path.name)
        if match and not _alive(int(match.group(1))):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path`, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return Path(path)


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=1, default=float))


def read_json_mapping(path: Path, value_type: type) -> dict[str, Any]:
    """The entries with `value_type` values of the JSON object in `path`; {} for a missing, truncated or foreign file
    (what a cache reads: a damaged one costs a re-computation, nothing else)."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, value_type)} if isinstance(found, dict) else {}


# ---------------------------------------------------------------- structure spec

def _attention_entry(a: PrunableAttention) -> dict[str, Any]:
    return dict(num_heads=a.num_heads, qk_head_dim=a.qk_head_dim, v_head_dim=a.v_head_dim,
                in_dim=None if a.in_index is None else len(a.in_index), scale=a.scale,
                gates=[s for s in ATTN_GATES if getattr(a, s) is not None])


def _mlp_entry(m: PrunableMlp) -> dict[str, Any]:
    return dict(in_dim=None if m.in_index is None else len(m.in_index), hidden=m.fc1.out_features,
                gates=[s for s in MLP_GATES if getattr(m, s) is not None])


def architecture_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable description from which `load_model` rebuilds the exact module structure."""
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"only timm VisionTransformers can be saved, got {type(model).__name__}")
    blocks = []
    for block in model.blocks:
        entry: dict[str, Any] = {}
        if isinstance(block.attn, PrunableAttention):
            entry["attn"] = _attention_entry(block.attn)
        if isinstance(block.mlp, PrunableMlp):
            entry["mlp"] = _mlp_entry(block.mlp)
        blocks.append(entry)
    factorized = {name: mod.rank for name, mod in model.named_modules() if isinstance(mod, FactorizedLinear)}
    return {"format": SPEC_FORMAT, "timm": describe_timm(model), "blocks": blocks, "factorized": factorized,
            "pretrained_cfg": pretrained_config(model)}


def _check_rebuilds(model: nn.Module, spec: dict[str, Any]) -> None:
    """Refuse to save a model whose inferred spec would not rebuild it (a structure vitprune cannot describe)."""
    rebuilt = model_from_spec(spec).state_dict()
    own = model.state_dict()
    differ = sorted(k for k in set(own) | set(rebuilt) if k not in own or k not in rebuilt
                    or own[k].shape != rebuilt[k].shape)
    if differ:
        raise ModelError(f"cannot describe this {type(model).__name__} exactly: rebuilding it from its inferred "
                         f"timm arguments differs at {differ[:5]}; build it with vitprune.build_model")


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None)


def _shaped_attention(attn: nn.Module, s: dict[str, Any]) -> PrunableAttention:
    attn = PrunableAttention(attn)
    dim_in = s["in_dim"] or attn.qkv.in_features
    h, dqk, dv = s["num_heads"], s["qk_head_dim"], s["v_head_dim"]
    attn.qkv = _linear_like(attn.qkv, dim_in, h * (2 * dqk + dv))
    attn.proj = _linear_like(attn.proj, h * dv, attn.proj.out_features)
    attn.num_heads, attn.qk_head_dim, attn.v_head_dim, attn.head_dim = h, dqk, dv, dv
    attn.attn_dim, attn.scale = h * dv, s["scale"]
    attn.in_index = None if s["in_dim"] is None else torch.arange(dim_in)
    if isinstance(attn.norm, nn.LayerNorm) and attn.norm.normalized_shape[0] != h * dv:
        raise ModelError("attention with scale_norm cannot change its width")
    widths = {"gate_in": dim_in, "gate_qk": h * dqk, "gate_out": h * dv}
    for site in ATTN_GATES:
        setattr(attn, site, new_gate(widths[site]) if site in s["gates"] else None)
    return attn


def _shaped_mlp(mlp: nn.Module, s: dict[str, Any]) -> PrunableMlp:
    mlp = PrunableMlp(mlp)
    dim_in = s["in_dim"] or mlp.fc1.in_features
    mlp.fc1 = _linear_like(mlp.fc1, dim_in, s["hidden"])
    mlp.fc2 = _linear_like(mlp.fc2, s["hidden"], mlp.fc2.out_features)
    mlp.in_index = None if s["in_dim"] is None else torch.arange(dim_in)
    widths = {"gate_in": dim_in, "gate_hidden": s["hidden"]}
    for site in MLP_GATES:
        setattr(mlp, site, new_gate(widths[site]) if site in s["gates"] else None)
    return mlp


def apply_block_structure(model: VisionTransformer, blocks: list[dict[str, Any]]) -> VisionTransformer:
    """Reshape each block's attention/MLP (in place) to the sizes in `blocks`; weights are placeholders."""
    for block, entry in zip(model.blocks, blocks):
        if "attn" in entry:
            block.attn = _shaped_attention(block.attn, entry["attn"])
        if "mlp" in entry:
            block.mlp = _shaped_mlp(block.mlp, entry["mlp"])
    return model


def apply_factorized_structure(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace the named Linear layers (in place) by FactorizedLinear of the given ranks."""
    for name, rank in ranks.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise ModelError(f"spec factorizes '{name}', which is a {type(old).__name__}, not a Linear")
        setattr(parent, attr, FactorizedLinear(old.in_features, old.out_features, rank, bias=old.bias is not None))
    return model


def model_from_spec(spec: dict[str, Any]) -> VisionTransformer:
    """An untrained model with exactly the structure `spec` describes."""
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ModelError(f"unsupported model spec format {spec.get('format') if isinstance(spec, dict) else spec!r}; "
                         f"expected '{SPEC_FORMAT}'")
    try:
        return _build_from_spec(spec)
    except VitpruneError as err:
        raise ModelError(f"architecture spec cannot be built: {err}") from None
    except BUILD_ERRORS as err:
        raise ModelError(f"architecture spec is malformed ({type(err).__name__}: {err})") from None


def _build_from_spec(spec: dict[str, Any]) -> VisionTransformer:
    model = create_vit(spec["timm"]["name"], dict(spec["timm"]["kwargs"]))
    model.vitprune_arch = spec["timm"]
    if spec.get("pretrained_cfg"):
        model.pretrained_cfg = spec["pretrained_cfg"]
    if spec.get("blocks"):
        apply_block_structure(model, spec["blocks"])
    apply_factorized_structure(model, spec.get("factorized", {}))
    return model


# ---------------------------------------------------------------- save / load

def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, path: str | Path, extra_tensors: dict[str, torch.Tensor] | None = None,
               metadata: dict[str, str] | None = None) -> Path:
    """Write weights as safetensors with the JSON architecture spec in its header (atomically; no pickle)."""
    path = Path(path)
    tensors = _tensors(model)
    tensors.update(extra_tensors or {})
    spec = architecture_spec(model)
    if not getattr(model, "vitprune_arch", None):
        _check_rebuilds(model, spec)
    meta = {SPEC_KEY: json.dumps(spec), INPUT_KEY: json.dumps(model_input(model))}
    if getattr(model, "vitprune_params", None):
        meta[PARAMS_KEY] = json.dumps(model.vitprune_params)
    meta.update(metadata or {})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


@contextmanager
def _opened(path: str | Path):
    """safe_open of a model file, every failure turned into a ModelError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"model file '{path}' is a directory; give a .safetensors file written by vitprune")
    if not path.is_file():
        raise ModelError(f"model file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"model file '{path}' is not a readable safetensors file (truncated or corrupted?): "
                         f"{err}") from err


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a vitprune safetensors file, with clear errors."""
    with _opened(path) as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a safetensors file (no tensors are read), with clear errors."""
    with _opened(path) as fh:
        return fh.metadata() or {}


def load_model(path: str | Path) -> VisionTransformer:
    """Rebuild a model saved by `save_model` (dense, gated, pruned or factorized), in eval mode."""
    tensors, metadata = read_checkpoint(path)
    if SPEC_KEY not in metadata:
        raise ModelError(f"model file '{path}' has no architecture spec (header key '{SPEC_KEY}'); save models with "
                         "vitprune.save_model, or load plain timm weights through model.pretrained")
    try:
        spec = json.loads(metadata[SPEC_KEY])
    except json.JSONDecodeError as err:
        raise ModelError(f"model file '{path}': architecture spec is not valid JSON ({err})") from err
    state = {k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)}
    try:
        with torch.device("meta"):  # the spec checked against the tensors before a byte of the model is allocated
            _check_matches(path, model_from_spec(spec), state)
        model = model_from_spec(spec)
    except ModelError as err:
        raise ModelError(str(err) if str(err).startswith(f"model file '{path}'") else f"model file '{path}': {err}") \
            from None
    model.load_state_dict(state)
    try:
        model.vitprune_params = json.loads(metadata.get(PARAMS_KEY, "null"))
    except json.JSONDecodeError:
        model.vitprune_params = None  # a damaged record of the training set; the weights are fine
    return model.eval()


def _check_matches(path: str | Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ModelError(f"model file '{path}' does not match its architecture spec: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes {sorted(wrong)[:5]}")


def model_input(model: nn.Module) -> dict[str, Any]:
    """The input a timm ViT takes and what it predicts: channels, image size, classes."""
    embed = model.patch_embed
    size = embed.img_size
    return {"in_chans": embed.proj.in_channels, "img_size": list(size) if size is not None else None,
            "num_classes": model.num_classes, "dynamic_img_size": bool(getattr(embed, "dynamic_img_size", False))}
