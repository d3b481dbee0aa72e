"""One training loop for dense training, VTP sparse training (L1 on gates) and fine-tuning (+ distillation).

AdamW, warm-up + cosine, label smoothing, gradient clipping and accumulation, bf16 autocast on
GPU, per-epoch records, an atomic safetensors checkpoint every epoch and exact resume; runs
single-process or under torchrun (DDP: gloo on CPU, NCCL on GPU) with no change by the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from vitprune.checkpoint import PARAMS_KEY, clean_stray_temps, read_metadata, save_model, share_file, write_json
from vitprune.data import DataBundle, test_batches, train_batches
from vitprune.errors import ModelError, ParamsError, TrainingDiverged
from vitprune.gates import gate_statistics, is_gate, l1_penalty
from vitprune.metrics import evaluate
from vitprune.params import Params
from vitprune.progress import report
from vitprune.resume import resume_from, save_checkpoint, train_record, weights_digest


@dataclass
class TrainConfig:
    """Everything one training stage needs (built from a parameter set by `TrainConfig.from_params`)."""

    epochs: int = 10
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    accum_steps: int = 1
    amp: bool = True
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    max_steps: int | None = None
    progress: bool = True
    batch_size: int = 128
    eval_batch_size: int = 500
    l1: float = 0.0  # VTP sparsity weight on the gates
    gate_lr: float | None = None
    distill: float = 0.0
    distill_temperature: float = 2.0
    eval_every: int = 1  # test-set evaluation every k epochs (the last always); it never touches the weights

    @classmethod
    def from_params(cls, p: Params, stage: Literal["dense", "sparse", "finetune"] = "dense") -> TrainConfig:
        t = p.train
        cfg = cls(epochs=t.epochs, lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                  warmup_epochs=t.warmup_epochs, label_smoothing=t.label_smoothing, clip_grad=t.clip_grad,
                  accum_steps=t.accum_steps, amp=t.amp, seed=t.seed, device=t.device, threads=t.threads,
                  max_steps=t.max_steps, progress=t.progress, batch_size=p.data.batch_size,
                  eval_batch_size=p.data.eval_batch_size)
        if stage == "sparse":
            cfg = dataclasses.replace(cfg, epochs=p.sparse.epochs, lr=p.sparse.lr, l1=p.sparse.l1,
                                      gate_lr=p.sparse.gate_lr, warmup_epochs=min(t.warmup_epochs, 1.0))
        elif stage == "finetune":
            f = p.finetune
            cfg = dataclasses.replace(cfg, epochs=f.epochs, lr=f.lr, warmup_epochs=f.warmup_epochs,
                                      distill=f.distill, distill_temperature=f.distill_temperature)
        return cfg


# ---------------------------------------------------------------- process set-up

def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if world > 1:
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"train.device '{name}' asked for, but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- optimizer and schedule

def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: decayed weights; undecayed norms, biases, tokens; gates (no decay, own lr)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay, gates = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_gate(name):
            gates.append(p)
        elif p.ndim < 2 or name in skip or name.split(".")[-1] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr_scale": (cfg.gate_lr or cfg.lr) / cfg.lr})
    return [g for g in groups if g["params"]]


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr."""
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- the loop

def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is not None and cfg.distill > 0:
        t = cfg.distill_temperature
        kl = F.kl_div(F.log_softmax(logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                      reduction="batchmean", log_target=True) * t * t
        loss = (1 - cfg.distill) * loss + cfg.distill * kl
    return loss


@dataclass
class _Loop:
    """What every step of one training run needs."""

    model: nn.Module
    ddp: nn.Module
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    name: str
    ckpt: Path
    teacher: nn.Module | None
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def train(model: nn.Module, bundle: DataBundle, cfg: TrainConfig, run_dir: str | Path, name: str = "train",
          teacher: nn.Module | None = None, resume: bool = True,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          on_config_change: Literal["error", "restart"] = "error") -> list[dict[str, Any]]:
    """Train `model` in place; returns per-epoch records. Writes <name>.ckpt.safetensors each epoch.

    An existing checkpoint of the same configuration is resumed exactly (a finished one returns at
    once); every epoch reseeds from (seed, epoch), so an interrupted run ends where an
    uninterrupted one would. A checkpoint made with other settings raises, or with
    ``on_config_change="restart"`` is moved aside to <name>.ckpt.<digest>.safetensors (kept, with a
    warning) and training starts over.
    """
    rank, world, local_rank = distributed_context()
    steps = _steps_per_epoch(bundle, cfg)  # checked before anything is written
    device = resolve_device(cfg.device, local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the model was built and the data checked
    if rank == 0:
        clean_stray_temps(run_dir)
    ckpt = run_dir / f"{name}.ckpt.safetensors"
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    config = {**dataclasses.asdict(cfg), "initial_weights": weights_digest(model)}
    start_epoch, history = 0, []
    if resume and ckpt.is_file():
        start_epoch, history = resume_from(ckpt, model, opt, config, on_config_change, rank)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    loop = _Loop(model, ddp, opt, cfg, device, rank, world, name, ckpt, teacher, steps, steps * cfg.epochs,
                 round(steps * cfg.warmup_epochs))
    for epoch in range(start_epoch, cfg.epochs):
        report(f"{name} epoch {epoch + 1}/{cfg.epochs}")
        t0 = time.perf_counter()
        loss_sum, seen = _train_epoch(loop, bundle, epoch, history)
        record = _epoch_record(loop, bundle, epoch, loss_sum, seen, time.perf_counter() - t0)
        history.append(record)
        _checkpoint(loop, epoch, history, config)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return history


def _train_epoch(loop: _Loop, bundle: DataBundle, epoch: int, history: list[dict[str, Any]]) -> tuple[float, int]:
    """One pass over the training batches; returns (summed loss, samples seen) of this rank."""
    cfg, model = loop.cfg, loop.model
    seed_everything(cfg.seed * 1000 + epoch)
    model.train()
    loss_sum, seen, step = 0.0, 0, epoch * loop.steps_per_epoch
    batches = train_batches(bundle, cfg.batch_size // cfg.accum_steps, cfg.seed, epoch, loop.rank, loop.world)
    bar = tqdm(batches, total=loop.steps_per_epoch * cfg.accum_steps, desc=f"{loop.name} {epoch + 1}/{cfg.epochs}",
               leave=False, disable=not cfg.progress or loop.rank != 0)
    for micro, (x, y) in enumerate(bar):
        if micro // cfg.accum_steps >= loop.steps_per_epoch:
            break
        x, y = x.to(loop.device, non_blocking=True), y.to(loop.device, non_blocking=True)
        last_micro = (micro + 1) % cfg.accum_steps == 0
        loss = _backward(loop, x, y, last_micro, epoch, step, history)
        loss_sum += loss * len(y)
        seen += len(y)
        if last_micro:
            _optimizer_step(loop, step)
            step += 1
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    return loss_sum, seen


def _backward(loop: _Loop, x: torch.Tensor, y: torch.Tensor, last_micro: bool, epoch: int, step: int,
              history: list[dict[str, Any]]) -> float:
    """Forward and backward of one micro-batch (gradients synchronised only on its last); returns the loss."""
    cfg = loop.cfg
    amp = cfg.amp and loop.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        with torch.no_grad():
            t_logits = loop.teacher(x) if loop.teacher is not None and cfg.distill > 0 else None
        sync = loop.ddp.no_sync() if loop.world > 1 and not last_micro else contextlib.nullcontext()
        with sync:
            loss = _loss(loop.ddp(x), y, cfg, t_logits)
            if cfg.l1:
                loss = loss + l1_penalty(loop.model, cfg.l1)
            if not torch.isfinite(loss):
                raise TrainingDiverged(_divergence_message(loop, float(loss.item()), epoch, step, history))
            (loss / cfg.accum_steps).backward()
    return loss.item()


def _divergence_message(loop: _Loop, loss: float, epoch: int, step: int, history: list[dict[str, Any]]) -> str:
    where = f"{loop.name}: loss became {loss} at epoch {epoch + 1}, step {step}"
    hint = "Lower the learning rate (train.lr / sparse.lr / finetune.lr) or set train.clip_grad."
    if not loop.ckpt.is_file():
        return f"{where}; no checkpoint had been written yet, so nothing is kept. {hint}"
    kept = history[-1]["epoch"] if history else 0
    return f"{where}; the last good checkpoint '{loop.ckpt}' (epoch {kept}) is kept. {hint}"


def _optimizer_step(loop: _Loop, step: int) -> None:
    """Set this step's learning rate, clip, step and clear the gradients."""
    cfg = loop.cfg
    for group in loop.opt.param_groups:
        group["lr"] = lr_at(step, loop.total_steps, loop.warmup_steps, cfg) * group["lr_scale"]
    if cfg.clip_grad:
        nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.clip_grad)
    loop.opt.step()
    loop.opt.zero_grad(set_to_none=True)


def _epoch_record(loop: _Loop, bundle: DataBundle, epoch: int, loss_sum: float, seen: int,
                  seconds: float) -> dict[str, Any]:
    """The epoch's training loss, test accuracy (on evaluated epochs) and gate statistics."""
    record = {"epoch": epoch + 1, "train_loss": _global_mean(loss_sum, seen, loop.device),
              "lr": loop.opt.param_groups[0]["lr"], "epoch_time_s": seconds}
    if (epoch + 1) % loop.cfg.eval_every == 0 or epoch + 1 == loop.cfg.epochs:
        test = evaluate(loop.model, test_batches(bundle, loop.cfg.eval_batch_size, loop.rank, loop.world),
                        loop.device)
        record.update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"])
    return {**record, **gate_statistics(loop.model)}


def _checkpoint(loop: _Loop, epoch: int, history: list[dict[str, Any]], config: dict[str, Any]) -> None:
    """Write the epoch's checkpoint on rank 0 (without optimizer state once finished); all ranks wait."""
    if loop.rank == 0:
        finished = epoch + 1 == loop.cfg.epochs
        save_checkpoint(loop.ckpt, loop.model, None if finished else loop.opt,
                        {"epoch": epoch + 1, "history": history, "config": config})
    if loop.world > 1:
        dist.barrier()


def _steps_per_epoch(bundle: DataBundle, cfg: TrainConfig) -> int:
    """Optimiser steps per epoch: full batches only, so a batch larger than the training set is refused."""
    if cfg.batch_size > bundle.num_train():
        raise ParamsError(f"data.batch_size ({cfg.batch_size}) is larger than the training set ({bundle.num_train():,} "
                          f"{bundle.name} images): no full batch, so no optimiser step would run; accepted: at most "
                          f"{bundle.num_train()}")
    steps = bundle.num_train() // cfg.batch_size
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def _global_mean(total: float, count: int, device: torch.device) -> float:
    t = torch.tensor([total, count], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def write_history(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Per-epoch records as JSON (atomically)."""
    return write_json(Path(path), history)


def fit(p: Params, stage: Literal["dense", "sparse", "finetune"], model: nn.Module, bundle: DataBundle,
        run_dir: str | Path, name: str, teacher: nn.Module | None = None, curve: bool = True) -> list[dict[str, Any]]:
    """Train one pipeline stage and write <name>.safetensors and <name>.history.json beside its checkpoint;
    with curve=False the test set is evaluated after the last epoch only (the weights are the same).

    Raises TrainingDiverged (after writing both, for inspection) when a full run ends no better than chance.
    """
    cfg = TrainConfig.from_params(p, stage)
    if not curve:
        cfg = dataclasses.replace(cfg, eval_every=max(1, cfg.epochs))
    model.vitprune_params = {"name": p.name, "file": p.source, "data": p.data.name}
    history = train(model, bundle, cfg, run_dir, name, teacher=teacher, on_config_change="restart")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        _publish_model(model, Path(run_dir), name)
        write_history(history, Path(run_dir) / f"{name}.history.json")
    if history and cfg.max_steps is None and bundle.name != "synthetic":
        check_learned(history[-1], bundle, Path(run_dir) / f"{name}.safetensors")
    return history


def _publish_model(model: nn.Module, run_dir: Path, name: str) -> None:
    """Write <name>.safetensors. A finished checkpoint of this model already is that file (the same weights,
    spec and parameter record, plus the training record, without optimizer state): then it is shared with
    <name>.ckpt.safetensors, which stays for resume, so the weights take disk space once, not twice."""
    ckpt, final = run_dir / f"{name}.ckpt.safetensors", run_dir / f"{name}.safetensors"
    if ckpt.is_file() and _is_finished_checkpoint_of(read_metadata(ckpt), model):
        share_file(ckpt, final)
    else:
        save_model(model, final)


def _is_finished_checkpoint_of(meta: dict[str, str], model: nn.Module) -> bool:
    try:
        record = train_record(meta, Path("checkpoint"))
    except ModelError:
        return False  # a damaged record: the model is written afresh
    return record["param_groups"] is None and meta.get(PARAMS_KEY) == json.dumps(model.vitprune_params)


def check_learned(record: dict[str, Any], bundle: DataBundle, path: Path) -> None:
    """Refuse a run that collapsed to chance without a NaN: test top-1 near 1/C and test loss >= ln C."""
    classes = bundle.num_classes
    if bundle.num_test() < 5 * classes:
        return  # too few test images to tell chance from learning
    chance = 100.0 / classes
    if record["test_top1"] <= 1.5 * chance and record["test_loss"] >= math.log(classes):
        raise TrainingDiverged(
            f"{path.name}: training collapsed to chance without a NaN: test top-1 {record['test_top1']:.1f} % "
            f"(chance {chance:.1f} %), test loss {record['test_loss']:.3g} >= ln {classes}; the model is kept at "
            f"'{path}' for inspection. Lower the learning rate or set train.clip_grad.")
