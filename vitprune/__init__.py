"""vitprune: VTP pruning and matrix-decomposition compression of timm Vision Transformers."""

from vitprune.data import DataBundle, DataError, calibration_batches, load_data, test_batches, train_batches
from vitprune.decompose import (
    METHODS,
    DecomposeError,
    FactorizedLinear,
    decompose_model,
    decomposition_report,
    factorize,
    lu,
    orthogonality_loss,
    qr,
)
from vitprune.gates import attach_gates, fold_gates, gate_parameters, gate_statistics, l1_penalty
from vitprune.metrics import count_macs, count_params, evaluate, measure_latency, model_summary
from vitprune.models import ModelError, build_model, load_model, save_model
from vitprune.params import Params, ParamsError, load_params
from vitprune.pruning import PruneError, PrunePlan, plan_pruning, prune, pruned_architecture, zero_dropped
from vitprune.scoring import ScoringError, importance_scores
from vitprune.training import TrainConfig, TrainingDiverged, train

__version__ = "0.1.0"

__all__ = [
    "DataBundle", "DataError", "DecomposeError", "FactorizedLinear", "METHODS", "ModelError", "Params",
    "ParamsError", "PruneError", "PrunePlan", "ScoringError", "TrainConfig", "TrainingDiverged", "attach_gates",
    "build_model", "calibration_batches", "count_macs", "count_params", "decompose_model", "decomposition_report",
    "evaluate", "factorize", "fold_gates", "gate_parameters", "gate_statistics", "importance_scores", "l1_penalty",
    "load_data", "load_model", "load_params", "lu", "measure_latency", "model_summary", "orthogonality_loss",
    "plan_pruning", "prune", "pruned_architecture", "qr", "save_model", "test_batches", "train", "train_batches",
    "zero_dropped",
]
