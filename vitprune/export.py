"""Deployment: ONNX export of any model vitprune handles, optimised the way onnxruntime users run it, and checked.

Dense, gated (gates folded on export), pruned and factorized models export with a dynamic batch
dimension. `export_onnx` then applies onnxruntime's own graph optimisations offline (the portable
"extended" level: constant folding, LayerNorm/GELU/MatMul+Add fusions), so the file is the graph
onnxruntime runs; `optimize="transformer"` applies onnxruntime's ViT transformer optimizer instead
(SkipLayerNorm and BiasGelu fusions; on the CPUs measured here it ran slower, see `make bench`), and
`optimize="none"` keeps the exporter's graph. `check_onnx` runs the file in onnxruntime and returns the
largest difference to PyTorch.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from vitprune.checkpoint import atomic_write, model_input
from vitprune.errors import ModelError
from vitprune.gates import fold_gates, gate_parameters

OPSET = 17
TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| accepted on a batch of logits
OPTIMIZERS = ("ort", "transformer", "none")


def input_shape(model: nn.Module, batch: int = 1) -> tuple[int, int, int, int]:
    """(batch, channels, height, width) of the images `model` takes."""
    want = model_input(model)
    if want["img_size"] is None:
        raise ModelError("the model has no fixed image size; pass input_shape explicitly")
    height, width = want["img_size"]
    return (batch, want["in_chans"], height, width)


def deployable(model: nn.Module) -> nn.Module:
    """An eval-mode copy with the gates folded into the weights (same function, plain layers)."""
    work = copy.deepcopy(model).eval()
    return fold_gates(work) if gate_parameters(work) else work


def export_onnx(model: nn.Module, path: str | Path, opset: int = OPSET, optimize: str = "ort") -> Path:
    """Write `model` as ONNX (input 'images', output 'logits', dynamic batch), optimised by `optimize` (see the
    module doc), atomically."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ModelError(f"ONNX file '{path}' should end in .onnx")
    if optimize not in OPTIMIZERS:
        raise ModelError(f"optimize={optimize!r} is not accepted; accepted: {', '.join(OPTIMIZERS)}")
    work = deployable(model)
    example = torch.randn(input_shape(work, batch=2))

    def write(tmp: str) -> None:
        raw = f"{tmp}.raw.onnx"
        torch.onnx.export(work, (example,), raw, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        _optimized(raw, tmp, optimize, work)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: expected
        warnings.simplefilter("ignore", DeprecationWarning)
        atomic_write(path, write)
    return path


def _optimized(raw: str, out: str, optimize: str, model: nn.Module) -> None:
    """`raw` (the exporter's graph) written to `out` as `optimize` asks."""
    import onnxruntime as ort

    if optimize == "none":
        Path(raw).replace(out)
    elif optimize == "ort":
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable across CPUs
        options.optimized_model_filepath = out
        ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
    else:
        from onnxruntime.transformers.optimizer import optimize_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimize_model(raw, model_type="vit", num_heads=model.blocks[0].attn.num_heads,
                           hidden_size=model.embed_dim, opt_level=0).save_model_to_file(out)
    Path(raw).unlink(missing_ok=True)


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for an exported file: intra-op threads fixed when given, and no spin-waiting
    after a run — interleaved sessions in one process would otherwise steal each other's cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_onnx(model: nn.Module, path: str | Path, batch: int = 8, seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| over the logits of a random batch of `batch` images."""
    work = deployable(model)
    x = torch.randn(input_shape(work, batch), generator=torch.Generator().manual_seed(seed))
    expected = work(x).numpy()
    got = onnx_session(path).run(["logits"], {"images": x.numpy()})[0]
    if got.shape != expected.shape:
        raise ModelError(f"ONNX file '{path}' returns logits of shape {got.shape}; PyTorch gives {expected.shape}")
    return float(abs(got - expected).max())
