"""Every error vitprune raises on purpose: one base, one class per kind of culprit.

A `VitpruneError` always names the key, file or value at fault and what would be accepted; the
CLI prints it as one line and exits with its `exit_code` (2 for bad input, 1 for a run that failed).
"""

from __future__ import annotations


class VitpruneError(Exception):
    """Base of every error vitprune raises on purpose."""

    exit_code = 2


class ParamsError(VitpruneError, ValueError):
    """A parameter file, key or value that cannot be used; the message names it."""


class DataError(VitpruneError, ValueError):
    """A dataset that is missing or malformed; the message names the path and the expected layout."""


class ModelError(VitpruneError, ValueError):
    """A model file or architecture that cannot be used; the message names it."""


class PruneError(VitpruneError, ValueError):
    """A pruning request or plan that cannot be applied; the message names the culprit."""


class ScoringError(VitpruneError, ValueError):
    """A scoring request that cannot be served; the message names what is missing."""


class DecomposeError(VitpruneError, ValueError):
    """Bad input to a decomposition; the message names the value and what is accepted."""


class MissingStageError(VitpruneError, RuntimeError):
    """An earlier stage's output is absent; the message names the notebook to run first."""


class UnknownModel(VitpruneError, KeyError):
    """A stage record asked for a model it does not have; the message names the model and what the stage has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TrainingDiverged(VitpruneError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint (if any) is kept."""

    exit_code = 1


class StageFailed(VitpruneError, RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""

    exit_code = 1


class FigureOwnerError(VitpruneError, RuntimeError):
    """Two notebooks write the same figure or table file; each file has exactly one author."""


class RunLocked(VitpruneError, RuntimeError):
    """Another `vitprune reproduce` holds the parameter set's run folder; the message names it."""

    exit_code = 1
