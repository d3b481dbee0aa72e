"""vitprune: VTP pruning and matrix-decomposition compression of timm Vision Transformers."""

from vitprune.checkpoint import load_model, save_model
from vitprune.data import DataBundle, calibration_batches, load_data, test_batches, train_batches
from vitprune.decompose import decompose_model, decomposition_report, factorize
from vitprune.errors import (
    DataError,
    DecomposeError,
    MissingStageError,
    ModelError,
    ParamsError,
    PruneError,
    ScoringError,
    StageFailed,
    TrainingDiverged,
    VitpruneError,
)
from vitprune.gates import attach_gates, fold_gates, gate_parameters, gate_statistics, l1_penalty
from vitprune.layers import FactorizedLinear
from vitprune.linalg import lu, orthogonality_loss, qr
from vitprune.metrics import count_macs, count_params, evaluate, model_summary
from vitprune.models import build_model
from vitprune.names import LAYERS
from vitprune.params import Params, load_params
from vitprune.pruning import PrunePlan, plan_pruning, prune, pruned_architecture, zero_dropped
from vitprune.registry import CRITERIA, DECOMPOSITIONS, SITES, register_criterion, register_decomposition
from vitprune.scoring import importance_scores
from vitprune.speed import fast_width_multiple, measure_latency
from vitprune.training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "CRITERIA", "DECOMPOSITIONS", "DataBundle", "DataError", "DecomposeError", "FactorizedLinear", "LAYERS",
    "MissingStageError", "ModelError", "Params", "ParamsError", "PruneError", "PrunePlan", "SITES", "ScoringError",
    "StageFailed", "TrainConfig", "TrainingDiverged", "VitpruneError", "attach_gates", "build_model",
    "calibration_batches", "count_macs", "count_params", "decompose_model", "decomposition_report", "evaluate",
    "factorize", "fast_width_multiple", "fold_gates", "gate_parameters", "gate_statistics", "importance_scores",
    "l1_penalty", "load_data",
    "load_model", "load_params", "lu", "measure_latency", "model_summary", "orthogonality_loss", "plan_pruning",
    "prune", "pruned_architecture", "qr", "register_criterion", "register_decomposition", "save_model",
    "test_batches", "train", "train_batches", "zero_dropped",
]


def __getattr__(name: str):
    """The names of every registered method and site (plugins' included), read when asked."""
    if name == "DECOMPOSE_METHODS":
        return DECOMPOSITIONS.names()
    if name == "GATE_SITES":
        return SITES.names()
    raise AttributeError(f"module 'vitprune' has no attribute {name!r}")
