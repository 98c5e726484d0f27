"""A generic training loop for every model family, with routing regularisers and routing logs.

A family plugs in with a small *trainer* object (duck-typed; :class:`FamilyTrainer` documents it)
registered with its family (mmoe_core.registry)::

    registry.register(Family("mmoe", ..., trainer=MMoETrainer))  # factory: TrainOptions -> FamilyTrainer
    result = train(get_trainer("mmoe")(options), options)

The FamilyTrainer protocol
--------------------------
Required:

* ``family: str`` -- the name written to config.json (``load_adapter`` dispatches on it).
* ``model_config() -> dict`` -- the ``model`` section of config.json (sizes, encoder spec, gate kind, E, k);
  the family's registered ``build_model(config)`` must rebuild the model from the whole config.
* ``build_model(config: dict) -> nn.Module``.
* ``train_batches(rng: np.random.Generator, epoch: int) -> Iterable[batch]`` -- one epoch of batches;
  a batch is any nest of dicts / lists / tuples of tensors (moved to the device by the loop) and
  plain values. Use ``rng`` for every random choice so that a seed reproduces a run.
* ``loss_parts(model, batch, recorder: RoutingRecorder) -> dict[str, Tensor]`` -- the task loss as named
  scalar parts (summed for the backward, logged one by one as ``loss.<name>``). Pass ``recorder`` down to
  every MoE layer: the loop reads routing from it (``keep_graph=True``) for the auxiliary losses
  and the routing indicators.

Optional:

* ``setup(model, device)`` -- called once after the model is on its device (tokenise, cache inputs).
* ``trainable_parameters(model, options) -> Iterable[(name, Parameter)]`` -- default: every parameter
  with ``requires_grad``; return a subset for e.g. expert-only training (backbone frozen).
* ``steps_per_epoch() -> int`` -- lets ``--epochs`` runs use a learning-rate schedule.
* ``data_config() -> dict`` -- the ``data`` section of config.json (e.g. the dataset root).
* ``on_epoch_end(model, epoch, step)``.

What the loop does: seeds (python, numpy, torch), device (CUDA when present unless told), AdamW
(no weight decay on biases / norms; router weights ``*.gate.w_gate.*`` at ``lr * router_lr_mult``),
optional warm-up + linear/cosine decay, gradient clipping, auxiliary routing losses from the recorder
(switch balance, router z-loss, MAGNET-style entropy two-stage; the step where the two-stage switches is
logged and stored), tqdm progress, a snapshot every ``snapshot_every`` steps, and finally
``config.json`` + ``model.safetensors`` + ``train_log.parquet``. Before any of it, the options are range-checked
and the model's size is estimated on the meta device (:func:`check_trainable`); everything is written into a
hidden folder beside the checkpoint and swapped in only once complete (:func:`mmoe_core.checkpoint.replacing_dir`),
so a failed or killed run leaves the previous checkpoint as it was.

train_log.parquet: one row per logging step with ``step``, ``epoch``, ``time_s``, ``lr``, ``loss`` (the
total), ``loss.<part>`` (task parts and aux parts: ``loss.balance``, ``loss.z_loss``, ``loss.entropy_stage``),
``two_stage_phase``, ``two_stage_trigger_step`` (None until it switches) and, for every routed layer,
``route.<layer>.<indicator>`` with indicators ``token_entropy`` (nats), ``token_entropy_norm`` (/ log E),
``effective_experts`` (exp of the entropy of the
mean router distribution), ``max_load`` (max_i f_i * E, f = share of top-k slots), ``balance_loss``
(E * sum f_i P_i) and ``max_weight_share`` (max_i of expert i's share of the combine weight, times E),
over the valid positions of that step's batch.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from mmoe_core.checkpoint import check_replaceable, replacing_dir, save_snapshot, write_checkpoint
from mmoe_core.errors import ConfigError
from mmoe_core.limits import Limit, check_choice, check_footprint, check_limits, meta_footprint
from mmoe_core.moe import EntropyTwoStage, aux_losses, token_entropy
from mmoe_core.routing_record import RoutingRecorder


@dataclass
class TrainOptions:
    """Every option of a training run; stored under ``training`` in config.json."""

    family: str = "mmoe"
    data_dir: str = ""
    out_dir: str = ""
    epochs: int = 1
    steps: int | None = None  # stop after this many steps (cycling epochs); overrides epochs
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    router_lr_mult: float = 1.0  # learning-rate multiplier of the router weights
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at the last step)
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    gate: str = "topk_softmax"
    experts: int = 4
    top_k: int = 3
    balance: float = 0.0  # weight of the switch balance loss
    z_loss: float = 0.0  # weight of the router z-loss
    two_stage: bool = False  # MAGNET-style entropy two-stage (coverage, then specialisation)
    two_stage_weight: float = 0.01
    trigger_entropy: float = 0.6  # switch when mean normalised token entropy falls below this ...
    trigger_step: int | None = None  # ... or at this step (0 = specialisation only)
    snapshot_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads for torch during training; 0 = torch's default
    dme: bool = False
    progress: bool = True
    family_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    epochs: int
    seconds: float
    final_loss: float
    trigger_step: int | None
    log: Any  # pandas.DataFrame


@runtime_checkable
class FamilyTrainer(Protocol):
    """The required part of the protocol (see the module docstring for the optional hooks)."""

    family: str

    def model_config(self) -> dict: ...

    def build_model(self, config: dict) -> nn.Module: ...

    def train_batches(self, rng: np.random.Generator, epoch: int) -> Iterable[Any]: ...

    def loss_parts(self, model: nn.Module, batch: Any, recorder: RoutingRecorder | None) -> dict[str, Tensor]: ...


def trainer_families() -> list[str]:
    """Families of the registry that can be trained here."""
    from mmoe_core import registry

    return [name for name in registry.families() if registry.get(name).trainer is not None]


def get_trainer(family: str) -> Callable[[TrainOptions], FamilyTrainer]:
    from mmoe_core import registry

    try:
        entry = registry.get(family)
    except KeyError as exc:
        raise ValueError(str(exc).strip("'\"")) from None
    if entry.trainer is None:
        raise ValueError(f"the {family!r} family cannot be trained here; trainable: {trainer_families()}")
    return entry.trainer


# ---------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a nest of dicts / lists / tuples to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def lr_factor(step: int, total: int | None, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or not total:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def is_router_parameter(name: str) -> bool:
    return ".gate.w_gate." in f".{name}"


def parameter_groups(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, router_lr_mult: float
) -> list[dict]:
    """AdamW groups: decay / no decay (1-D: biases, norms) x router / rest."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in named:
        groups.setdefault((p.ndim <= 1, is_router_parameter(name)), []).append(p)
    out = []
    for (no_decay, router), params in sorted(groups.items()):
        base = lr * (router_lr_mult if router else 1.0)
        out.append({"params": params, "lr": base, "base_lr": base, "weight_decay": 0.0 if no_decay else weight_decay})
    return out


def routing_indicators(probs: Tensor, topk_ids: Tensor, combine: Tensor, num_experts: int) -> dict[str, float]:
    """Indicators of one layer from its routed positions: probs/combine [T, E], topk_ids [T, k]."""
    probs, combine = probs.detach().float(), combine.detach().float()
    if probs.shape[0] == 0:
        return {}
    log_e = math.log(num_experts)
    entropy = float(token_entropy(probs).mean())
    importance = probs.mean(dim=0)
    load = torch.bincount(topk_ids.reshape(-1), minlength=num_experts).float() / max(topk_ids.numel(), 1)
    weight = combine.abs().sum(dim=0)
    weight_share = weight / weight.sum().clamp_min(1e-12)
    return {
        "token_entropy": entropy,
        "token_entropy_norm": entropy / log_e,
        "effective_experts": float(torch.exp(token_entropy(importance))),
        "max_load": float(load.max() * num_experts),
        "balance_loss": float(num_experts * (load * importance).sum()),
        "max_weight_share": float(weight_share.max() * num_experts),
    }


def layer_positions(recorder: RoutingRecorder) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per layer: (probs [T, E], topk_ids [T, k], combine [T, E]) over the valid positions of all its calls."""
    out: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for call in recorder.calls:
        r = call.router
        e, k = r.probs.shape[-1], r.topk_ids.shape[-1]
        probs, ids, comb = r.probs.detach().reshape(-1, e), r.topk_ids.reshape(-1, k), r.combine.detach().reshape(-1, e)
        valid = call.meta.valid if call.meta is not None else None
        if valid is not None and valid.numel() == probs.shape[0]:
            keep = valid.reshape(-1).to(probs.device)
            probs, ids, comb = probs[keep], ids[keep], comb[keep]
        out.setdefault(call.layer, []).append((probs, ids, comb))
    return {layer: tuple(torch.cat(parts) for parts in zip(*items)) for layer, items in out.items()}


def recorder_indicators(recorder: RoutingRecorder) -> dict[str, dict[str, float]]:
    return {layer: routing_indicators(p, i, c, p.shape[-1]) for layer, (p, i, c) in layer_positions(recorder).items()}


def mean_entropy_norm(recorder: RoutingRecorder) -> float:
    """Mean normalised token entropy over every valid routed position (the two-stage trigger signal)."""
    values = [
        token_entropy(p.detach().float()).mean() / math.log(p.shape[-1])
        for p, _, _ in layer_positions(recorder).values()
        if p.shape[0]
    ]
    return float(torch.stack(values).mean()) if values else 1.0


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _total_steps(trainer, options: TrainOptions) -> int | None:
    if options.steps:
        return int(options.steps)
    per_epoch = getattr(trainer, "steps_per_epoch", None)
    return options.epochs * int(per_epoch()) if callable(per_epoch) else None


def build_config(trainer, options: TrainOptions, extra: dict | None = None) -> dict:
    """config.json, one style for every family: {"family", "model", "data", "training"} (``code_version`` is
    added on save). ``extra`` (e.g. a demo recipe's fingerprint and description) joins the training section."""
    data_config = getattr(trainer, "data_config", None)
    return {
        "family": trainer.family,
        "model": trainer.model_config(),
        "data": data_config() if callable(data_config) else {},
        "training": {**options.to_dict(), **(extra or {})},
    }


OPTION_LIMITS: dict[str, Limit] = {
    "epochs": Limit(1, 1e6),
    "steps": Limit(1, 1e10, optional=True),
    "batch_size": Limit(1, 1e6),
    "lr": Limit(0.0, 10.0, float),
    "weight_decay": Limit(0.0, 10.0, float),
    "router_lr_mult": Limit(0.0, 1e4, float),
    "warmup_steps": Limit(0, 1e10),
    "grad_clip": Limit(0.0, 1e9, float),
    "experts": Limit(1, 1024),
    "top_k": Limit(1, 1024),
    "balance": Limit(0.0, 1e6, float),
    "z_loss": Limit(0.0, 1e6, float),
    "two_stage_weight": Limit(0.0, 1e6, float),
    "trigger_entropy": Limit(0.0, 1.0, float),
    "trigger_step": Limit(0, 1e10, optional=True),
    "snapshot_every": Limit(0, 1e10),
    "log_every": Limit(0, 1e10),
    "seed": Limit(0, 2**32 - 1),
    "threads": Limit(0, 4096),
}


def check_options(options: TrainOptions) -> None:
    """ConfigError for an option out of range or of the wrong type (before any data or model)."""
    values = options.to_dict()
    check_limits(values, OPTION_LIMITS, "training options")
    check_choice(values, "lr_schedule", ("constant", "linear", "cosine"), "training options")
    if options.top_k > options.experts:
        raise ConfigError(f"training options: top_k = {options.top_k} exceeds experts = {options.experts}")
    try:
        device = resolve_device(options.device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"training options: device {options.device!r} is not a device name ({exc}); use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"training options: device {options.device!r} asked for, but this machine has no CUDA "
            "device; use --device cpu or auto"
        )


def check_trainable(trainer, config: dict, device: torch.device) -> None:
    """The untrusted-config checks of :func:`mmoe_core.registry.check_config` (a registered family), or at
    least the model's footprint built on the meta device, against the memory training needs."""
    from mmoe_core import registry

    where = "the training options (model section)"
    if config["family"] in registry.families():
        registry.check_config(config, where, "train", device)
        return
    try:
        _, footprint = meta_footprint(lambda: trainer.build_model(config))
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{where}: the model cannot be built: {exc}") from exc
    check_footprint(footprint, where, "train", device)


def train(
    trainer, options: TrainOptions, out_dir: str | Path | None = None, extra_config: dict | None = None
) -> TrainResult:
    """Train ``trainer``'s model with ``options`` and write the checkpoint at ``out_dir``.

    The options and the model's size are checked first; the checkpoint is written beside ``out_dir`` and
    swapped in only once complete (:func:`mmoe_core.checkpoint.replacing_dir`): a run that fails or is
    killed leaves the previous checkpoint at ``out_dir`` as it was."""
    out_dir = Path(out_dir or options.out_dir)
    check_options(options)
    check_replaceable(out_dir)
    config = build_config(trainer, options, extra_config)
    device = resolve_device(options.device)
    check_trainable(trainer, config, device)
    threads_before = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        with replacing_dir(out_dir) as staged:
            result = _train(trainer, options, staged, config, device)
        return dataclasses.replace(result, out_dir=out_dir)
    finally:
        torch.set_num_threads(threads_before)


def _train(trainer, options: TrainOptions, out_dir: Path, config: dict, device: torch.device) -> TrainResult:
    import pandas as pd
    from tqdm import tqdm

    rng = seed_everything(options.seed)
    model = trainer.build_model(config).to(device)
    if callable(getattr(trainer, "setup", None)):
        trainer.setup(model, device)
    model.train()

    named = (
        trainer.trainable_parameters(model, options)
        if callable(getattr(trainer, "trainable_parameters", None))
        else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    )
    optimizer = torch.optim.AdamW(
        parameter_groups(list(named), options.lr, options.weight_decay, options.router_lr_mult), lr=options.lr
    )
    two_stage = EntropyTwoStage(options.trigger_entropy, options.trigger_step) if options.two_stage else None
    recorder = RoutingRecorder(keep_graph=True)
    total = _total_steps(trainer, options)
    config["training"]["device"] = str(device)

    rows: list[dict] = []
    step, epoch, started, loss_value = 0, 0, time.perf_counter(), float("nan")
    bar = tqdm(total=total, desc=f"train {trainer.family}", unit="step", disable=not options.progress, file=sys.stderr)
    done = False
    while not done:
        batches_this_epoch = 0
        for batch in trainer.train_batches(rng, epoch):
            batches_this_epoch += 1
            factor = lr_factor(step, total, options.lr_schedule, options.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            recorder.clear()
            parts = trainer.loss_parts(model, to_device(batch, device), recorder)
            if two_stage is not None:
                two_stage.update(step, mean_entropy_norm(recorder))
            parts.update(aux_losses(recorder, options.balance, options.z_loss, two_stage, options.two_stage_weight))
            loss = sum(parts.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], options.grad_clip
                )
            optimizer.step()
            loss_value = float(loss.detach())
            step += 1
            if step % max(1, options.log_every) == 0 or step == 1 or step == total:
                rows.append(_log_row(step, epoch, started, factor * options.lr, loss_value, parts, recorder, two_stage))
            if options.snapshot_every and step % options.snapshot_every == 0:
                save_snapshot(model, out_dir, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", epoch=epoch)
            if total is not None and step >= total:
                done = True
                break
        on_epoch_end = getattr(trainer, "on_epoch_end", None)
        if callable(on_epoch_end):
            on_epoch_end(model, epoch, step)
        epoch += 1
        if not options.steps and epoch >= options.epochs:
            done = True
        if not batches_this_epoch:
            raise RuntimeError(f"{trainer.family} trainer yielded no batch in epoch {epoch - 1}")
    bar.close()
    recorder.clear()
    seconds = time.perf_counter() - started
    trigger = two_stage.trigger_at if two_stage is not None else None
    config["training"].update(
        {
            "steps_done": step,
            "epochs_done": epoch,
            "train_seconds": round(seconds, 2),
            "two_stage_trigger_step": trigger,
        }
    )
    log = pd.DataFrame(rows)
    model.eval()
    write_checkpoint(model, config, out_dir, train_log=log)
    return TrainResult(out_dir, step, epoch, seconds, loss_value, trigger, log)


def _log_row(
    step: int,
    epoch: int,
    started: float,
    lr: float,
    loss: float,
    parts: dict[str, Tensor],
    recorder: RoutingRecorder,
    two_stage: EntropyTwoStage | None,
) -> dict:
    row: dict[str, Any] = {
        "step": step,
        "epoch": epoch,
        "time_s": round(time.perf_counter() - started, 3),
        "lr": lr,
        "loss": loss,
    }
    row.update({f"loss.{name}": float(value.detach()) for name, value in parts.items()})
    row["two_stage_phase"] = two_stage.phase if two_stage is not None else ""
    row["two_stage_trigger_step"] = two_stage.trigger_at if two_stage is not None else None
    for layer, indicators in recorder_indicators(recorder).items():
        row.update({f"route.{layer}.{name}": value for name, value in indicators.items()})
    return row
