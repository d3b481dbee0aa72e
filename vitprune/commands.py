"""What each `vitprune` command does (`cli` parses the arguments and calls these).

Training, pruning and fine-tuning run through the very functions the pipeline's stages run
(`vitprune.study.stages`), so a command and a notebook compute the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_PARAMS = "params/default.yaml"


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
    import vitprune as vp
    from vitprune.study.stages.sparse_training import train_dense

    p, run_dir = _load(args)
    _, shape = _data_and_input(p)
    model, history = train_dense(p, run_dir)
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
    from vitprune.study.stages.sparse_training import sparse_train

    p, run_dir = _load(args, _given(args))
    bundle, _ = _data_and_input(p)
    model = _load_for(_checkpoint(args, run_dir, "dense.safetensors"), bundle, p)
    _, history = sparse_train(p, run_dir, model)
    _print({"model": str(run_dir / "sparse.safetensors"), **(history[-1] if history else {})})


def cmd_prune(args) -> None:
    import vitprune as vp
    from vitprune.study.stages.pruning import prune_variant

    p, run_dir = _load(args, _given(args))
    bundle, shape = _data_and_input(p)
    model = _load_for(_checkpoint(args, run_dir, "sparse.safetensors"), bundle, p)
    batches = None
    if "batches" in vp.CRITERIA[args.score].needs:
        batches = vp.calibration_batches(bundle, p.data.calib_batches, p.data.batch_size)
    scores = vp.importance_scores(model, args.score, batches=batches, sites=p.sparse.sites, seed=p.train.seed)
    stem, small, plan = prune_variant(model, scores, args.score, args.ratio, p.prune, run_dir)
    _print({"model": str(run_dir / f"{stem}.safetensors"), "realised_ratio": plan.realised_ratio,
            **vp.evaluate(small, vp.test_batches(bundle, p.data.eval_batch_size)), **vp.model_summary(small, shape)})


def cmd_finetune(args) -> None:
    from vitprune.study.stages.finetuning import finetune_model

    p, run_dir = _load(args, _given(args))
    bundle, _ = _data_and_input(p)
    source = _checkpoint(args, run_dir, "")
    _load_for(source, bundle, p)
    teacher = None
    if p.finetune.distill > 0 and not args.teacher:
        from vitprune.errors import ParamsError

        raise ParamsError(f"finetune.distill is {p.finetune.distill} but no --teacher is given; pass --teacher "
                          f"{run_dir / 'dense.safetensors'} (the dense model) or --set finetune.distill=0")
    if args.teacher:
        hint = "give the dense model, e.g. runs/default/dense.safetensors"
        teacher = _load_for(_model_file(Path(args.teacher), "--teacher", hint), bundle, p, "teacher")
    out_dir = run_dir if args.run_dir else source.parent
    _, history, name = finetune_model(p, source, out_dir, teacher)
    _print({"model": str(out_dir / f"{name}.safetensors"), **(history[-1] if history else {})})


def cmd_decompose(args) -> None:
    import vitprune as vp
    from vitprune.errors import DecomposeError, ModelError

    source = _checkpoint(args, Path("."), "")
    out = Path(args.out) if args.out else source.with_name(source.stem + f"_{args.method}.safetensors")
    if out.is_dir():
        raise ModelError(f"--out '{out}' is a directory; give the file to write, e.g. {out / source.name}")
    p, _ = _load(args, source)  # imports the set's plugins: their methods are accepted too
    try:
        entry = vp.DECOMPOSITIONS[args.method]
    except vp.ParamsError as err:
        raise DecomposeError(f"--method: {err}") from None
    model = vp.load_model(source)
    calibration = None
    if entry.calibrated or args.refit:
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
    export_onnx(model, out, opset=args.opset, optimize=args.optimize)
    diff = check_onnx(model, out, batch=args.batch)
    if diff > TOLERANCE:
        raise ModelError(f"'{out}' was written, but onnxruntime's logits differ from PyTorch's by {diff:.3g} "
                         f"(> {TOLERANCE}); do not deploy it")
    _print({"onnx": str(out), "source": str(source), "optimize": args.optimize, "max_abs_diff": diff,
            "checked_batch": args.batch,
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


def cmd_reproduce(args) -> None:
    from vitprune.params import parse_set_args
    from vitprune.study.pipeline import reproduce

    overrides = parse_set_args(args.set)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    reproduce(args.params_file, overrides=overrides, only=args.only, start=args.start,
              force=args.force, smoke=args.smoke, runs_root=Path(args.runs_root), figures_root=Path(args.figures_root))


def cmd_compare(args) -> None:
    from vitprune.study.findings import compare_runs, comparison_markdown

    result = compare_runs(Path(args.committed), Path(args.rerun))
    print(json.dumps(result, indent=1, default=str) if args.json else comparison_markdown(result).rstrip())
