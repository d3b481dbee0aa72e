"""One training loop for dense training, VTP sparse training (L1 on gates) and fine-tuning (+ distillation).

AdamW, warm-up + cosine, label smoothing, gradient clipping and accumulation, bf16 autocast on
GPU, per-epoch records, an atomic safetensors checkpoint every epoch and exact resume; runs
single-process or under torchrun (DDP: gloo on CPU, NCCL on GPU) with no change by the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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

from vitprune.data import DataBundle, test_batches, train_batches
from vitprune.gates import gate_statistics, is_gate, l1_penalty
from vitprune.metrics import evaluate
from vitprune.models import OPTIM_PREFIX, ModelError, atomic_write, read_checkpoint, save_model
from vitprune.params import Params

# keys that may change between an interrupted run and its resumption (epochs may not: the schedule depends on it)
RESUMABLE_CHANGES = {"progress", "threads"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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


# ---------------------------------------------------------------- checkpoints

def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = opt.state_dict()
    tensors = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{OPTIM_PREFIX}{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def _restore_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            idx, name = key[len(OPTIM_PREFIX):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None, info: dict[str, Any]) -> None:
    """One atomic safetensors file: model weights + spec, optimizer tensors, training state as JSON.

    A finished run (opt=None) keeps no optimizer state: nothing is left to resume, and it is 3x smaller.
    """
    tensors, groups = _optim_tensors(opt) if opt is not None else ({}, None)
    save_model(model, path, extra_tensors=tensors,
               metadata={"vitprune_train": json.dumps({**info, "param_groups": groups})})


def weights_digest(model: nn.Module) -> str:
    """Fingerprint of a model's weights: a checkpoint resumes only the run that started from them."""
    h = hashlib.sha1()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))


# ---------------------------------------------------------------- the loop

def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is not None and cfg.distill > 0:
        t = cfg.distill_temperature
        kl = F.kl_div(F.log_softmax(logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                      reduction="batchmean", log_target=True) * t * t
        loss = (1 - cfg.distill) * loss + cfg.distill * kl
    return loss


def train(model: nn.Module, bundle: DataBundle, cfg: TrainConfig, run_dir: str | Path, name: str = "train",
          teacher: nn.Module | None = None, resume: bool = True,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          on_config_change: Literal["error", "restart"] = "error") -> list[dict[str, Any]]:
    """Train `model` in place; returns per-epoch records. Writes <name>.ckpt.safetensors each epoch.

    An existing checkpoint of the same configuration is resumed exactly (a finished one returns at
    once); every epoch reseeds from (seed, epoch), so an interrupted run ends where an
    uninterrupted one would. A checkpoint made with other settings raises, or with
    ``on_config_change="restart"`` is moved aside to <name>.ckpt.<digest>.safetensors (kept) and
    training starts over.
    """
    rank, world, local_rank = distributed_context()
    device = resolve_device(cfg.device, local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    ckpt = run_dir / f"{name}.ckpt.safetensors"
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    config = {**dataclasses.asdict(cfg), "initial_weights": weights_digest(model)}
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and ckpt.is_file():
        tensors, meta = read_checkpoint(ckpt)
        info = json.loads(meta.get("vitprune_train", "{}"))
        changed = _config_changes(info.get("config", {}), config)
        if changed and on_config_change == "error":
            raise ModelError(f"checkpoint '{ckpt}' was made with different settings ({', '.join(changed)}); "
                             "use another run name or delete it to start over")
        if changed:
            digest = hashlib.sha1(json.dumps(info.get("config", {}), sort_keys=True).encode()).hexdigest()[:8]
            if rank == 0:
                os.replace(ckpt, ckpt.with_name(f"{name}.ckpt.{digest}.safetensors"))
        else:
            model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)})
            if info["param_groups"] is not None:
                _restore_optim(opt, tensors, info["param_groups"])
            start_epoch, history = info["epoch"], info["history"]
    steps_per_epoch = _steps_per_epoch(bundle, cfg)
    total, warmup = steps_per_epoch * cfg.epochs, round(steps_per_epoch * cfg.warmup_epochs)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    amp = cfg.amp and device.type == "cuda"
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(cfg.seed * 1000 + epoch)
        model.train()
        t0, loss_sum, seen, step = time.perf_counter(), 0.0, 0, epoch * steps_per_epoch
        batches = train_batches(bundle, cfg.batch_size // cfg.accum_steps, cfg.seed, epoch, rank, world)
        bar = tqdm(batches, total=steps_per_epoch * cfg.accum_steps, desc=f"{name} {epoch + 1}/{cfg.epochs}",
                   leave=False, disable=not cfg.progress or rank != 0)
        for micro, (x, y) in enumerate(bar):
            if micro // cfg.accum_steps >= steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last_micro = (micro + 1) % cfg.accum_steps == 0
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                with torch.no_grad():
                    t_logits = teacher(x) if teacher is not None and cfg.distill > 0 else None
                sync = ddp.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
                with sync:
                    loss = _loss(ddp(x), y, cfg, t_logits)
                    if cfg.l1:
                        loss = loss + l1_penalty(model, cfg.l1)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"{name}: loss became {loss.item()} at epoch {epoch + 1}, step {step}; the last good "
                            f"checkpoint '{ckpt}' (epoch {start_epoch if not history else history[-1]['epoch']}) "
                            "is kept. Lower the learning rate or set train.clip_grad.")
                    (loss / cfg.accum_steps).backward()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            if last_micro:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, warmup, cfg) * group["lr_scale"]
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        test = evaluate(model, test_batches(bundle, cfg.eval_batch_size, rank, world), device)
        record = {"epoch": epoch + 1, "train_loss": _global_mean(loss_sum, seen, device),
                  "lr": opt.param_groups[0]["lr"], "test_top1": test["top1"], "test_top5": test["top5"],
                  "test_loss": test["loss"], "epoch_time_s": time.perf_counter() - t0, **gate_statistics(model)}
        history.append(record)
        if rank == 0:
            finished = epoch + 1 == cfg.epochs
            save_checkpoint(ckpt, model, None if finished else opt,
                            {"epoch": epoch + 1, "history": history, "config": config})
        if world > 1:
            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(record)
    return history


def _steps_per_epoch(bundle: DataBundle, cfg: TrainConfig) -> int:
    steps = max(1, bundle.num_train() // cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def _global_mean(total: float, count: int, device: torch.device) -> float:
    t = torch.tensor([total, count], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def write_history(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Per-epoch records as JSON (atomically)."""
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(history, indent=1)))
    return path


def fit(p: Params, stage: Literal["dense", "sparse", "finetune"], model: nn.Module, bundle: DataBundle,
        run_dir: str | Path, name: str, teacher: nn.Module | None = None) -> list[dict[str, Any]]:
    """Train one pipeline stage and write <name>.safetensors and <name>.history.json beside its checkpoint."""
    history = train(model, bundle, TrainConfig.from_params(p, stage), run_dir, name, teacher=teacher,
                    on_config_change="restart")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        save_model(model, Path(run_dir) / f"{name}.safetensors")
        write_history(history, Path(run_dir) / f"{name}.history.json")
    return history
