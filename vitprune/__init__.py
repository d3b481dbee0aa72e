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
from vitprune.names import CRITERIA, DECOMPOSE_METHODS, GATE_SITES, LAYERS, STAGES
from vitprune.params import Params, load_params
from vitprune.pruning import PrunePlan, plan_pruning, prune, pruned_architecture, zero_dropped
from vitprune.scoring import importance_scores
from vitprune.speed import measure_latency
from vitprune.training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "CRITERIA", "DECOMPOSE_METHODS", "DataBundle", "DataError", "DecomposeError", "FactorizedLinear", "GATE_SITES",
    "LAYERS", "MissingStageError", "ModelError", "Params", "ParamsError", "PruneError", "PrunePlan", "STAGES",
    "ScoringError", "StageFailed", "TrainConfig", "TrainingDiverged", "VitpruneError", "attach_gates", "build_model",
    "calibration_batches", "count_macs", "count_params", "decompose_model", "decomposition_report", "evaluate",
    "factorize", "fold_gates", "gate_parameters", "gate_statistics", "importance_scores", "l1_penalty", "load_data",
    "load_model", "load_params", "lu", "measure_latency", "model_summary", "orthogonality_loss", "plan_pruning",
    "prune", "pruned_architecture", "qr", "save_model", "test_batches", "train", "train_batches", "zero_dropped",
]
