"""The `vitprune` command: train, sparse-train, prune, finetune, decompose, evaluate, info, export, bench, reproduce,
compare — the argument parser and `main`; what each command does is in `vitprune.commands`.

It joins the library and the study, and prints every error vitprune raises on purpose as one line.
"""

from __future__ import annotations

import argparse
import sys

from vitprune import commands
from vitprune.commands import DEFAULT_PARAMS
from vitprune.study.provenance import pin_numerics


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None,
                        help=f"parameter set (YAML; default: the one the model file records, else {DEFAULT_PARAMS})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--run-dir", default=None, help="artifact folder (default runs/<params name>)")


def _seed_list(text: str) -> list[int]:
    """--seeds 0,1,2 as a list of non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds such as 0,1,2") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are non-negative integers")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    from vitprune.names import LAYERS
    from vitprune.registry import CRITERIA

    parser = argparse.ArgumentParser(prog="vitprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="dense training (writes runs/<set>/dense.safetensors)")
    _common(p)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("sparse-train", help="VTP sparse training with gates + L1 (from the dense model)")
    _common(p)
    p.add_argument("checkpoint", nargs="?", help="dense model (default runs/<set>/dense.safetensors)")
    p.set_defaults(func=commands.cmd_sparse_train)

    p = sub.add_parser("prune", help="prune a gated model at a ratio")
    _common(p)
    p.add_argument("checkpoint", nargs="?", help="gated model (default runs/<set>/sparse.safetensors)")
    p.add_argument("--ratio", type=float, required=True, help="fraction of gated dims to remove, in [0, 1)")
    p.add_argument("--score", default="gates", choices=CRITERIA.names())
    p.set_defaults(func=commands.cmd_prune)

    p = sub.add_parser("finetune", help="fine-tune a pruned or decomposed model")
    _common(p)
    p.add_argument("checkpoint", help="model to fine-tune")
    p.add_argument("--teacher", help="dense model to distil from (finetune.distill > 0)")
    p.set_defaults(func=commands.cmd_finetune)

    p = sub.add_parser("decompose", help="factorize a model's linear projections")
    _common(p)
    p.add_argument("checkpoint", help="model file")
    p.add_argument("--method", required=True, help="a registered decomposition method (vitprune.DECOMPOSITIONS; "
                   "a parameter set's plugins add their own)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int)
    group.add_argument("--rank-ratio", type=float)
    group.add_argument("--energy", type=float)
    group.add_argument("--param-budget", type=float)
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    p.add_argument("--refit", action="store_true",
                   help="keep the method's first factor and refit the second on calibration data (least squares)")
    p.add_argument("--out", help="output file (default <checkpoint>_<method>.safetensors)")
    p.set_defaults(func=commands.cmd_decompose)

    p = sub.add_parser("evaluate", help="test-set top-1/top-5/loss, params and MACs of a model file")
    _common(p)
    p.add_argument("checkpoint")
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser("info", help="params and MACs of a model file or timm name")
    p.add_argument("target", help="model file or timm model name")
    p.add_argument("--image-size", type=int)
    p.set_defaults(func=commands.cmd_info)

    p = sub.add_parser("export", help="export a model file to ONNX (gates folded) and check it in onnxruntime")
    p.add_argument("checkpoint", help="model file")
    p.add_argument("--onnx", help="output file (default <checkpoint>.onnx)")
    p.add_argument("--opset", type=int, default=17, choices=range(14, 22), metavar="{14..21}")
    p.add_argument("--batch", type=int, default=8, choices=range(1, 1025), metavar="{1..1024}",
                   help="images in the check batch (the batch size stays dynamic)")
    p.add_argument("--optimize", default="ort", choices=["ort", "transformer", "none"],
                   help="ort: onnxruntime's graph optimisations applied (default); transformer: its ViT transformer "
                        "optimizer; none: the exporter's graph")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser("bench", help="latency of a model file, or its speed-up over --against, measured carefully")
    p.add_argument("checkpoint", help="model file")
    p.add_argument("--against", help="the model to compare with (e.g. the dense one): speed-up / MAC reduction")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], choices=range(1, 1025), metavar="N")
    p.add_argument("--runtime", default="both", choices=["torch", "onnxruntime", "both"])
    p.add_argument("--threads", type=int, default=2, choices=range(1, 257), metavar="N")
    p.add_argument("--rounds", type=int, default=7, choices=range(1, 101), metavar="N")
    p.set_defaults(func=commands.cmd_bench)

    p = sub.add_parser("reproduce", help="run the notebook sequence with papermill and regenerate figures/")
    p.add_argument("params_file", help="params/<set>.yaml")
    p.add_argument("--only", type=int, help="run only stage N")
    p.add_argument("--from", dest="start", type=int, help="start at stage N")
    p.add_argument("--force", action="store_true",
                   help="re-run from scratch, checkpoints included: every stage, or with --only/--from those alone")
    p.add_argument("--smoke", action="store_true", help="synthetic data, full architecture, a couple of steps")
    p.add_argument("--seeds", type=_seed_list, metavar="S[,S...]",
                   help="run these seeds instead of the set's (e.g. --seeds 0 for a quick single-seed run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--figures-root", default="figures")
    p.set_defaults(func=commands.cmd_reproduce)

    p = sub.add_parser("compare", help="does a re-run (another clone, machine or seeds) confirm the findings?")
    p.add_argument("committed", help="figures/<set> folder, e.g. figures/default")
    p.add_argument("rerun", help="the same set's figures folder from the re-run")
    p.add_argument("--json", action="store_true", help="every claim and mean as JSON")
    p.set_defaults(func=commands.cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vitprune.errors import VitpruneError

    args = build_parser().parse_args(argv)
    if args.command != "bench":  # speed is measured on the machine's own kernels, as a deployment runs them
        pin_numerics()
    try:
        args.func(args)
    except VitpruneError as err:
        return _refuse(args.command, str(err), err.exit_code)
    except OSError as err:  # a path the system refuses: /proc, a read-only disk, no space left
        where = f"'{err.filename}'" if err.filename else "a file"
        return _refuse(args.command, f"cannot use {where}: {err.strerror or err}; give a writable folder", 2)
    except KeyboardInterrupt:
        return _refuse(args.command, "interrupted; finished files and checkpoints are kept (written atomically), "
                       "the same command resumes", 130)
    return 0


def _refuse(command: str, message: str, code: int) -> int:
    message = " ".join(message.split())  # one line, whatever the message holds
    print(f"vitprune {command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
