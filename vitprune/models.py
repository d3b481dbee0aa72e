"""timm ViTs: building, the prunable attention/MLP layers, and safetensors checkpoints with a JSON spec.

Every model vitprune hands out is a timm ``VisionTransformer``. Gated and pruned blocks swap
timm's ``Attention``/``Mlp`` for the subclasses below, which keep timm's child modules (and so
timm's state-dict keys) and add only what pruning needs: optional gates, an input index, and
separate query/key and value head widths with the original attention scale.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitprune.decompose import FactorizedLinear
from vitprune.params import ModelParams, ParamsError

SPEC_KEY = "vitprune_spec"
SPEC_FORMAT = "vitprune/1"
OPTIM_PREFIX = "__optim__."


class ModelError(ValueError):
    """A model file or architecture that cannot be used; the message names it."""


# ---------------------------------------------------------------- prunable layers

def _gate(size: int) -> nn.Parameter:
    return nn.Parameter(torch.ones(size))


def select_features(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[..., index]; gather is several times faster than index_select on the last dim on CPU."""
    return torch.gather(x, -1, index.expand(*x.shape[:-1], -1))


def gated_linear(layer: nn.Module, x: torch.Tensor, in_gate: torch.Tensor | None = None,
                 out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x * in_gate) with its outputs scaled by out_scale, computed by scaling the weight instead of x.

    Same function; the gates touch in*out weights rather than batch*tokens*in activations, which
    keeps sparse training nearly as fast as dense training.
    """
    if in_gate is None and out_scale is None:
        return layer(x)
    if not isinstance(layer, nn.Linear):
        y = layer(x if in_gate is None else x * in_gate)
        return y if out_scale is None else y * out_scale
    weight, bias = layer.weight, layer.bias
    if in_gate is not None:
        weight = weight * in_gate
    if out_scale is not None:
        weight = weight * out_scale[:, None]
        bias = None if bias is None else bias * out_scale
    return F.linear(x, weight, bias)


class PrunableAttention(Attention):
    """timm Attention with optional VTP gates, pruned input dims and separate q/k and v head widths."""

    def __init__(self, attn: Attention):
        nn.Module.__init__(self)
        if getattr(attn, "gate", None) is not None:
            raise ModelError("attention with a sigmoid output gate (timm gated=True) cannot be pruned exactly")
        for name, child in attn.named_children():
            setattr(self, name, child)
        self.gate = None
        self.num_heads = attn.num_heads
        self.qk_head_dim = getattr(attn, "qk_head_dim", attn.head_dim)
        self.v_head_dim = getattr(attn, "v_head_dim", attn.head_dim)
        self.head_dim = self.v_head_dim
        self.attn_dim = self.num_heads * self.v_head_dim
        self.scale = attn.scale  # the original head dim's scale, kept through pruning
        self.fused_attn = attn.fused_attn
        self.register_buffer("in_index", getattr(attn, "in_index", None))
        for site in ("gate_in", "gate_qk", "gate_out"):
            self.register_parameter(site, getattr(attn, site, None))

    def qkv_row_scale(self) -> torch.Tensor | None:
        """Per-output-row scale of qkv from the `qk` gate: q and k rows both by g, so the logits scale by g^2."""
        if self.gate_qk is None:
            return None
        return torch.cat([self.gate_qk, self.gate_qk, self.gate_qk.new_ones(self.num_heads * self.v_head_dim)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        h, dqk, dv = self.num_heads, self.qk_head_dim, self.v_head_dim
        if self.in_index is not None:
            x = select_features(x, self.in_index)
        qkv = gated_linear(self.qkv, x, self.gate_in, self.qkv_row_scale())
        q, k, v = qkv.split([h * dqk, h * dqk, h * dv], dim=-1)
        q = self.q_norm(q.view(b, n, h, dqk).transpose(1, 2))
        k = self.k_norm(k.view(b, n, h, dqk).transpose(1, 2))
        v = v.view(b, n, h, dv).transpose(1, 2)
        if self.fused_attn:
            # The fused kernels need equal q/k and v head widths: zero-pad the narrower side (exact:
            # zero q/k columns add nothing to the logits, zero v columns are sliced off again).
            d = max(dqk, dv)
            q, k = (F.pad(q, (0, d - dqk)), F.pad(k, (0, d - dqk))) if dqk < d else (q, k)
            x = F.scaled_dot_product_attention(q, k, F.pad(v, (0, d - dv)) if dv < d else v, attn_mask=attn_mask,
                                               is_causal=is_causal, scale=self.scale,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)[..., :dv]
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(b, n, h * dv))
        return self.proj_drop(gated_linear(self.proj, x, self.gate_out))


class PrunableMlp(Mlp):
    """timm Mlp with optional VTP gates on its input and hidden features, and pruned input dims."""

    def __init__(self, mlp: Mlp):
        nn.Module.__init__(self)
        for name, child in mlp.named_children():
            setattr(self, name, child)
        self.register_buffer("in_index", getattr(mlp, "in_index", None))
        for site in ("gate_in", "gate_hidden"):
            self.register_parameter(site, getattr(mlp, site, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_index is not None:
            x = select_features(x, self.in_index)
        x = self.norm(self.drop1(self.act(gated_linear(self.fc1, x, self.gate_in))))
        return self.drop2(gated_linear(self.fc2, x, self.gate_hidden))


def vit_blocks(model: nn.Module) -> nn.Sequential:
    """The transformer blocks of a timm VisionTransformer; a clear error for anything else."""
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if not (isinstance(getattr(block, "attn", None), Attention) and isinstance(getattr(block, "mlp", None), Mlp)):
            raise ModelError(f"block {i} ({type(block).__name__}) does not have timm's Attention and Mlp; "
                             "only standard pre-norm ViT blocks can be gated and pruned")
    return model.blocks


def make_prunable(model: nn.Module) -> nn.Module:
    """Swap every block's Attention/Mlp for the prunable subclasses (in place; same function, same keys)."""
    for block in vit_blocks(model):
        if not isinstance(block.attn, PrunableAttention):
            block.attn = PrunableAttention(block.attn)
        if not isinstance(block.mlp, PrunableMlp):
            block.mlp = PrunableMlp(block.mlp)
    return model


# ---------------------------------------------------------------- building

def _custom_kwargs(p: ModelParams) -> dict[str, Any]:
    return dict(patch_size=p.patch_size, embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads,
                mlp_ratio=p.mlp_ratio, qkv_bias=p.qkv_bias, qk_norm=p.qk_norm, global_pool=p.global_pool,
                class_token=p.class_token, reg_tokens=p.reg_tokens, init_values=p.init_values,
                drop_path_rate=p.drop_path_rate)


def _create(name: str, kwargs: dict[str, Any]) -> VisionTransformer:
    if name == "vit_custom":
        return VisionTransformer(**kwargs)
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ParamsError(f"model.name '{name}' is not a timm model; accepted: vit_custom or a timm name"
                          + (f" such as {', '.join(near)}" if near else ""))
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:  # a non-ViT constructor rejecting ViT arguments
        raise ParamsError(f"model.name '{name}' is not a timm VisionTransformer ({err})") from err
    if not isinstance(model, VisionTransformer):
        raise ParamsError(f"model.name '{name}' builds a {type(model).__name__}, not a timm VisionTransformer")
    return model


def build_model(p: ModelParams, num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> VisionTransformer:
    """A timm VisionTransformer from a timm name or custom dims; pretrained weights from a local file only."""
    kwargs: dict[str, Any] = dict(img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    if p.name == "vit_custom":
        kwargs.update(_custom_kwargs(p))
    else:
        kwargs["drop_path_rate"] = p.drop_path_rate
    kwargs.update(p.kwargs)
    model = _create(p.name, kwargs)
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
    from timm.models.vision_transformer import checkpoint_filter_fn

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


# ---------------------------------------------------------------- structure spec

def architecture_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable description from which `load_model` rebuilds the exact module structure."""
    if not hasattr(model, "vitprune_arch"):
        raise ModelError("model was not built by vitprune.build_model (no vitprune_arch); cannot describe it")
    blocks = []
    for block in model.blocks:
        a, m = block.attn, block.mlp
        entry: dict[str, Any] = {}
        if isinstance(a, PrunableAttention):
            entry["attn"] = dict(num_heads=a.num_heads, qk_head_dim=a.qk_head_dim, v_head_dim=a.v_head_dim,
                                 in_dim=None if a.in_index is None else len(a.in_index), scale=a.scale,
                                 gates=[s for s in ("gate_in", "gate_qk", "gate_out") if getattr(a, s) is not None])
        if isinstance(m, PrunableMlp):
            entry["mlp"] = dict(in_dim=None if m.in_index is None else len(m.in_index), hidden=m.fc1.out_features,
                                gates=[s for s in ("gate_in", "gate_hidden") if getattr(m, s) is not None])
        blocks.append(entry)
    factorized = {name: mod.rank for name, mod in model.named_modules() if isinstance(mod, FactorizedLinear)}
    return {"format": SPEC_FORMAT, "timm": model.vitprune_arch, "blocks": blocks, "factorized": factorized}


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None)


def apply_block_structure(model: VisionTransformer, blocks: list[dict[str, Any]]) -> VisionTransformer:
    """Reshape each block's attention/MLP (in place) to the sizes in `blocks`; weights are placeholders."""
    for block, entry in zip(model.blocks, blocks):
        if "attn" in entry:
            s = entry["attn"]
            attn = PrunableAttention(block.attn)
            dim_in = s["in_dim"] or attn.qkv.in_features
            h, dqk, dv = s["num_heads"], s["qk_head_dim"], s["v_head_dim"]
            attn.qkv = _linear_like(attn.qkv, dim_in, h * (2 * dqk + dv))
            attn.proj = _linear_like(attn.proj, h * dv, attn.proj.out_features)
            attn.num_heads, attn.qk_head_dim, attn.v_head_dim, attn.head_dim = h, dqk, dv, dv
            attn.attn_dim, attn.scale = h * dv, s["scale"]
            attn.in_index = None if s["in_dim"] is None else torch.arange(dim_in)
            if isinstance(attn.norm, nn.LayerNorm) and attn.norm.normalized_shape[0] != h * dv:
                raise ModelError("attention with scale_norm cannot change its width")
            sizes = {"gate_in": dim_in, "gate_qk": h * dqk, "gate_out": h * dv}
            for site in ("gate_in", "gate_qk", "gate_out"):
                setattr(attn, site, _gate(sizes[site]) if site in s["gates"] else None)
            block.attn = attn
        if "mlp" in entry:
            s = entry["mlp"]
            mlp = PrunableMlp(block.mlp)
            dim_in = s["in_dim"] or mlp.fc1.in_features
            mlp.fc1 = _linear_like(mlp.fc1, dim_in, s["hidden"])
            mlp.fc2 = _linear_like(mlp.fc2, s["hidden"], mlp.fc2.out_features)
            mlp.in_index = None if s["in_dim"] is None else torch.arange(dim_in)
            sizes = {"gate_in": dim_in, "gate_hidden": s["hidden"]}
            for site in ("gate_in", "gate_hidden"):
                setattr(mlp, site, _gate(sizes[site]) if site in s["gates"] else None)
            block.mlp = mlp
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
    model = _create(spec["timm"]["name"], dict(spec["timm"]["kwargs"]))
    model.vitprune_arch = spec["timm"]
    if spec.get("blocks"):
        apply_block_structure(model, spec["blocks"])
    apply_factorized_structure(model, spec.get("factorized", {}))
    return model


# ---------------------------------------------------------------- save / load

def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path) then rename onto `path`, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, path: str | Path, extra_tensors: dict[str, torch.Tensor] | None = None,
               metadata: dict[str, str] | None = None) -> Path:
    """Write weights as safetensors with the JSON architecture spec in its header (atomically; no pickle)."""
    path = Path(path)
    tensors = _tensors(model)
    tensors.update(extra_tensors or {})
    meta = {SPEC_KEY: json.dumps(architecture_spec(model)), **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a vitprune safetensors file, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"model file '{path}' is not a readable safetensors file (truncated or corrupted?): "
                         f"{err}") from err
    return tensors, metadata


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
    model = model_from_spec(spec)
    state = {k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ModelError(f"model file '{path}' does not match its architecture spec: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes {sorted(wrong)[:5]}")
    model.load_state_dict(state)
    return model.eval()
