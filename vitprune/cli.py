"""The `vitprune` command: train, sparse-train, prune, finetune, decompose, evaluate, info, reproduce."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PARAMS = "params/default.yaml"


def _common(parser: argparse.ArgumentParser, params_default: str | None = DEFAULT_PARAMS) -> None:
    parser.add_argument("--params", default=params_default, help="parameter set (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--run-dir", default=None, help="artifact folder (default runs/<params name>)")


def _load(args):
    import vitprune as vp
    from vitprune.params import parse_set_args

    p = vp.load_params(args.params, parse_set_args(args.set))
    run_dir = Path(args.run_dir or Path("runs") / p.name)
    return p, run_dir


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, default=float))


def _data_and_input(p):
    import vitprune as vp

    bundle = vp.load_data(p.data, seed=p.train.seed)
    return bundle, (1, bundle.in_chans, bundle.image_size, bundle.image_size)


def cmd_train(args) -> None:
    import torch

    import vitprune as vp
    from vitprune.training import fit

    p, run_dir = _load(args)
    bundle, shape = _data_and_input(p)
    torch.manual_seed(p.train.seed)
    model = vp.build_model(p.model, bundle.num_classes, bundle.in_chans, bundle.image_size)
    history = fit(p, "dense", model, bundle, run_dir, "dense")
    _print({"model": str(run_dir / "dense.safetensors"), **(history[-1] if history else {}),
            **vp.model_summary(model, shape)})


def _checkpoint(args, run_dir: Path, default: str) -> Path:
    path = Path(args.checkpoint) if getattr(args, "checkpoint", None) else run_dir / default
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; run the earlier stage first "
                                f"(or pass the checkpoint path)")
    return path


def cmd_sparse_train(args) -> None:
    import vitprune as vp
    from vitprune.training import fit

    p, run_dir = _load(args)
    bundle, _ = _data_and_input(p)
    model = vp.load_model(_checkpoint(args, run_dir, "dense.safetensors"))
    vp.attach_gates(model, p.sparse.sites)
    history = fit(p, "sparse", model, bundle, run_dir, "sparse")
    _print({"model": str(run_dir / "sparse.safetensors"), **(history[-1] if history else {})})


def cmd_prune(args) -> None:
    import vitprune as vp

    p, run_dir = _load(args)
    bundle, shape = _data_and_input(p)
    model = vp.load_model(_checkpoint(args, run_dir, "sparse.safetensors"))
    batches = None
    if args.score == "taylor":
        batches = vp.calibration_batches(bundle, p.data.calib_batches, p.data.batch_size)
    scores = vp.importance_scores(model, args.score, batches=batches, sites=p.sparse.sites, seed=p.train.seed)
    from vitprune.pruning import prune_variant

    stem, small, plan = prune_variant(model, scores, args.score, args.ratio, p.prune, run_dir)
    _print({"model": str(run_dir / f"{stem}.safetensors"), "realised_ratio": plan.realised_ratio,
            **vp.evaluate(small, vp.test_batches(bundle, p.data.eval_batch_size)), **vp.model_summary(small, shape)})


def cmd_finetune(args) -> None:
    import vitprune as vp
    from vitprune.training import fit

    p, run_dir = _load(args)
    bundle, _ = _data_and_input(p)
    source = _checkpoint(args, run_dir, "")
    model = vp.load_model(source)
    teacher = vp.load_model(args.teacher) if args.teacher else None
    name = source.name.removesuffix(".safetensors") + "_ft"
    history = fit(p, "finetune", model, bundle, source.parent, name, teacher=teacher)
    _print({"model": str(source.parent / f"{name}.safetensors"), **(history[-1] if history else {})})


def cmd_decompose(args) -> None:
    import vitprune as vp

    model = vp.load_model(args.checkpoint)
    calibration = None
    if args.method == "svd_activation":
        p, _ = _load(args)
        bundle, _ = _data_and_input(p)
        calibration = vp.calibration_batches(bundle, p.data.calib_batches, p.data.batch_size)
    new = vp.decompose_model(model, args.method, rank=args.rank, rank_ratio=args.rank_ratio, energy=args.energy,
                             param_budget=args.param_budget, calibration=calibration, layers=args.layers)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(
        Path(args.checkpoint).stem + f"_{args.method}.safetensors")
    vp.save_model(new, out)
    report = vp.decomposition_report(model, new)
    _print({"model": str(out), "params": vp.count_params(new), "params_before": vp.count_params(model),
            "layers_factorized": len(report),
            "mean_rel_error": sum(r["rel_error"] for r in report) / max(1, len(report))})


def cmd_evaluate(args) -> None:
    import vitprune as vp

    p, _ = _load(args)
    bundle, shape = _data_and_input(p)
    model = vp.load_model(args.checkpoint)
    _print({**vp.evaluate(model, vp.test_batches(bundle, p.data.eval_batch_size)), **vp.model_summary(model, shape)})


def cmd_info(args) -> None:
    import timm

    import vitprune as vp

    if Path(args.target).is_file():
        model = vp.load_model(args.target)
        kw = model.vitprune_arch["kwargs"]
        size, chans = kw.get("img_size", 224), kw.get("in_chans", 3)
    elif timm.is_model(args.target):
        model = timm.create_model(args.target, pretrained=False)
        chans, size = model.pretrained_cfg.get("input_size", (3, 224, 224))[:2]
    else:
        raise FileNotFoundError(f"'{args.target}' is neither a model file nor a timm model name")
    size = args.image_size or (size if isinstance(size, int) else size[0])
    shape = (1, chans, size, size)
    macs = vp.count_macs(model, shape)
    _print({"target": args.target, "input": list(shape), "params": vp.count_params(model), "macs": macs,
            "GMACs": macs / 1e9})


def cmd_reproduce(args) -> None:
    from vitprune.params import parse_set_args
    from vitprune.pipeline import reproduce

    reproduce(args.params_file, overrides=parse_set_args(args.set), only=args.only, start=args.start,
              force=args.force, smoke=args.smoke, runs_root=Path(args.runs_root), figures_root=Path(args.figures_root))


def build_parser() -> argparse.ArgumentParser:
    from vitprune.decompose import LAYERS, METHODS

    parser = argparse.ArgumentParser(prog="vitprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="dense training (writes runs/<set>/dense.safetensors)")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sparse-train", help="VTP sparse training with gates + L1 (from the dense model)")
    _common(p)
    p.add_argument("checkpoint", nargs="?", help="dense model (default runs/<set>/dense.safetensors)")
    p.set_defaults(func=cmd_sparse_train)

    p = sub.add_parser("prune", help="prune a gated model at a ratio")
    _common(p)
    p.add_argument("checkpoint", nargs="?", help="gated model (default runs/<set>/sparse.safetensors)")
    p.add_argument("--ratio", type=float, required=True, help="fraction of gated dims to remove, in [0, 1)")
    p.add_argument("--score", default="gates", choices=["gates", "magnitude", "taylor", "random"])
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="fine-tune a pruned or decomposed model")
    _common(p)
    p.add_argument("checkpoint", help="model to fine-tune")
    p.add_argument("--teacher", help="dense model to distil from (finetune.distill > 0)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("decompose", help="factorize a model's linear projections")
    _common(p)
    p.add_argument("checkpoint", help="model file")
    p.add_argument("--method", required=True, choices=METHODS)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int)
    group.add_argument("--rank-ratio", type=float)
    group.add_argument("--energy", type=float)
    group.add_argument("--param-budget", type=float)
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    p.add_argument("--out", help="output file (default <checkpoint>_<method>.safetensors)")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("evaluate", help="test-set top-1/top-5/loss, params and MACs of a model file")
    _common(p)
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="params and MACs of a model file or timm name")
    p.add_argument("target", help="model file or timm model name")
    p.add_argument("--image-size", type=int)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("reproduce", help="run the notebook sequence with papermill and regenerate figures/")
    p.add_argument("params_file", help="params/<set>.yaml")
    p.add_argument("--only", type=int, help="run only stage N")
    p.add_argument("--from", dest="start", type=int, help="start at stage N")
    p.add_argument("--force", action="store_true", help="re-run stages even if unchanged")
    p.add_argument("--smoke", action="store_true", help="synthetic data, full architecture, a couple of steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--figures-root", default="figures")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vitprune.data import DataError
    from vitprune.decompose import DecomposeError
    from vitprune.models import ModelError
    from vitprune.params import ParamsError
    from vitprune.pruning import PruneError
    from vitprune.scoring import ScoringError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ParamsError, DataError, ModelError, PruneError, DecomposeError, ScoringError, FileNotFoundError) as err:
        print(f"vitprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from vitprune.pipeline import StageFailed
        from vitprune.training import TrainingDiverged

        if isinstance(err, (StageFailed, TrainingDiverged)):
            print(f"vitprune {args.command}: error: {err}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
