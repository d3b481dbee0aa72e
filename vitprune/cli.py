"""The `vitprune` command: train, sparse-train, prune, finetune, decompose, evaluate, info, export, bench, reproduce,
compare."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitprune.names import CALIBRATED_METHODS
from vitprune.provenance import pin_numerics

DEFAULT_PARAMS = "params/default.yaml"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None,
                        help=f"parameter set (YAML; default: the one the model file records, else {DEFAULT_PARAMS})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--run-dir", default=None, help="artifact folder (default runs/<params name>)")


def _params_file(args, model_path: Path | None = None) -> str:
    """--params if given; else the parameter file a model file records (when it exists here); else the default."""
    if args.params:
        return args.params
    if model_path is not None and model_path.is_file():
        from vitprune.checkpoint import PARAMS_KEY, read_metadata

        try:
            recorded = json.loads(read_metadata(model_path).get(PARAMS_KEY, "{}")).get("file")
        except (json.JSONDecodeError, AttributeError):
            recorded = None  # an unreadable record is no reason to fail: fall back to the default set
        if isinstance(recorded, str) and Path(recorded).is_file():
            return recorded
    return DEFAULT_PARAMS


def _load(args, model_path: Path | None = None):
    import vitprune as vp
    from vitprune.errors import ParamsError
    from vitprune.params import parse_set_args

    p = vp.load_params(_params_file(args, model_path), parse_set_args(args.set))
    run_dir = Path(args.run_dir or Path("runs") / p.name)
    if run_dir.exists() and not run_dir.is_dir():
        raise ParamsError(f"--run-dir '{run_dir}' is a file; give a folder (it is created if missing)")
    return p, run_dir


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, default=float))


def _data_and_input(p):
    import vitprune as vp

    bundle = vp.load_data(p.data, seed=p.train.seed)
    return bundle, (1, bundle.in_chans, bundle.image_size, bundle.image_size)


def _load_for(path: Path, bundle, p, role: str = "model"):
    """A model file, refused clearly if it does not take this parameter set's images or classes."""
    import vitprune as vp
    from vitprune.checkpoint import model_input
    from vitprune.errors import ModelError

    model = vp.load_model(path)
    want = model_input(model)
    size = want["img_size"]
    fits_size = want["dynamic_img_size"] or size is None or list(size) == [bundle.image_size] * 2
    if want["in_chans"] != bundle.in_chans or not fits_size or want["num_classes"] != bundle.num_classes:
        shown = "x".join(map(str, size)) if size else "any size"
        raise ModelError(f"{role} '{path}' takes {want['in_chans']}-channel {shown} images and predicts "
                         f"{want['num_classes']} classes; parameter set '{p.source}' gives {bundle.in_chans}-channel "
                         f"{bundle.image_size}x{bundle.image_size} {bundle.name} images with {bundle.num_classes} "
                         "classes; pass --params of the set the model was trained with")
    return model


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


def _model_file(path: Path, what: str, hint: str) -> Path:
    """`path` if it is a file; else a one-line refusal naming `what` and how to fix it."""
    from vitprune.errors import ModelError

    if path.is_dir():
        raise ModelError(f"{what} '{path}' is a directory; give a .safetensors model file")
    if not path.is_file():
        raise ModelError(f"{what} '{path}' does not exist; {hint}")
    return path


def _checkpoint(args, run_dir: Path, default: str) -> Path:
    path = Path(args.checkpoint) if getattr(args, "checkpoint", None) else run_dir / default
    return _model_file(path, "checkpoint", "run the earlier stage first (or pass the checkpoint path)")


def _given(args) -> Path | None:
    return Path(args.checkpoint) if getattr(args, "checkpoint", None) else None


def cmd_sparse_train(args) -> None:
    import vitprune as vp
    from vitprune.training import fit

    p, run_dir = _load(args, _given(args))
    bundle, _ = _data_and_input(p)
    model = _load_for(_checkpoint(args, run_dir, "dense.safetensors"), bundle, p)
    vp.attach_gates(model, p.sparse.sites)
    history = fit(p, "sparse", model, bundle, run_dir, "sparse")
    _print({"model": str(run_dir / "sparse.safetensors"), **(history[-1] if history else {})})


def cmd_prune(args) -> None:
    import vitprune as vp
    from vitprune.experiments import prune_variant

    p, run_dir = _load(args, _given(args))
    bundle, shape = _data_and_input(p)
    model = _load_for(_checkpoint(args, run_dir, "sparse.safetensors"), bundle, p)
    batches = None
    if args.score == "taylor":
        batches = vp.calibration_batches(bundle, p.data.calib_batches, p.data.batch_size)
    scores = vp.importance_scores(model, args.score, batches=batches, sites=p.sparse.sites, seed=p.train.seed)
    stem, small, plan = prune_variant(model, scores, args.score, args.ratio, p.prune, run_dir)
    _print({"model": str(run_dir / f"{stem}.safetensors"), "realised_ratio": plan.realised_ratio,
            **vp.evaluate(small, vp.test_batches(bundle, p.data.eval_batch_size)), **vp.model_summary(small, shape)})


def cmd_finetune(args) -> None:
    from vitprune.training import fit

    p, run_dir = _load(args, _given(args))
    bundle, _ = _data_and_input(p)
    source = _checkpoint(args, run_dir, "")
    model = _load_for(source, bundle, p)
    teacher = None
    if args.teacher:
        hint = "give the dense model, e.g. runs/default/dense.safetensors"
        teacher = _load_for(_model_file(Path(args.teacher), "--teacher", hint), bundle, p, "teacher")
    name = source.name.removesuffix(".safetensors") + "_ft"
    history = fit(p, "finetune", model, bundle, source.parent, name, teacher=teacher)
    _print({"model": str(source.parent / f"{name}.safetensors"), **(history[-1] if history else {})})


def cmd_decompose(args) -> None:
    import vitprune as vp
    from vitprune.errors import DecomposeError, ModelError

    source = _checkpoint(args, Path("."), "")
    out = Path(args.out) if args.out else source.with_name(source.stem + f"_{args.method}.safetensors")
    if out.is_dir():
        raise ModelError(f"--out '{out}' is a directory; give the file to write, e.g. {out / source.name}")
    model = vp.load_model(source)
    calibration = None
    if args.method in CALIBRATED_METHODS or args.refit:
        p, _ = _load(args, source)
        bundle, _ = _data_and_input(p)
        _load_for(source, bundle, p)
        calibration = vp.calibration_batches(bundle, p.data.calib_batches, p.data.batch_size)
    new = vp.decompose_model(model, args.method, rank=args.rank, rank_ratio=args.rank_ratio, energy=args.energy,
                             param_budget=args.param_budget, calibration=calibration, layers=args.layers,
                             refit=args.refit)
    report = vp.decomposition_report(model, new)
    if not report:
        raise DecomposeError(f"no layer of '{source}' is factorized at these settings: an m x n layer saves "
                             "parameters only below rank m*n/(m+n); choose a smaller rank, rank ratio, energy or "
                             "a larger budget (nothing was written)")
    vp.save_model(new, out)
    _print({"model": str(out), "params": vp.count_params(new), "params_before": vp.count_params(model),
            "layers_factorized": len(report),
            "mean_rel_error": sum(r["rel_error"] for r in report) / max(1, len(report))})


def cmd_evaluate(args) -> None:
    import vitprune as vp

    source = _checkpoint(args, Path("."), "")
    p, _ = _load(args, source)
    bundle, shape = _data_and_input(p)
    model = _load_for(source, bundle, p)
    _print({**vp.evaluate(model, vp.test_batches(bundle, p.data.eval_batch_size)), **vp.model_summary(model, shape)})


def cmd_info(args) -> None:
    import timm

    import vitprune as vp
    from vitprune.checkpoint import model_input
    from vitprune.errors import ModelError
    from vitprune.models import create_vit

    if args.image_size is not None and not 8 <= args.image_size <= 4096:
        raise ModelError(f"--image-size {args.image_size} is out of range; accepted: 8..4096 pixels")
    if Path(args.target).is_file():
        model = vp.load_model(args.target)
    elif timm.is_model(args.target):
        model = create_vit(args.target, {"img_size": args.image_size} if args.image_size else {})
    else:
        raise ModelError(f"'{args.target}' is neither a model file nor a timm model name "
                         "(see timm.list_models('*vit*'))")
    want = model_input(model)
    size = want["img_size"][0] if want["img_size"] else None
    if args.image_size and size and args.image_size != size and not want["dynamic_img_size"]:
        raise ModelError(f"--image-size {args.image_size}: model '{args.target}' takes {size}x{size} images only")
    size = args.image_size or size
    shape = (1, want["in_chans"], size, size)
    macs = vp.count_macs(model, shape)
    _print({"target": args.target, "input": list(shape), "params": vp.count_params(model), "macs": macs,
            "GMACs": macs / 1e9})


def cmd_export(args) -> None:
    import vitprune as vp
    from vitprune.errors import ModelError
    from vitprune.export import TOLERANCE, check_onnx, export_onnx

    source = _checkpoint(args, Path("."), "")
    model = vp.load_model(source)
    out = Path(args.onnx) if args.onnx else source.with_suffix(".onnx")
    if out.is_dir():
        raise ModelError(f"--onnx '{out}' is a directory; give the file to write, e.g. {out / source.stem}.onnx")
    export_onnx(model, out, opset=args.opset)
    diff = check_onnx(model, out, batch=args.batch)
    if diff > TOLERANCE:
        raise ModelError(f"'{out}' was written, but onnxruntime's logits differ from PyTorch's by {diff:.3g} "
                         f"(> {TOLERANCE}); do not deploy it")
    _print({"onnx": str(out), "source": str(source), "max_abs_diff": diff, "checked_batch": args.batch,
            "params": vp.count_params(model)})


def cmd_bench(args) -> None:
    import vitprune as vp
    from vitprune.export import input_shape
    from vitprune.speed import RUNTIMES, interleaved_times, runtime_runner, speed_rows

    source = _checkpoint(args, Path("."), "")
    model = vp.load_model(source)
    shape = input_shape(model)
    runtimes = RUNTIMES if args.runtime == "both" else (args.runtime,)
    if args.against:
        dense = vp.load_model(_model_file(Path(args.against), "--against", "give the model to compare with"))
        if input_shape(dense) != shape:
            from vitprune.errors import ModelError

            raise ModelError(f"--against '{args.against}' takes {input_shape(dense)[1:]} inputs; "
                             f"'{source}' takes {shape[1:]}; compare models of the same input")
        rows = speed_rows(dense, {source.stem: model}, shape, args.batch, runtimes, args.threads, args.rounds)
        _print(rows)
        return
    import tempfile

    import torch

    out = []
    with tempfile.TemporaryDirectory() as folder:
        for bs in args.batch:
            x = torch.randn((bs, *shape[1:]))
            runners = {rt: runtime_runner(model, x, rt, Path(folder), f"m{bs}", args.threads) for rt in runtimes}
            times = interleaved_times(runners, args.rounds, 3, 2, args.threads)
            out += [{"model": str(source), "runtime": rt, "batch": bs, **t,
                     "macs": vp.count_macs(model, (1, *shape[1:]))} for rt, t in times.items()]
    _print(out)


def _seed_list(text: str) -> list[int]:
    """--seeds 0,1,2 as a list of non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds such as 0,1,2") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are non-negative integers")
    return seeds


def cmd_reproduce(args) -> None:
    from vitprune.params import parse_set_args
    from vitprune.pipeline import reproduce

    overrides = parse_set_args(args.set)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    reproduce(args.params_file, overrides=overrides, only=args.only, start=args.start,
              force=args.force, smoke=args.smoke, runs_root=Path(args.runs_root), figures_root=Path(args.figures_root))


def cmd_compare(args) -> None:
    from vitprune.findings import compare_runs, comparison_markdown

    result = compare_runs(Path(args.committed), Path(args.rerun))
    print(json.dumps(result, indent=1, default=str) if args.json else comparison_markdown(result).rstrip())


def build_parser() -> argparse.ArgumentParser:
    from vitprune.names import CRITERIA, DECOMPOSE_METHODS, LAYERS

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
    p.add_argument("--score", default="gates", choices=CRITERIA)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="fine-tune a pruned or decomposed model")
    _common(p)
    p.add_argument("checkpoint", help="model to fine-tune")
    p.add_argument("--teacher", help="dense model to distil from (finetune.distill > 0)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("decompose", help="factorize a model's linear projections")
    _common(p)
    p.add_argument("checkpoint", help="model file")
    p.add_argument("--method", required=True, choices=DECOMPOSE_METHODS)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int)
    group.add_argument("--rank-ratio", type=float)
    group.add_argument("--energy", type=float)
    group.add_argument("--param-budget", type=float)
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    p.add_argument("--refit", action="store_true",
                   help="keep the method's first factor and refit the second on calibration data (least squares)")
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

    p = sub.add_parser("export", help="export a model file to ONNX (gates folded) and check it in onnxruntime")
    p.add_argument("checkpoint", help="model file")
    p.add_argument("--onnx", help="output file (default <checkpoint>.onnx)")
    p.add_argument("--opset", type=int, default=17, choices=range(14, 22), metavar="{14..21}")
    p.add_argument("--batch", type=int, default=8, choices=range(1, 1025), metavar="{1..1024}",
                   help="images in the check batch (the batch size stays dynamic)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="latency of a model file, or its speed-up over --against, measured carefully")
    p.add_argument("checkpoint", help="model file")
    p.add_argument("--against", help="the model to compare with (e.g. the dense one): speed-up / MAC reduction")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], choices=range(1, 1025), metavar="N")
    p.add_argument("--runtime", default="both", choices=["torch", "onnxruntime", "both"])
    p.add_argument("--threads", type=int, default=2, choices=range(1, 257), metavar="N")
    p.add_argument("--rounds", type=int, default=7, choices=range(1, 101), metavar="N")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("reproduce", help="run the notebook sequence with papermill and regenerate figures/")
    p.add_argument("params_file", help="params/<set>.yaml")
    p.add_argument("--only", type=int, help="run only stage N")
    p.add_argument("--from", dest="start", type=int, help="start at stage N")
    p.add_argument("--force", action="store_true", help="re-run stages even if unchanged")
    p.add_argument("--smoke", action="store_true", help="synthetic data, full architecture, a couple of steps")
    p.add_argument("--seeds", type=_seed_list, metavar="S[,S...]",
                   help="run these seeds instead of the set's (e.g. --seeds 0 for a quick single-seed run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--figures-root", default="figures")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("compare", help="does a re-run (another clone, machine or seeds) confirm the findings?")
    p.add_argument("committed", help="figures/<set> folder, e.g. figures/default")
    p.add_argument("rerun", help="the same set's figures folder from the re-run")
    p.add_argument("--json", action="store_true", help="every claim and mean as JSON")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vitprune.errors import VitpruneError

    args = build_parser().parse_args(argv)
    if args.command != "bench":  # speed is measured on the machine's own kernels, as a deployment runs them
        pin_numerics()
    try:
        args.func(args)
    except VitpruneError as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"vitprune {args.command}: error: {message}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
