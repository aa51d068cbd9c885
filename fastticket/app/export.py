"""`fastticket export`: a level's trained ticket as a file a plain PyTorch user loads without fastticket.

The ticket is the ticket arm's final weights (levels/level_LL/ticket_trialT/final.pt, masks folded in by
fastticket.densify: pruned weights are stored zeros). Formats, each one torch.save'd dict:
- dense:  {"format": "dense", "model", "input_shape", "state_dict": plain nn.Linear/nn.Conv2d keys,
           "program": bytes of a TorchScript module (built-in and user models alike) -- torch.jit.load(
           io.BytesIO(d["program"])) runs it with torch alone}
- sparse: {"format": "sparse", "state_dict": every pruned layer's weight as a 2-D CSR tensor (int32 indices,
           only live weights stored) in the [out, in*kh*kw] view, other tensors dense, "shapes": their
           original shapes} -- d["state_dict"][k].to_dense().reshape(d["shapes"][k]) gives the weight back
- 2:4:    {"format": "2:4", "state_dict": fp16 weights, "semi_structured": the Linear weights that
           torch.sparse.to_sparse_semi_structured converted on this CUDA device (conv weights stay dense)} -- needs CUDA and a ticket
           whose pruned layers are 2:4 (--granularity nm:2:4 or --refill nm:2:4); the loader converts the
           named weights on its own GPU (semi-structured tensors are tied to the device, not pickled).
Every file also records "model", "level", "trial", "density" and "input_shape".
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from fastticket.errors import ConfigError, DamagedFileError

FORMATS = ("dense", "sparse", "2:4")
# The input shapes of the built-in datasets (fastticket.lottery.data), to rebuild and trace a model.
_INFOS = {"mnist5k": ((1, 28, 28), 10), "mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}


def _dataset_info(config) -> Any:
    from fastticket.lottery.data import DatasetInfo
    if config.dataset not in _INFOS:
        if ":" in config.model:  # a user's model function needs no dataset info
            return DatasetInfo(config.dataset, (0, 0, 0), 0)
        raise ConfigError(f"export rebuilds the built-in model {config.model!r} from the dataset's shape, but the "
                          f"run used the user dataset {config.dataset!r}; export from Python with the model built "
                          f"for it: fastticket.export(run_dir, level, model=...)")
    shape, classes = _INFOS[config.dataset]
    return DatasetInfo(config.dataset, shape, classes)


ModelArg = Union[nn.Module, Callable[[], nn.Module], None]


def _rebuilt(config, run_dir: str, model: ModelArg) -> nn.Module:
    """The run's model, masked and untrained: `model` as given (a copy of an nn.Module, or a zero-argument
    function's result: what `fastticket.search` was handed), else rebuilt from config.json's name."""
    from fastticket.lottery.sources import is_user
    from fastticket.lottery.train import build_masked_model
    from fastticket.sparse.nn import sparsify
    if model is not None:
        built = copy.deepcopy(model) if isinstance(model, nn.Module) else model() if callable(model) else None
        if not isinstance(built, nn.Module):
            raise ConfigError(f"model= must be an nn.Module or a function returning one, got {type(model).__name__}")
        return sparsify(built)
    try:
        return build_masked_model(config, _dataset_info(config), config.seed, torch.device("cpu"))
    except ConfigError as exc:
        if not is_user(config.model):
            raise
        raise ConfigError(f"{run_dir} searched the model {config.model}, which cannot be rebuilt here ({exc}); "
                          f"export from Python with the model you searched: fastticket.export(run_dir, level, "
                          f"model=...)") from None


def load_ticket(run_dir: str, level: int, trial: int = 0, model: ModelArg = None) -> Tuple[nn.Module, Any]:
    """The level's trained ticket as a masked model (CPU, float32 as trained) and the run's SearchConfig.
    `model`: the model the search was given (needed for runs of `fastticket.search` on an nn.Module object
    or a function that cannot be imported by name); its weights and masks are replaced by the ticket's."""
    from fastticket.lottery.arms import TICKET
    from fastticket.lottery.config import SearchConfig
    from fastticket.lottery.rundir import RunDir
    if not os.path.isdir(run_dir):
        raise ConfigError(f"no run directory {run_dir!r}: pass a directory written by `fastticket search`")
    raw = RunDir(run_dir, writes=False).read_config()
    if not raw:
        raise ConfigError(f"{run_dir!r} has no config.json: not a run directory of `fastticket search`")
    config = SearchConfig.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    if not isinstance(level, int) or not 0 <= level <= config.levels:
        raise ConfigError(f"no level {level!r} in {run_dir}: its levels are 0..{config.levels}")
    if not isinstance(trial, int) or not 0 <= trial < config.trials:
        raise ConfigError(f"no trial {trial!r} in {run_dir}: its trials are 0..{config.trials - 1}")
    arm = RunDir(run_dir, writes=False).arm(level, TICKET, trial)
    if not arm.has_final():
        raise ConfigError(f"level {level} (trial {trial}) of {run_dir} has not finished training (no final "
                          f"weights): resume the search with --resume, or export an earlier level")
    # final.pt overwrites every parameter and mask, so the init seed does not matter.
    ticket = _rebuilt(config, run_dir, model)
    try:
        arm.load_final_into(ticket)
    except DamagedFileError as exc:
        if model is None:
            raise
        raise ConfigError(f"the model given is not the one {run_dir} searched ({config.model}): {exc}") from None
    return ticket, config


def _input_shape(config) -> Optional[Tuple[int, ...]]:
    shape = _INFOS.get(config.dataset, (None,))[0]
    return tuple(shape) if shape else None


def _program(plain: nn.Module, input_shape: Optional[Tuple[int, ...]]) -> Optional[bytes]:
    """A TorchScript module of the plain model (scripted; traced on one example when scripting fails)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # newer torch deprecates TorchScript; it is still what loads without Python code
        warnings.simplefilter("ignore", FutureWarning)
        try:
            program = torch.jit.script(plain)
        except Exception:  # noqa: BLE001 (a model TorchScript cannot compile: trace it on its input shape)
            if input_shape is None:
                return None
            program = torch.jit.trace(plain, torch.zeros(1, *input_shape))
        torch.jit.save(program, buf)
    return buf.getvalue()


def _prunable_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """'layer.weight' -> mask of every masked layer that was pruned (a mask with a zero)."""
    from fastticket.sparse.nn import masked_modules
    return {f"{name}.weight": m.weight_mask.detach().bool().clone() for name, m in masked_modules(model)
            if not bool(m.weight_mask.all())}


def _csr32(m: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor as CSR with int32 indices (8 bytes per live weight in float32, not COO's 20)."""
    with warnings.catch_warnings():  # "CSR support is in beta" and "invariant checks disabled": known, and the
        warnings.simplefilter("ignore", UserWarning)  # indices come from to_sparse_csr itself, so they are valid
        csr = m.to_sparse_csr()
        return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                       csr.values(), m.shape)


def export_model(model: nn.Module, fmt: str, out: str, *, meta: Optional[Dict[str, Any]] = None,
                 input_shape: Optional[Tuple[int, ...]] = None) -> str:
    """Write a masked model (fastticket.sparsify'd) in format `fmt` to `out`; returns `out`."""
    import copy

    from fastticket.lottery.nm import is_nm
    from fastticket.sparse.nn import densify, density
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; formats are {', '.join(FORMATS)}")
    pruned = _prunable_weights(model)
    record: Dict[str, Any] = dict(meta or {}, format=fmt, input_shape=input_shape,
                                  density=float(density(model)["density"]))
    if fmt == "2:4":
        bad = [k for k, mask in pruned.items() if not is_nm(mask, (2, 4))]
        if not pruned or bad:
            what = f"{', '.join(bad)} not" if bad else "no layer is pruned, so none is"
            raise ConfigError(f"format 2:4 needs a ticket whose pruned layers are 2:4 (search with --granularity "
                              f"nm:2:4 or --refill nm:2:4); {what} 2:4: export dense or sparse")
        if not torch.cuda.is_available():
            raise ConfigError("format 2:4 builds torch's semi-structured sparse tensors, which need a CUDA GPU; "
                              "none is visible here: export dense or sparse, or run on a CUDA machine")
    plain = densify(copy.deepcopy(model)).eval()  # masks folded in: pruned weights are stored zeros
    state = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    if fmt == "dense":
        record.update(state_dict=state, program=_program(plain, input_shape))
    elif fmt == "sparse":
        record.update(state_dict={k: (_csr32(v.reshape(v.shape[0], -1)) if k in pruned else v)
                                  for k, v in state.items()},
                      shapes={k: tuple(v.shape) for k, v in state.items() if k in pruned})
    else:
        from torch.sparse import to_sparse_semi_structured
        half = {k: v.half() for k, v in state.items()}
        converted = []
        # Linear weights only: torch's semi-structured tensors serve matmuls (F.linear); a conv weight's
        # groups run along C_in per tap, which its NCHW flattening does not keep consecutive, so conv
        # weights stay dense fp16 (still 2:4 along C_in) in the file.
        for k in [k for k in pruned if half[k].dim() == 2]:
            w = half[k].cuda()
            try:
                sparse = to_sparse_semi_structured(w)
            except (RuntimeError, ValueError) as exc:  # shape or device limits of the semi-structured kernels
                raise ConfigError(f"torch cannot make {k} {tuple(w.shape)} semi-structured on this GPU: "
                                  f"{' '.join(str(exc).split())[:160]}") from None
            if not torch.equal(sparse.to_dense(), w):
                raise ConfigError(f"the semi-structured {k} does not reproduce its weights; export dense")
            converted.append(k)
        record.update(state_dict=half, semi_structured=converted)
    tmp = f"{out}.tmp"
    torch.save(record, tmp)
    os.replace(tmp, out)
    return out


def export(run_dir: str, level: int, format: str = "dense", out: Optional[str] = None, trial: int = 0,
           model: ModelArg = None) -> str:
    """Export the ticket of `level` (trial `trial`) of a run directory; returns the file written
    (default RUN_DIR/export/level_LL_<format>.pt). `model`: the nn.Module (or function) the search was given,
    for a run of `fastticket.search` whose model config.json cannot name (load_ticket)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; formats are {', '.join(FORMATS)}")
    model, config = load_ticket(run_dir, level, trial, model)
    if out is None:
        os.makedirs(os.path.join(run_dir, "export"), exist_ok=True)
        out = os.path.join(run_dir, "export", f"level_{level:02d}_{format.replace(':', 'of')}.pt")
    meta = {"model": config.model, "dataset": config.dataset, "level": level, "trial": trial}
    return export_model(model, format, out, meta=meta, input_shape=_input_shape(config))


def add_parser(sub) -> None:
    """The `export` subcommand's arguments (cli.py dispatches to `run_cli`)."""
    e = sub.add_parser("export", help="write a level's ticket as a plain PyTorch file (dense, sparse or 2:4)",
                       description="Write the trained ticket of one level as a file torch alone loads: dense "
                                   "(state dict + TorchScript program), sparse (CSR tensors of the live weights) "
                                   "or 2:4 (semi-structured, CUDA only).")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `fastticket search`")
    e.add_argument("--level", type=int, required=True, help="the IMP level whose ticket to export")
    e.add_argument("--format", default="dense", help=f"one of {', '.join(FORMATS)} (default dense)")
    e.add_argument("--trial", type=int, default=0, help="which trial's ticket (default 0)")
    e.add_argument("--out", metavar="FILE", help="file to write (default RUN_DIR/export/level_LL_FORMAT.pt)")


def run_cli(args) -> int:
    path = export(args.run_dir, args.level, args.format, args.out, args.trial)
    print(f"wrote {path}")
    return 0
