"""The IMP driver: iterative magnitude pruning with rewinding, controls, trials, and a resumable run directory.

Per trial t (seed_t = config.seed + t) and level L = 0..config.levels:

- ticket: level 0 trains the dense (all-ones-mask) network from its init. With `rewind_iter` k > 0 the weights
  after k iterations of level 0 become the rewind point (Frankle et al. 2019, late rewinding); otherwise the
  init is. Level L >= 1 takes level L-1's trained ticket, prunes it (fastticket.prune) to get its mask, sets
  weights = rewind point * mask (`optim.rewind_`), builds a fresh optimizer and trains. Training at L >= 1
  continues the clock of the rewind point: iterations k..iterations-1 with the lr schedule and the batches of
  those iterations, so every level has the same end point and the same schedule tail as level 0.
- controls (L >= 1 only): "reinit" keeps the ticket's mask and draws a fresh init (seed_t + 10_000 + L),
  trained from iteration 0 to the end (a fresh init has no rewind point to continue from); "random" draws a
  random mask with the ticket's per-layer counts (`prune.random_masks_like`) and trains from the trial's
  rewind point * that mask, over the same iterations as the ticket.
- Pruning uses the ticket's *final* weights (not the early-stopping ones), as in the paper. If a trial's
  ticket diverges, its later levels are skipped (there are no trained weights to prune).

Run directory (all writes atomic: temp file in the same directory, fsync, os.replace):

    out_dir/config.json
    out_dir/levels/level_{L:02d}/{arm}_trial{t}/
        mask.pt         {layer name: bool mask}
        rewind.pt       (ticket arm) the rewind-point state dict
        metrics.jsonl   one line per evaluation: iteration, train_loss, val_loss, val_acc, test_acc
        checkpoint.pt   rolling (every eval_every iterations): model, optimizer, iteration, metrics so far
        final.pt        the final state dict (weights and masks)
        result.json     written last: the arm is finished

Resume skips arms whose result.json exists and continues an unfinished arm from its checkpoint. Batches are a
pure function of the iteration and the checkpoint holds the model, optimizer, iteration, train-loss
accumulator and metrics, so a resumed run gives bit-identical numbers to an uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastticket.config import SearchConfig
from fastticket.errors import ConfigError, MaskError, RunDirError
from fastticket.nn import density as model_density
from fastticket.nn import masked_modules, sparsify
from fastticket.prune import check_rate, get_criterion, layer_rates, parse_granularity, prune_with_config, \
    random_masks_like

if TYPE_CHECKING:  # data/models import torchvision-adjacent code; only the annotations need them here
    from fastticket.data import DatasetInfo, DeviceData

ARMS = ("ticket", "reinit", "random")
CONTROLS = ("reinit", "random")
OPTIMIZERS = ("adam", "adamw", "sgd")
EVAL_CHUNK = 1000  # evaluation batch: bounds activation memory for big models / big test sets
_REINIT_SEED_OFFSET = 10_000
_STREAM_PRUNE, _STREAM_RANDOM_MASK = 1, 2


# ---------------------------------------------------------------------------------------------- atomic files

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Write through `write(fileobj)` to a temp file beside `path`, fsync it, then rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _remove_stale_temps(directory: str) -> None:
    # A SIGKILL between open() and os.replace leaves a temp file; it never holds the only copy of anything.
    for tmp in glob.glob(os.path.join(directory, ".*.tmp")):
        try:
            os.remove(tmp)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------ validation

def _device_of(config: SearchConfig) -> torch.device:
    try:
        device = torch.device(config.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {config.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {config.device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {config.device!r}")
    return device


def validate_config(config: SearchConfig) -> None:
    """Raise ConfigError (one clear line) for any setting the search cannot run with."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(is_int(config.iterations) and config.iterations > 0,
         f"iterations must be a positive integer, got {config.iterations!r}")
    need(is_int(config.levels) and config.levels >= 0,
         f"levels must be an integer >= 0 (level 0 is the dense network), got {config.levels!r}")
    need(is_int(config.batch_size) and config.batch_size > 0,
         f"batch_size must be a positive integer, got {config.batch_size!r}")
    need(is_int(config.eval_every) and config.eval_every > 0,
         f"eval_every must be a positive integer, got {config.eval_every!r}")
    need(is_int(config.trials) and config.trials >= 1, f"trials must be an integer >= 1, got {config.trials!r}")
    need(is_int(config.val_size) and config.val_size > 0,
         f"val_size must be a positive integer, got {config.val_size!r}")
    need(is_int(config.seed), f"seed must be an integer, got {config.seed!r}")
    need(isinstance(config.lr, (int, float)) and config.lr > 0, f"lr must be a positive number, got {config.lr!r}")
    need(is_int(config.warmup_iters) and config.warmup_iters >= 0,
         f"warmup_iters must be an integer >= 0, got {config.warmup_iters!r}")
    need(all(is_int(m) and m >= 0 for m in config.lr_milestones),
         f"lr_milestones must be iterations (integers >= 0), got {config.lr_milestones!r}")
    # k = iterations would leave levels >= 1 nothing to train (and nothing to evaluate).
    need(is_int(config.rewind_iter) and 0 <= config.rewind_iter < config.iterations,
         f"rewind_iter must be an integer in [0, iterations={config.iterations}), got {config.rewind_iter!r}")
    need(config.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
    unknown = [c for c in config.controls if c not in CONTROLS]
    need(not unknown, f"unknown control(s) {unknown}; controls are a subset of {', '.join(CONTROLS)} (or none)")
    need(len(set(config.controls)) == len(config.controls), f"controls repeat an entry: {config.controls}")
    check_rate(config.rate, "rate")
    if config.conv_rate is not None:
        check_rate(config.conv_rate, "conv_rate")
    if config.output_rate is not None:
        check_rate(config.output_rate, "output_rate")
    need(config.scope in ("layerwise", "global"), f"scope must be 'layerwise' or 'global', got {config.scope!r}")
    parse_granularity(config.granularity)
    get_criterion(config.criterion)

    from fastticket.data import DATASETS
    need(config.dataset in DATASETS, f"unknown dataset {config.dataset!r}; known datasets are {', '.join(DATASETS)}")
    from fastticket import models
    if not config.model.startswith(models.TORCHVISION_PREFIX):
        known = [m for m in models.list_models() if not m.startswith(models.TORCHVISION_PREFIX)]
        need(config.model in known, f"unknown model {config.model!r}; known models are "
                                    f"{', '.join(models.list_models())}")
    _device_of(config)


def _config_dict(config: SearchConfig) -> Dict[str, Any]:
    # Through JSON so tuples/lists and ints/floats compare the way they will after a reload.
    return json.loads(config.to_json())


def prepare_run_dir(config: SearchConfig, out_dir: str, resume: bool, create: bool = True) -> None:
    """Create `out_dir` with config.json, or check that an existing run matches `config` (resume).

    create=False only checks (nothing is written), so a search that fails later (missing data) leaves no
    half-made run directory that a corrected command would then refuse.
    """
    config_path = os.path.join(out_dir, "config.json")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not resume:
            raise RunDirError(f"output directory {out_dir} is not empty; pass --resume to continue that run "
                              f"or choose another --out")
        if not os.path.exists(config_path):
            raise RunDirError(f"cannot resume {out_dir}: it has no config.json, so it is not a fastticket run "
                              f"directory; choose another --out")
        try:
            with open(config_path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as exc:
            raise RunDirError(f"cannot resume {out_dir}: config.json is unreadable ({exc})") from None
        current = _config_dict(config)
        differ = sorted(k for k in set(saved) | set(current) if saved.get(k, "<absent>") != current.get(k, "<absent>"))
        if differ:
            details = "; ".join(f"{k}: run has {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
                                for k in differ)
            raise RunDirError(f"cannot resume {out_dir}: the configuration differs from its config.json in "
                              f"{', '.join(differ)} ({details}); use the run's settings or choose another --out")
        return
    if create:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(config_path, config.to_json() + "\n")


# ------------------------------------------------------------------------------------------------- pieces

def arm_dir(out_dir: str, level: int, arm: str, trial: int) -> str:
    return os.path.join(out_dir, "levels", f"level_{level:02d}", f"{arm}_trial{trial}")


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_of(*parts))


def build_masked_model(config: SearchConfig, info: "DatasetInfo", seed: int, device: torch.device) -> nn.Module:
    """A freshly initialised model (init drawn from `seed`) with every Linear / Conv2d masked (all ones)."""
    from fastticket.models import build_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config.model, info)
    # Every layer is masked, excluded ones too: they simply keep an all-ones mask, so the optimizer and the
    # kernels treat all layers alike.
    sparsify(model)
    return model.to(device)


def make_optimizer(config: SearchConfig, model: nn.Module) -> torch.optim.Optimizer:
    from fastticket.optim import MaskedAdam, MaskedAdamW, MaskedSGD
    params = list(model.parameters())
    if config.optimizer == "sgd":
        return MaskedSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return MaskedAdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return MaskedAdam(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_at(config: SearchConfig, iteration: int) -> float:
    """The lr of the step taken at `iteration` (0-based): linear warmup, then x gamma at each milestone passed."""
    lr = config.lr
    if config.warmup_iters > 0:
        lr *= min(1.0, (iteration + 1) / config.warmup_iters)
    passed = sum(1 for m in config.lr_milestones if iteration >= m)
    return lr * (config.lr_gamma ** passed)


def _cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _load(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_mask_file(path: str, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Read mask.pt and check it fits `model` (same layers, same shapes), else a MaskError naming the file."""
    try:
        masks = _load(path)
    except Exception as exc:  # a truncated or foreign file can fail in many ways inside torch.load
        raise MaskError(f"cannot read mask file {path}: {type(exc).__name__}: {exc}".replace("\n", " ")) from None
    layers = dict(masked_modules(model))
    if not isinstance(masks, dict) or set(masks) != set(layers):
        got = sorted(masks) if isinstance(masks, dict) else type(masks).__name__
        raise MaskError(f"mask file {path} does not fit the model: it has layers {got}, the model has "
                        f"{sorted(layers)} (corrupted or from another run)")
    for name, layer in layers.items():
        m = masks[name]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(layer.weight.shape):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise MaskError(f"mask file {path}: layer {name!r} has a mask of shape {shape} but the model's "
                            f"weight has shape {tuple(layer.weight.shape)} (corrupted or from another run)")
    return {name: masks[name].bool() for name in layers}


def install_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
    for name, layer in masked_modules(model):
        layer.set_mask_(masks[name].to(layer.weight.device))


def rewind_to(model: nn.Module, source_state: Dict[str, torch.Tensor]) -> None:
    """weights = source * mask for masked weights (current masks), plain copies for everything else."""
    from fastticket.optim import rewind_
    masked = {f"{name}.weight": layer for name, layer in masked_modules(model)}
    params, sources, masks = [], [], []
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in state.items():
            if key.endswith("weight_mask") and key[: -len("_mask")] in masked:
                continue  # the masks are the ones already installed, not the rewind point's
            src = source_state[key].to(tensor.device)
            if key in masked:
                params.append(tensor)
                sources.append(src)
                masks.append(masked[key].weight_mask)
            else:
                tensor.copy_(src)
        rewind_(params, sources, masks)


def model_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: layer.weight_mask.detach().to("cpu", copy=True) for name, layer in masked_modules(model)}


def densities(model: nn.Module, prunable: Sequence[str]) -> Tuple[float, Dict[str, float]]:
    """(total density over the prunable layers, {layer: density} over all masked layers)."""
    d = model_density(model)
    per_layer = {name: float(v["density"]) for name, v in d["layers"].items()}
    alive = sum(d["layers"][n]["alive"] for n in prunable)
    size = sum(d["layers"][n]["size"] for n in prunable)
    return (alive / size if size else 1.0), per_layer


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy) over a whole split."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, x.shape[0], EVAL_CHUNK):
        out = model(x[i:i + EVAL_CHUNK])
        yy = y[i:i + EVAL_CHUNK]
        loss_sum += float(F.cross_entropy(out.float(), yy, reduction="sum"))
        correct += int((out.argmax(dim=1) == yy).sum())
    model.train(was_training)
    n = max(1, x.shape[0])
    return loss_sum / n, correct / n


def _summarise(metrics: List[Dict[str, float]]) -> Dict[str, Any]:
    if not metrics:
        return {"early_stop_iter": None, "early_stop_val_loss": None, "test_acc_at_early_stop": None}
    # First minimum of the validation loss; a NaN validation loss never counts as a minimum.
    best = min(range(len(metrics)),
               key=lambda i: (metrics[i]["val_loss"] if math.isfinite(metrics[i]["val_loss"]) else math.inf, i))
    return {"early_stop_iter": metrics[best]["iteration"], "early_stop_val_loss": metrics[best]["val_loss"],
            "test_acc_at_early_stop": metrics[best]["test_acc"]}


def _write_metrics(directory: str, metrics: List[Dict[str, float]]) -> None:
    atomic_write_text(os.path.join(directory, "metrics.jsonl"),
                      "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))


def _log(message: str) -> None:
    # tqdm.write keeps an active progress bar intact; without tqdm a plain print is the same thing.
    try:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------- training

@dataclasses.dataclass
class ArmSpec:
    level: int
    arm: str
    trial: int
    start_iter: int              # the first iteration this arm trains (k for rewound arms at L >= 1)
    capture_rewind_at: Optional[int] = None  # level 0 ticket with late rewinding: save the state at k


def train_arm(config: SearchConfig, spec: ArmSpec, model: nn.Module, data: "DeviceData", directory: str, seed: int,
              prunable: Sequence[str], progress: bool) -> Dict[str, Any]:
    """Train one arm from `model`'s current state (or its checkpoint), write its files, return result.json."""
    from tqdm import tqdm
    device = next(model.parameters()).device
    optimizer = make_optimizer(config, model)
    ckpt_path = os.path.join(directory, "checkpoint.pt")
    iteration = spec.start_iter
    metrics: List[Dict[str, float]] = []
    loss_sum, loss_count, wall = 0.0, 0, 0.0
    if os.path.exists(ckpt_path):
        try:
            ckpt = _load(ckpt_path)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise MaskError(f"checkpoint {ckpt_path} does not fit the model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); corrupted or from another "
                            f"run").replace("\n", " ") from None
        iteration, metrics = int(ckpt["iteration"]), list(ckpt["metrics"])
        loss_sum, loss_count, wall = float(ckpt["loss_sum"]), int(ckpt["loss_count"]), float(ckpt["wall_time_s"])
        torch.set_rng_state(ckpt["rng"])
        # metrics.jsonl may hold evaluations after the checkpoint (killed in between): the checkpoint wins.
        _write_metrics(directory, metrics)

    def checkpoint() -> None:
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
                     "metrics": metrics, "loss_sum": loss_sum, "loss_count": loss_count,
                     "wall_time_s": wall + (time.perf_counter() - t0), "rng": torch.get_rng_state()}, ckpt_path)

    def finish(status: str, message: Optional[str] = None) -> Dict[str, Any]:
        atomic_save(model.state_dict(), os.path.join(directory, "final.pt"))
        total, per_layer = densities(model, prunable)
        result = {"level": spec.level, "arm": spec.arm, "trial": spec.trial, "density": total,
                  "layer_density": per_layer, **_summarise(metrics),
                  "final_test_acc": metrics[-1]["test_acc"] if status == "ok" and metrics else None,
                  "final_iter": iteration, "wall_time_s": wall + (time.perf_counter() - t0), "status": status}
        if message:
            result["message"] = message
        atomic_write_json(os.path.join(directory, "result.json"), result)
        return result

    t0 = time.perf_counter()
    model.train()
    label = f"L{spec.level} {spec.arm} t{spec.trial}"
    bar = tqdm(total=config.iterations, initial=iteration, desc=label, leave=False, disable=not progress,
               dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    try:
        while iteration < config.iterations:
            lr = lr_at(config, iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data.batch(iteration, config.batch_size, seed)
            loss = F.cross_entropy(model(x), y)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                # Stop before a NaN/inf gradient reaches the weights: the saved state is the one that diverged.
                message = (f"level {spec.level} {spec.arm} trial {spec.trial}: loss became {loss_value} at "
                           f"iteration {iteration} (lr {lr:g}); arm stopped, state saved in {directory}")
                checkpoint()
                _write_metrics(directory, metrics)
                _log(f"fastticket: diverged: {message}")
                return finish("diverged", message)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            loss_sum += loss_value
            loss_count += 1
            bar.update(1)
            if iteration % 20 == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if spec.capture_rewind_at is not None and iteration == spec.capture_rewind_at:
                atomic_save(_cpu_state(model), os.path.join(directory, "rewind.pt"))
            if iteration % config.eval_every == 0 or iteration == config.iterations:
                val_loss, val_acc = evaluate(model, data.val.x, data.val.y)
                _, test_acc = evaluate(model, data.test.x, data.test.y)
                metrics.append({"iteration": iteration, "train_loss": loss_sum / max(1, loss_count),
                                "val_loss": val_loss, "val_acc": val_acc, "test_acc": test_acc})
                loss_sum, loss_count = 0.0, 0
                checkpoint()
                _write_metrics(directory, metrics)
                bar.set_postfix(loss=f"{loss_value:.4f}", val_acc=f"{val_acc:.4f}", refresh=False)
    finally:
        bar.close()
    _write_metrics(directory, metrics)
    return finish("ok")


# ------------------------------------------------------------------------------------------------ driver

def _read_result(directory: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(directory, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _print_summary(rows: List[Dict[str, Any]]) -> None:
    from fastticket.report import summary_table
    print(summary_table(rows))


def run_search(config: SearchConfig, out_dir: str, resume: bool = False, progress: bool = True) -> List[Dict[str, Any]]:
    """Run (or resume) a whole IMP search into `out_dir`; returns every arm's result.json, in run order."""
    from tqdm import tqdm
    from fastticket.data import load_dataset

    validate_config(config)
    device = _device_of(config)
    prepare_run_dir(config, out_dir, resume, create=False)
    data = load_dataset(config.dataset, config.data_dir, device, config.val_size, config.seed, augment=config.augment)
    prepare_run_dir(config, out_dir, resume)

    # The layer structure (names, which are prunable) comes from one throwaway build.
    probe = build_masked_model(config, data.info, config.seed, device)
    rates = layer_rates(probe, config.rate, scope=config.scope, conv_rate=config.conv_rate,
                        output_rate=config.output_rate, exclude=config.exclude)
    prunable = [n for n, r in rates.items() if r is not None]
    del probe

    k = config.rewind_iter
    arms_per_trial = 1 + config.levels * (1 + len(config.controls))
    outer = tqdm(total=arms_per_trial * config.trials, desc="arms", disable=not progress, dynamic_ncols=True,
                 file=sys.stderr)
    rows: List[Dict[str, Any]] = []
    stopped: Dict[int, int] = {}  # trial -> level whose ticket diverged
    try:
        for level in range(config.levels + 1):
            for trial in range(config.trials):
                seed_t = config.seed + trial
                if trial in stopped:
                    continue
                ticket_dir = arm_dir(out_dir, level, "ticket", trial)
                rewind_path = os.path.join(arm_dir(out_dir, 0, "ticket", trial), "rewind.pt")
                if level > 0:
                    prev = _read_result(arm_dir(out_dir, level - 1, "ticket", trial))
                    if prev is None or prev.get("status") != "ok" or not os.path.exists(rewind_path):
                        stopped[trial] = level - 1
                        _log(f"fastticket: trial {trial}: the level {level - 1} ticket did not finish cleanly; "
                             f"levels {level}..{config.levels} of this trial are skipped")
                        outer.update((config.levels - level + 1) * (1 + len(config.controls)))
                        continue

                # ---- ticket
                os.makedirs(ticket_dir, exist_ok=True)
                _remove_stale_temps(ticket_dir)
                result = _read_result(ticket_dir)
                ticket_masks: Optional[Dict[str, torch.Tensor]] = None
                if result is None:
                    outer.set_description(f"level {level}/{config.levels} ticket trial {trial}")
                    model = build_masked_model(config, data.info, seed_t, device)
                    mask_path = os.path.join(ticket_dir, "mask.pt")
                    if level == 0:
                        if not os.path.exists(mask_path):
                            atomic_save(model_masks(model), mask_path)
                        install_masks(model, load_mask_file(mask_path, model))
                        if k == 0 and not os.path.exists(rewind_path):
                            atomic_save(_cpu_state(model), rewind_path)
                        spec = ArmSpec(level, "ticket", trial, 0, capture_rewind_at=k if k > 0 else None)
                    else:
                        rewind_state = _load(rewind_path)
                        if not os.path.exists(mask_path):
                            ticket_masks = _prune_previous(config, out_dir, level, trial, seed_t, data.info,
                                                           device, rewind_state)
                            atomic_save(ticket_masks, mask_path)
                        ticket_masks = load_mask_file(mask_path, model)
                        install_masks(model, ticket_masks)
                        rewind_to(model, rewind_state)
                        if not os.path.exists(os.path.join(ticket_dir, "rewind.pt")):
                            atomic_save(rewind_state, os.path.join(ticket_dir, "rewind.pt"))
                        spec = ArmSpec(level, "ticket", trial, k)
                    result = train_arm(config, spec, model, data, ticket_dir, seed_t, prunable, progress)
                rows.append(result)
                outer.update(1)

                # ---- controls
                for control in (config.controls if level > 0 else []):
                    cdir = arm_dir(out_dir, level, control, trial)
                    os.makedirs(cdir, exist_ok=True)
                    _remove_stale_temps(cdir)
                    cresult = _read_result(cdir)
                    if cresult is None:
                        outer.set_description(f"level {level}/{config.levels} {control} trial {trial}")
                        cresult = _run_control(config, control, out_dir, level, trial, seed_t, data, device,
                                               prunable, progress)
                    rows.append(cresult)
                    outer.update(1)
    finally:
        outer.close()
    if progress:
        _print_summary(rows)
    return rows


def _prune_previous(config: SearchConfig, out_dir: str, level: int, trial: int, seed_t: int, info: "DatasetInfo",
                    device: torch.device, rewind_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The level-`level` ticket mask: prune the level-1 ticket's final weights."""
    prev_dir = arm_dir(out_dir, level - 1, "ticket", trial)
    model = build_masked_model(config, info, seed_t, device)
    install_masks(model, load_mask_file(os.path.join(prev_dir, "mask.pt"), model))
    try:
        model.load_state_dict(_load(os.path.join(prev_dir, "final.pt")))
    except RuntimeError as exc:
        raise MaskError(f"{os.path.join(prev_dir, 'final.pt')} does not fit the model "
                        f"({str(exc).splitlines()[0]}); corrupted or from another run") from None
    masks = prune_with_config(model, config, initial=rewind_state,
                              generator=_generator(seed_t, _STREAM_PRUNE, level))
    return {name: m.detach().to("cpu") for name, m in masks.items()}


def _run_control(config: SearchConfig, control: str, out_dir: str, level: int, trial: int, seed_t: int,
                 data: "DeviceData",
                 device: torch.device, prunable: Sequence[str], progress: bool) -> Dict[str, Any]:
    directory = arm_dir(out_dir, level, control, trial)
    ticket_mask_path = os.path.join(arm_dir(out_dir, level, "ticket", trial), "mask.pt")
    mask_path = os.path.join(directory, "mask.pt")
    if control == "reinit":
        # Same mask, a fresh init from a seed no ticket uses; trained from iteration 0.
        model = build_masked_model(config, data.info, seed_t + _REINIT_SEED_OFFSET + level, device)
        if not os.path.exists(mask_path):
            atomic_save(load_mask_file(ticket_mask_path, model), mask_path)
        install_masks(model, load_mask_file(mask_path, model))
        spec = ArmSpec(level, control, trial, 0)
    else:
        # Random mask with the ticket's per-layer counts, from the trial's rewind point.
        model = build_masked_model(config, data.info, seed_t, device)
        if not os.path.exists(mask_path):
            ticket_masks = load_mask_file(ticket_mask_path, model)
            masks = random_masks_like(ticket_masks, generator=_generator(seed_t, _STREAM_RANDOM_MASK, level),
                                      granularity=config.granularity)
            atomic_save({n: m.cpu() for n, m in masks.items()}, mask_path)
        install_masks(model, load_mask_file(mask_path, model))
        rewind_to(model, _load(os.path.join(arm_dir(out_dir, 0, "ticket", trial), "rewind.pt")))
        spec = ArmSpec(level, control, trial, config.rewind_iter)
    return train_arm(config, spec, model, data, directory, seed_t, prunable, progress)
