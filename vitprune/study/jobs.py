"""What every stage's per-seed job shares: the dataset (once per process), calibration batches, a model measured
on the test set, and the names of the files a job writes.

A job takes the parameter set of one seed (`train.seed` set, see `Stage.seed_params`) and that seed's folder
runs/<set>/seed<k>/, reads what earlier stages wrote there and writes its own files there, so no two seeds
share a model, a score, a calibration batch or a random draw. It returns a `SeedRecord`. Nothing is timed
here: jobs run side by side in worker processes, and latency is measured by stage 09 alone on the machine.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vitprune.data import DataBundle, calibration_batches, load_data, test_batches
from vitprune.layers import make_prunable
from vitprune.metrics import count_macs, count_params, evaluate
from vitprune.params import Params
from vitprune.study.records import Measured
from vitprune.study.stats import encode_answers

_BUNDLES: dict[str, DataBundle] = {}


def bundle_of(p: Params) -> DataBundle:
    """The dataset of a parameter set, loaded once per process."""
    key = f"{p.data!r}|{p.train.seed}"
    if key not in _BUNDLES:
        _BUNDLES.clear()
        _BUNDLES[key] = load_data(p.data, seed=p.train.seed)
    return _BUNDLES[key]


def calibration_of(p: Params) -> list:
    """This seed's fixed un-augmented training batches (Taylor scores, the data-aware SVDs, refit, allocation)."""
    return calibration_batches(bundle_of(p), p.data.calib_batches, p.data.batch_size, p.train.seed)


def input_shape(bundle: DataBundle) -> tuple[int, int, int, int]:
    return (1, bundle.in_chans, bundle.image_size, bundle.image_size)


def measured(model: nn.Module, p: Params) -> Measured:
    """Test accuracy with the per-image answers, params and MACs (latency is timed in one session, by stage 09).
    Every model is evaluated through vitprune's attention (`make_prunable`, in place: the same function), so dense
    and compressed models take the same kernels for the same shapes."""
    bundle = bundle_of(p)
    make_prunable(model)
    acc = evaluate(model, test_batches(bundle, p.data.eval_batch_size), answers=True)
    return Measured(top1=acc["top1"], top5=acc["top5"], params_M=count_params(model) / 1e6,
                    macs_M=count_macs(model, input_shape(bundle)) / 1e6,
                    answers=encode_answers(acc["answers"].tolist()))


def owned(seed_dir: str | Path, *names: str) -> list[str]:
    """The files `names` of a seed folder as the run folder's record lists them (seed<k>/<name>)."""
    return [f"{Path(seed_dir).name}/{name}" for name in names]


def trained_files(seed_dir: str | Path, name: str) -> list[str]:
    """The files `training.fit` writes for a run called `name`: the model, its resume checkpoint, its history."""
    return owned(seed_dir, f"{name}.safetensors", f"{name}.ckpt.safetensors", f"{name}.history.json")
