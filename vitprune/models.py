"""Building timm ViTs from a parameter set, and loading pretrained weights from local files.

Every model vitprune hands out is a timm ``VisionTransformer``; `build_model` records the
constructor arguments in ``model.vitprune_arch`` so a checkpoint can rebuild it (see `checkpoint`).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from vitprune.errors import ModelError, ParamsError
from vitprune.params import ModelParams


def _custom_kwargs(p: ModelParams) -> dict[str, Any]:
    return dict(patch_size=p.patch_size, embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads,
                mlp_ratio=p.mlp_ratio, qkv_bias=p.qkv_bias, qk_norm=p.qk_norm, global_pool=p.global_pool,
                class_token=p.class_token, reg_tokens=p.reg_tokens, init_values=p.init_values,
                drop_path_rate=p.drop_path_rate)


BUILD_ERRORS = (TypeError, ValueError, AssertionError, RuntimeError, OverflowError, ZeroDivisionError, IndexError,
                KeyError, AttributeError)  # what timm's constructors raise for arguments they cannot build
DATA_KWARGS = ("img_size", "in_chans", "num_classes")  # set from the data by build_model
VIT_ARGUMENTS = set(inspect.signature(VisionTransformer).parameters)


def create_vit(name: str, kwargs: dict[str, Any]) -> VisionTransformer:
    """An untrained timm VisionTransformer: `vit_custom` (the dims in kwargs) or a registered timm name.

    The model is first built without memory (on the meta device): arguments timm cannot build, patches larger
    than the images and a model larger than the free memory are refused before a byte is allocated.
    """
    if name != "vit_custom" and not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ParamsError(f"model.name '{name}' is not a timm model; accepted: vit_custom or a timm name"
                          + (f" such as {', '.join(near)}" if near else ""))
    unknown = sorted(set(kwargs) - VIT_ARGUMENTS)
    if unknown:
        raise ParamsError(f"'{unknown[0]}' is not an argument of timm's VisionTransformer (model '{name}'); "
                          f"accepted: {', '.join(sorted(VIT_ARGUMENTS))}")
    with torch.device("meta"):
        skeleton = _construct(name, kwargs)
    _check_patches(name, skeleton)
    _check_fits(name, skeleton)
    return _construct(name, kwargs)


def _construct(name: str, kwargs: dict[str, Any]) -> VisionTransformer:
    try:
        model = VisionTransformer(**kwargs) if name == "vit_custom" else timm.create_model(name, pretrained=False,
                                                                                          **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):  # a non-ViT constructor rejecting ViT arguments
            raise ParamsError(f"model.name '{name}' is not a timm VisionTransformer ({err})") from None
        raise ParamsError(f"timm cannot build '{name}' from these arguments: {err}") from None
    except BUILD_ERRORS as err:
        raise ParamsError(f"timm cannot build '{name}' from these arguments: {type(err).__name__}: {err}") from None
    if not isinstance(model, VisionTransformer):
        raise ParamsError(f"model.name '{name}' builds a {type(model).__name__}, not a timm VisionTransformer")
    return model


def _check_patches(name: str, model: VisionTransformer) -> None:
    embed = model.patch_embed
    if embed.img_size is not None and any(p > i for p, i in zip(embed.patch_size, embed.img_size)):
        size, patch = "x".join(map(str, embed.img_size)), "x".join(map(str, embed.patch_size))
        raise ParamsError(f"model '{name}' cuts {patch} patches, larger than its {size} images; accepted: images "
                          f"of at least {patch} pixels (data.image_size, --image-size) or a model with smaller "
                          "patches")


def _check_fits(name: str, model: nn.Module) -> None:
    """Refuse a model whose weights alone exceed the memory free now (training needs about four times that)."""
    import psutil

    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    free = psutil.virtual_memory().available
    if weights > free:
        count = sum(p.numel() for p in model.parameters())
        raise ParamsError(f"model '{name}' has {count:,} parameters: {weights / 1e9:.3g} GB of weights, more than "
                          f"the {free / 1e9:.3g} GB of memory free (training needs about 4x the weights); accepted: "
                          "a smaller model (model.embed_dim, model.depth, model.mlp_ratio)")


def build_model(p: ModelParams, num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> VisionTransformer:
    """A timm VisionTransformer from a timm name or custom dims; pretrained weights from a local file only."""
    kwargs: dict[str, Any] = dict(img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    for key in DATA_KWARGS:
        if key in p.kwargs and p.kwargs[key] != kwargs[key]:
            raise ParamsError(f"model.kwargs.{key} ({p.kwargs[key]!r}) contradicts the data, which gives {key} "
                              f"{kwargs[key]}; remove it (vitprune sets {', '.join(DATA_KWARGS)} from the data)")
    if p.name == "vit_custom":
        kwargs.update(_custom_kwargs(p))
    else:
        kwargs["drop_path_rate"] = p.drop_path_rate
    kwargs.update(p.kwargs)
    unknown = sorted(set(p.kwargs) - VIT_ARGUMENTS)
    if unknown:
        raise ParamsError(f"model.kwargs.{unknown[0]} is not an argument of timm's VisionTransformer; accepted: "
                          f"{', '.join(sorted(VIT_ARGUMENTS))}")
    try:
        model = create_vit(p.name, kwargs)
    except ParamsError as err:
        if p.kwargs and "cannot build" in str(err):
            raise ParamsError(f"model.kwargs {p.kwargs}: {err}") from None
        raise
    model.vitprune_arch = {"name": p.name, "kwargs": _jsonable(kwargs)}
    if p.pretrained:
        load_pretrained(model, p.pretrained)
    return model


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        try:
            json.dumps(value)
        except TypeError as err:
            raise ParamsError(f"model.kwargs.{key}: {value!r} cannot be stored in a model spec "
                              "(JSON values only)") from err
        out[key] = value
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_pretrained(model: VisionTransformer, source: str) -> None:
    """Load timm-format weights from a local file, or from the local Hugging Face cache with 'hf-cache'."""
    if source == "hf-cache":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        name = model.vitprune_arch["name"]
        try:
            ref = timm.create_model(name, pretrained=True, **model.vitprune_arch["kwargs"])
        except Exception as err:  # noqa: BLE001 - timm/hub raise many types; all mean "not cached"
            raise ModelError(f"model.pretrained 'hf-cache': weights of '{name}' are not in the local cache "
                             f"({type(err).__name__}); pass a local weights file instead") from err
        model.load_state_dict(ref.state_dict())
        return
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"model.pretrained '{path}' does not exist; give a local .safetensors/.pth/.bin file "
                         "(weights are never downloaded)")
    try:
        state = _read_weights(path)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"model.pretrained '{path}' could not be read as a weights file: {err}") from err
    state = checkpoint_filter_fn(state, model)
    head = {k for k in state if k.startswith(("head.", "head_dist."))}
    own = model.state_dict()
    if any(state[k].shape != own[k].shape for k in head if k in own):
        state = {k: v for k, v in state.items() if k not in head}  # new classifier for a new label set
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "head_dist."))]
    if missing or unexpected:
        raise ModelError(f"model.pretrained '{path}' does not match '{model.vitprune_arch['name']}': "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


# ---------------------------------------------------------------- describing any timm ViT

_ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu"}


def describe_timm(model: VisionTransformer) -> dict[str, Any]:
    """{"name", "kwargs"} that rebuild `model`'s structure with timm, read off the model itself.

    `build_model` records this when it builds; for a timm model built elsewhere (timm.create_model,
    VisionTransformer(...)) it is inferred from the modules, so any timm ViT can be saved and loaded.
    """
    if getattr(model, "vitprune_arch", None):
        return model.vitprune_arch
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if type(model) is not VisionTransformer and not (name and timm.is_model(name)):
        raise ModelError(f"cannot describe a {type(model).__name__} built outside timm's registry; build it with "
                         "timm.create_model or vitprune.build_model")
    return {"name": name if type(model) is not VisionTransformer and name else "vit_custom",
            "kwargs": _inferred_kwargs(model)}


def _inferred_kwargs(model: VisionTransformer) -> dict[str, Any]:
    block = model.blocks[0]
    attn, mlp, embed = block.attn, block.mlp, model.patch_embed
    head_dim = round(float(attn.scale) ** -2)  # the original head width, kept by pruning as the scale
    act = type(mlp.act).__name__
    if act not in _ACTIVATIONS:
        raise ModelError(f"cannot describe the MLP activation {act}; supported: {', '.join(_ACTIVATIONS)}")
    eps = getattr(model.blocks[0].norm1, "eps", 1e-6)
    if abs(eps - 1e-6) > 1e-12:
        raise ModelError(f"cannot describe LayerNorm eps {eps}; only timm's ViT default 1e-6 is supported")
    return _jsonable({
        "img_size": list(embed.img_size) if embed.img_size is not None else None,
        "patch_size": list(embed.patch_size), "in_chans": embed.proj.in_channels, "num_classes": model.num_classes,
        "global_pool": model.global_pool, "embed_dim": model.embed_dim, "depth": len(model.blocks),
        "num_heads": model.embed_dim // head_dim,
        "mlp_ratio": mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": attn.qkv.bias is not None, "qk_norm": not isinstance(attn.q_norm, nn.Identity),
        "scale_attn_norm": not isinstance(attn.norm, nn.Identity),
        "scale_mlp_norm": not isinstance(mlp.norm, nn.Identity), "proj_bias": attn.proj.bias is not None,
        "init_values": 1.0 if not isinstance(block.ls1, nn.Identity) else None,
        "class_token": model.cls_token is not None, "pos_embed": "learn" if model.pos_embed is not None else "none",
        "no_embed_class": model.no_embed_class, "reg_tokens": model.num_reg_tokens,
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "final_norm": not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity), "pool_include_prefix": model.pool_include_prefix,
        "dynamic_img_size": model.dynamic_img_size, "dynamic_img_pad": getattr(embed, "dynamic_img_pad", False),
        "act_layer": _ACTIVATIONS[act],
    })


def pretrained_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-storable part of a timm model's pretrained_cfg (mean, std, input size, interpolation, ...)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    out = {}
    for key, value in cfg.items():
        value = list(value) if isinstance(value, tuple) else value
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out
