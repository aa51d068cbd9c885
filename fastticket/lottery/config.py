"""One dataclass holds every knob of a ticket search (OpenLTH's hparams idea, without its ceremony).

Presets are instances of it; CLI flags override fields (each field's `help` metadata is its flag's help);
`config.json` in a run directory is its `asdict`. A SearchConfig checks itself when it is built (also by
`replace` and `from_dict`): an invalid one raises ConfigError, so every consumer sees valid settings.
Settings that depend on the machine (is the requested GPU there?) are checked where the search starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple, get_args

from fastticket.errors import ConfigError
from fastticket.lottery.arms import CONTROLS, REINIT  # the arm registry: the ticket and its controls
from fastticket.lottery.criteria import Block, get_criterion
from fastticket.lottery.nm import parse_nm
from fastticket.sparse.backend import BACKENDS

# How a level >= 1 ticket starts (Renda et al. 2020): "weights" rewinds weights and lr schedule to iteration
# k; "lr" keeps the trained weights and rewinds only the lr schedule to k; "none" fine-tunes the trained
# weights at the final lr for the same iterations.
RewindMode = Literal["weights", "lr", "none"]
REWIND_MODES: Tuple[str, ...] = get_args(RewindMode)

# Typing aliases for the fields with a closed set of values; validate() checks membership.
Optimizer = Literal["adam", "adamw", "sgd"]
DistributedMode = Literal["trials", "data"]  # fastticket.lottery.platform
DistBackend = Literal["auto", "gloo", "nccl"]
Scope = Literal["layerwise", "global"]
CriterionName = Literal["magnitude", "movement", "random"]  # the built-ins; fastticket.lottery.prune can register more
OPTIMIZERS: Tuple[str, ...] = get_args(Optimizer)
# The fields that may name a user function, PKG.MODULE:FUNCTION (fastticket.lottery.sources, .recipe).
USER_FIELDS: Tuple[str, ...] = ("model", "dataset", "optimizer", "lr_scheduler", "loss")
SCOPES: Tuple[str, ...] = get_args(Scope)

MAX_SEED = 2**31 - 1
MAX_LEVELS = 1000


def check_rate(value: object, what: str = "rate") -> float:
    """`value` as a float in the open interval (0, 1), or a ConfigError naming `what`.
    The one rate check: the config, fastticket.lottery.prune and the CLI all use it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) < 1.0):
        raise ConfigError(f"{what} must be in (0, 1) (the fraction of surviving weights removed per level), "
                          f"got {value!r}")
    return float(value)


def parse_granularity(spec: str) -> Block:
    """"element" -> None; "block:RxC" -> (R, C) with R, C >= 1; anything else is a ConfigError.
    "nm:N:M" (fastticket.lottery.nm) prunes single weights too, so its unit is the element: None."""
    if spec == "element" or parse_nm(spec) is not None:
        return None
    match = re.fullmatch(r"block:(\d+)x(\d+)", str(spec).strip())
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ConfigError(f"granularity must be 'element', 'block:RxC' with positive R and C "
                          f"(e.g. block:16x16) or nm:N:M (e.g. nm:2:4), got {spec!r}")
    return int(match.group(1)), int(match.group(2))


def parse_refill(spec: Optional[str]) -> Block:
    """None -> None; "block:RxC" -> (R, C) (the tiles a refilled ticket keeps whole); else a ConfigError.
    "nm:N:M" is a valid refill too (fastticket.lottery.nm.parse_nm gives its N, M); it has no tiles: None."""
    if spec is None or parse_nm(spec) is not None:
        return None
    match = re.fullmatch(r"block:(\d+)x(\d+)", str(spec).strip())
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ConfigError(f"refill must be 'block:RxC' with positive R and C (e.g. block:16x16) or nm:N:M "
                          f"(e.g. nm:2:4), got {spec!r}")
    return int(match.group(1)), int(match.group(2))


def check_stability(value: object) -> Optional[int]:
    """None / 0 (off), or the number of interpolation points of --stability, an int >= 2; else a ConfigError."""
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"stability must be a number of interpolation points >= 2 (both endpoints; e.g. 30) or "
                          f"0 for off, got {value!r}")
    return value


def check_early_bird(value: object) -> Optional[float]:
    """None, or the early-bird eps as a float in the open interval (0, 1); else a ConfigError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) < 1.0):
        raise ConfigError(f"early_bird eps must be in (0, 1) (the fraction of mask entries allowed to change "
                          f"between evaluations), got {value!r}")
    return float(value)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _help(text: str, run_only: bool = False, **default: Any) -> Any:
    """A dataclass field documented by `text` (shown as its CLI flag's help where it has one). run_only: how
    the search runs, not what it computes (a resumed run may change it)."""
    return field(metadata={"help": text, "run_only": run_only}, **default)


def run_only_fields() -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(SearchConfig) if f.metadata.get("run_only"))


def field_defaults() -> dict:
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            for f in dataclasses.fields(SearchConfig)}


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SearchConfig:
    # what to train
    model: str = _help("model name (lenet300, conv2, conv4, conv6, vgg19, resnet20, torchvision:<name>) or "
                       "PKG.MODULE:FUNCTION returning a fresh nn.Module", default="lenet300")
    dataset: str = _help("mnist5k (embedded, offline), mnist, cifar10, or PKG.MODULE:FUNCTION returning "
                         "(train, val, test)", default="mnist5k")
    data_dir: Optional[str] = _help("where MNIST / CIFAR-10 live or are downloaded to", default=None)
    val_size: int = _help("validation images held out of the training split", default=500)

    # how to train one level
    iterations: int = _help("training iterations per level", default=2000)
    batch_size: int = _help("training batch size", default=60)
    optimizer: str = _help("adam, adamw or sgd; or PKG.MODULE:FUNCTION taking the parameters and returning any "
                           "torch.optim.Optimizer (fastticket.lottery.recipe)", default="adam")
    lr: float = _help("learning rate", default=1.2e-3)
    momentum: float = _help("SGD momentum (sgd only)", default=0.9)
    weight_decay: float = _help("weight decay", default=0.0)
    lr_milestones: Tuple[int, ...] = _help("iterations where lr *= lr_gamma", default=())
    lr_gamma: float = _help("lr factor at each milestone", default=0.1)
    warmup_iters: int = _help("linear lr warmup from 0 over this many iterations", default=0)
    lr_scheduler: Optional[str] = _help("PKG.MODULE:FUNCTION taking the optimizer and returning an LRScheduler, "
                                        "stepped once per iteration (replaces lr_milestones and warmup_iters)",
                                        default=None)
    loss: Optional[str] = _help("PKG.MODULE:FUNCTION (outputs, labels) -> mean loss (None: cross-entropy; "
                                "accuracy is reported for classification only)", default=None)
    augment: bool = _help("GPU-side random flip + crop (CIFAR)", default=False)
    eval_every: int = _help("evaluate (and checkpoint) every N iterations", default=100)

    # how to prune
    levels: int = _help("pruning levels after the dense level 0", default=10)
    scope: Scope = _help("layerwise (per-layer rates) or global (one threshold)", default="layerwise")
    rate: float = _help("fraction of surviving weights pruned per level, in (0, 1); conv/output rates scale "
                        "with it", default=0.2)
    conv_rate: Optional[float] = _help("layerwise rate of conv layers (None: same as rate)", default=None)
    output_rate: Optional[float] = _help("layerwise rate of the output layer (None: same as rate)", default=None)
    exclude: Tuple[str, ...] = _help("layer names or patterns never pruned (\"output\": the output layer)",
                                     default=())
    granularity: str = _help("element, block:RxC (prune whole RxC tiles), or nm:N:M (keep N of every M "
                             "consecutive inputs; nm = 2:4; one level prunes to exactly N:M)", default="element")
    criterion: CriterionName = _help("pruning criterion: magnitude, movement, random", default="magnitude")
    rewind_iter: int = _help("0: rewind to init; K: late rewinding to iteration K (with --rewind lr or none: "
                             "train iterations K..end)", default=0)
    rewind: RewindMode = _help("weights: rewind weights and lr schedule to K; lr: keep the trained weights, "
                               "rewind the lr schedule to K; none: fine-tune at the final lr", default="weights")
    refill: Optional[str] = _help("block:RxC: refill each element-wise ticket into whole RxC tiles of the same "
                                  "density; nm:N:M: into an exactly N:M mask (element granularity only)",
                                  default=None)
    early_bird: Optional[float] = _help("EPS in (0, 1): stop a ticket's training once its pruning mask changes "
                                        "by less than EPS between evaluations, several in a row", default=None)
    # dynamic sparse training controls (--controls rigl,set; fastticket.lottery.dst)
    dst_interval: int = _help("rigl/set controls: drop and regrow weights every N training steps", default=100)
    dst_drop_fraction: float = _help("rigl/set controls: fraction in (0, 1) of each layer's live weights moved "
                                     "at the first update (then decayed by a cosine)", default=0.3)
    dst_end: float = _help("rigl/set controls: fraction in (0, 1] of the iterations after which the mask stays "
                           "fixed", default=0.75)

    stability: Optional[int] = _help("N >= 2: instability analysis: each arm that trains gets a twin under "
                                     "another data order; the test error along the line between their final "
                                     "weights at N points (0 or absent: off)", default=None)

    # experiment design
    controls: Tuple[str, ...] = _help(f"comma list of {', '.join(CONTROLS)}; or none", default=(REINIT,))
    trials: int = _help("independent trials (seeds seed..seed+T-1)", default=1)
    reinits: int = _help("random-reinit controls per ticket, each with its own init seed and arm directory",
                         default=1)
    seed: int = _help("base seed: trial t uses S+t for init and batches", default=0)
    device: str = _help("auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N; config.json records "
                        "the device used", default="auto")
    # how the masked layers compute (recorded by the search: what the run used)
    backend: str = _help("auto (triton on CUDA when it imports, torch otherwise), torch or triton; the search "
                         "takes FASTTICKET_BACKEND's value for auto and config.json records it", default="auto")
    dense_thresholds: Dict[str, float] = _help("dispatch thresholds overridden by FASTTICKET_DENSE_THRESHOLD_<OP> "
                                               "({op: live fraction}); config.json records them",
                                               default_factory=dict)
    sources: Dict[str, str] = _help("hash of each user model / data function's source (set by the search; a "
                                    "resume with a changed function is refused)", default_factory=dict)
    # how to run (not what: results do not depend on it beyond float rounding, so resume ignores it)
    parallel_arms: int = _help("at most N arms of a level train together as one stacked model (0: all of "
                               "them; 1: one at a time)", default=0, run_only=True)
    compile: bool = _help("compile the training step with torch.compile (fullgraph; CUDA graphs on CUDA); arms "
                          "then train one at a time", default=False, run_only=True)
    cuda_graph: bool = _help("capture the stacked training step as a CUDA graph on CUDA devices (eager elsewhere, "
                             "or when capture is not possible; result.json says which)", default=False,
                             run_only=True)
    distributed: DistributedMode = _help("under torchrun: trials (spread a level's arms over the ranks, no "
                                         "gradient traffic; for small models) or data (every arm's batch split "
                                         "over the ranks, gradients averaged by DDP; for big models)",
                                         default="trials", run_only=True)
    dist_backend: DistBackend = _help("under torchrun: auto (nccl with GPUs, gloo on CPUs), nccl or gloo",
                                      default="auto", run_only=True)
    dist_timeout: float = _help("under torchrun: seconds a rank waits for a peer that stopped answering (died, "
                                "hangs) before every rank stops with one line; waits for a peer that is still "
                                "working are not limited", default=600.0, run_only=True)

    def __post_init__(self) -> None:
        # JSON (config.json) and callers give lists; the config holds tuples (hashable, not shared by copies).
        for name in ("lr_milestones", "exclude", "controls"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (one clear line) for any setting the search cannot run with."""
        self._validate_numbers()
        self._validate_choices()

    def _validate_numbers(self) -> None:
        """Counts, sizes, rates and the schedule: integers and finite numbers in their ranges."""
        need, is_int = _need, _is_int
        need(is_int(self.iterations) and self.iterations > 0,
             f"iterations must be a positive integer, got {self.iterations!r}")
        need(is_int(self.levels) and 0 <= self.levels <= MAX_LEVELS,
             f"levels must be an integer in [0, {MAX_LEVELS}] (level 0 is the dense network; {MAX_LEVELS} levels "
             f"at the smallest sensible rate already leave no weight), got {self.levels!r}")
        need(isinstance(self.device, str) and bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)),
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(is_int(self.batch_size) and self.batch_size > 0,
             f"batch_size must be a positive integer, got {self.batch_size!r}")
        need(is_int(self.eval_every) and self.eval_every > 0,
             f"eval_every must be a positive integer, got {self.eval_every!r}")
        need(is_int(self.trials) and self.trials >= 1, f"trials must be an integer >= 1, got {self.trials!r}")
        need(is_int(self.reinits) and self.reinits >= 1, f"reinits must be an integer >= 1, got {self.reinits!r}")
        need(is_int(self.parallel_arms) and self.parallel_arms >= 0,
             f"parallel_arms must be an integer >= 0 (0: all arms of a level at once), got {self.parallel_arms!r}")
        need(is_int(self.val_size) and self.val_size > 0,
             f"val_size must be a positive integer, got {self.val_size!r}")
        # Seeds feed 32-bit seed mixing (trial, level and control offsets added): larger ones would alias.
        need(is_int(self.seed) and 0 <= self.seed <= MAX_SEED, f"seed must be an integer in [0, {MAX_SEED}], "
                                                                f"got {self.seed!r}")
        need(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and math.isfinite(self.lr)
             and self.lr > 0, f"lr must be a finite positive number, got {self.lr!r}")
        need(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")
        need(isinstance(self.cuda_graph, bool), f"cuda_graph must be true or false, got {self.cuda_graph!r}")
        need(is_int(self.warmup_iters) and self.warmup_iters >= 0,
             f"warmup_iters must be an integer >= 0, got {self.warmup_iters!r}")
        need(isinstance(self.lr_milestones, tuple) and all(is_int(m) and m >= 0 for m in self.lr_milestones),
             f"lr_milestones must be iterations (integers >= 0), got {self.lr_milestones!r}")
        # k = iterations would leave levels >= 1 nothing to train (and nothing to evaluate).
        need(is_int(self.rewind_iter) and 0 <= self.rewind_iter < self.iterations,
             f"rewind_iter must be an integer in [0, iterations={self.iterations}), got {self.rewind_iter!r}")
        need(self.optimizer in OPTIMIZERS or ":" in str(self.optimizer),
             f"optimizer must be one of {', '.join(OPTIMIZERS)} or PKG.MODULE:FUNCTION, got {self.optimizer!r}")
        for name in ("lr_scheduler", "loss"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, str) and ":" in value),
                 f"{name} must be PKG.MODULE:FUNCTION (or a function, in Python), got {value!r}")
        need(self.lr_scheduler is None or (not self.lr_milestones and self.warmup_iters == 0),
             "lr_scheduler replaces lr_milestones and warmup_iters: drop those or the scheduler")
        need(not (self.compile and (":" in self.optimizer or self.lr_scheduler or self.loss)),
             "compile steps fastticket's own optimizers with cross-entropy: drop compile to train with your "
             "optimizer, lr_scheduler or loss function")
        need(isinstance(self.controls, tuple), f"controls must be a list of names, got {self.controls!r}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        need(not unknown, f"unknown control(s) {unknown}; controls are a subset of {', '.join(CONTROLS)} (or none)")
        need(len(set(self.controls)) == len(self.controls), f"controls repeat an entry: {list(self.controls)}")
        need(isinstance(self.exclude, tuple) and all(isinstance(e, str) for e in self.exclude),
             f"exclude must be a list of layer names or patterns, got {self.exclude!r}")
        check_rate(self.rate, "rate")
        need(is_int(self.dst_interval) and self.dst_interval > 0,
             f"dst_interval must be a positive integer (training steps between drop/regrow updates), "
             f"got {self.dst_interval!r}")
        need(_is_real(self.dst_drop_fraction) and 0.0 < self.dst_drop_fraction < 1.0,
             f"dst_drop_fraction must be in (0, 1) (the fraction of live weights moved at the first update), "
             f"got {self.dst_drop_fraction!r}")
        need(_is_real(self.dst_end) and 0.0 < self.dst_end <= 1.0,
             f"dst_end must be in (0, 1] (the fraction of the iterations with mask updates), got {self.dst_end!r}")
        if self.conv_rate is not None:
            check_rate(self.conv_rate, "conv_rate")
        if self.output_rate is not None:
            check_rate(self.output_rate, "output_rate")

    def _validate_choices(self) -> None:
        """Names from a fixed set or a registry, and settings that contradict each other."""
        need = _need
        need(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        need(isinstance(self.dense_thresholds, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in self.dense_thresholds.items()),
             f"dense_thresholds must map op names to numbers, got {self.dense_thresholds!r}")
        need(self.distributed in get_args(DistributedMode),
             f"distributed must be trials or data, got {self.distributed!r}")
        need(self.dist_backend in get_args(DistBackend),
             f"dist_backend must be auto, gloo or nccl, got {self.dist_backend!r}")
        need(isinstance(self.dist_timeout, (int, float)) and not isinstance(self.dist_timeout, bool)
             and math.isfinite(self.dist_timeout) and self.dist_timeout > 0,
             f"dist_timeout must be a finite positive number of seconds, got {self.dist_timeout!r}")
        need(self.scope in SCOPES, f"scope must be 'layerwise' or 'global', got {self.scope!r}")
        parse_granularity(self.granularity)
        need(self.rewind in REWIND_MODES,
             f"rewind must be one of {', '.join(REWIND_MODES)}, got {self.rewind!r}")
        parse_refill(self.refill)
        need(self.refill is None or self.granularity == "element",
             f"refill turns element-wise tickets into blocks: it needs granularity element, got "
             f"{self.granularity!r}")
        nm = parse_nm(self.granularity)
        # N:M is the target structure, reached in one level (fastticket.lottery.nm): the rates are not used (the
        # presets' rates are left alone), but one global threshold and a second level could not mean anything.
        need(nm is None or self.scope == "layerwise", f"granularity {self.granularity} prunes every layer to "
             f"exactly N:M, so scope global means nothing with it: use --scope layerwise")
        need(nm is None or self.levels == 1, f"granularity {self.granularity} reaches its N:M ticket in one "
             f"level (a second would find nothing to prune): set --levels 1, got {self.levels}")
        check_early_bird(self.early_bird)
        check_stability(self.stability)
        need(not self.stability or self.early_bird is None, "stability compares an arm with a twin trained to the "
             "same end, but early_bird stops the ticket early: drop --stability or --early-bird")
        # Settings that contradict each other: one would be silently ignored. (rewind none with rewind_iter k is
        # not one: the fine-tuning runs over iterations k..end, as lr rewinding does.)
        need(self.early_bird is None or self.rewind != "none", "early_bird draws a ticket early and rewinds it, "
             "but rewind is none: drop --early-bird or choose --rewind weights/lr")
        need(self.early_bird is None or self.levels >= 1, "early_bird stops training once the mask the next "
             "level prunes to has settled, but levels is 0 (no next level): drop --early-bird or set --levels >= 1")
        # The registries (criteria, datasets, models) live in the modules that fill them.
        get_criterion(self.criterion)
        from fastticket.lottery.data import DATASETS
        user_data = ":" in self.dataset  # a user's data (fastticket.lottery.sources)
        need(not (user_data and self.augment), "augment is CIFAR's flip + crop of the built-in datasets; put a "
             "user dataset's augmentation in its own data function")
        need(user_data or self.dataset in DATASETS,
             f"unknown dataset {self.dataset!r}; known datasets are {', '.join(DATASETS)}")
        from fastticket.lottery import models
        if ":" not in self.model:  # not torchvision:<name> nor a user's PKG.MODULE:FUNCTION
            known = [m for m in models.list_models() if not m.startswith(models.TORCHVISION_PREFIX)]
            need(self.model in known, f"unknown model {self.model!r}; known models are "
                                      f"{', '.join(models.list_models())}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "SearchConfig":
        return dataclasses.replace(self, **changes)
