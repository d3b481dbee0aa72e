"""Deployment: ONNX export of any model vitprune handles, checked against onnxruntime.

Dense, gated (gates folded on export), pruned and factorized models export with a dynamic batch
dimension; `check_onnx` runs the file in onnxruntime and returns the largest difference to PyTorch.
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


def export_onnx(model: nn.Module, path: str | Path, opset: int = OPSET) -> Path:
    """Write `model` as ONNX (input 'images', output 'logits', dynamic batch), atomically."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ModelError(f"ONNX file '{path}' should end in .onnx")
    work = deployable(model)
    example = torch.randn(input_shape(work, batch=2))

    def write(tmp: str) -> None:
        torch.onnx.export(work, (example,), tmp, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: expected
        warnings.simplefilter("ignore", DeprecationWarning)
        atomic_write(path, write)
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for an exported file (intra-op threads fixed when given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
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
