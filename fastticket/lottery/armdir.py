"""One arm's directory in a run directory (fastticket.lottery.rundir has the layout): the files it holds,
each written through checksums.json, each verified when read back.

checksums.json records per file (metrics.jsonl aside) its sha256, its size and the arm it belongs to; it is
updated before the file it describes, so a crash in between leaves a file that fails verification or no
file, never a wrong one that passes (a rolling checkpoint keeps its previous checksum accepted too). A file
read back must match its checksum and be filed under this very arm (a file copied in from another arm
fails); a checkpoint's masks must equal mask.pt. A file that fails raises DamagedFileError naming it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from fastticket.errors import DamagedFileError, MaskError, first_line
from fastticket.lottery.atomic_io import (atomic_write_bytes, atomic_write_json, atomic_write_text, remove_stale_temps,
                                          torch_bytes)
from fastticket.sparse.nn import check_mask_file

CHECKSUMS_FILE = "checksums.json"
MASK, REWIND, CHECKPOINT, FINAL, RESULT = "mask.pt", "rewind.pt", "checkpoint.pt", "final.pt", "result.json"
FINAL_MASK = "final_mask.pt"  # dynamic sparse training arms: the mask at the end (mask.pt is the one they started from)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArmDir:
    """One arm's directory: levels/level_LL/ARM_trialT. Writes go through checksums.json; reads verify."""

    def __init__(self, path: str, level: int, arm: str, trial: int, replica: int = 0, writes: bool = True) -> None:
        self.path, self.level, self.arm, self.trial, self.replica = path, level, arm, trial, replica
        # writes=False: a data-parallel rank other than 0 holds the same state as rank 0, which writes every
        # file; its own writes are skipped (fastticket.lottery.platform), its reads work as usual.
        self.writes = writes

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def identity(self) -> Dict[str, Any]:
        # "replica" only for the extra controls (r >= 1): the first keeps the identity it always had.
        extra = {"replica": self.replica} if self.replica else {}
        return {"level": self.level, "arm": self.arm, "trial": self.trial, **extra}

    def open(self) -> "ArmDir":
        """Create the directory (if needed) and drop what a killed writer left in it: temp files, and the
        rolling checkpoint of an arm that finished (killed between result.json and the checkpoint's removal;
        result.json is written after final.pt, so the checkpoint holds nothing resume needs)."""
        if not self.writes:
            return self
        os.makedirs(self.path, exist_ok=True)
        remove_stale_temps(self.path)
        if os.path.exists(self._file(RESULT)) and (self.has_checkpoint() or CHECKPOINT in self._checksums()):
            self.drop_checkpoint()
        return self

    # ---------------------------------------------------------------------------- checksums and verification
    def _checksums(self) -> Dict[str, Any]:
        path = self._file(CHECKSUMS_FILE)
        try:
            with open(path, "rb") as f:
                entries = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # every file it describes then fails verification, by name
        return entries if isinstance(entries, dict) else {}

    def _publish(self, name: str, data: bytes) -> None:
        """Record `data`'s checksum under this arm, then write it as `name` (both atomically)."""
        if not self.writes:
            return
        entries = self._checksums()
        old = entries.get(name) if isinstance(entries.get(name), dict) else None
        entry = {"sha256": _sha256(data), "bytes": len(data), **self.identity}
        if name == CHECKPOINT and old is not None and old.get("sha256"):
            # Crash between the two writes: the previous checkpoint is still the one on disk and still good.
            entry["previous_sha256"], entry["previous_bytes"] = old["sha256"], old.get("bytes")
        entries[name] = entry
        atomic_write_json(self._file(CHECKSUMS_FILE), entries)
        atomic_write_bytes(self._file(name), data)

    def _forget(self, name: str) -> None:
        if not self.writes:
            return
        entries = self._checksums()
        if name in entries:
            del entries[name]
            atomic_write_json(self._file(CHECKSUMS_FILE), entries)

    def verified_bytes(self, name: str) -> bytes:
        """The bytes of `name` after checking them against checksums.json and this arm's identity, or a
        DamagedFileError naming the file and what failed. The recorded size is compared before the body is
        read: a huge junk file is refused without reading it."""
        path = self._file(name)
        entry = self._checksums().get(name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise DamagedFileError(f"{path} failed verification: {os.path.join(self.path, CHECKSUMS_FILE)} has no "
                                   f"checksum for it (not written by fastticket here, or damaged)")
        owner = {k: entry.get(k) for k in self.identity}
        if owner != self.identity:
            raise DamagedFileError(f"{path} failed verification: it belongs to level {owner['level']} "
                                   f"{owner['arm']} trial {owner['trial']}, not to this arm (copied in from "
                                   f"another arm?)")
        try:
            size = os.path.getsize(path)
            sizes = {entry.get("bytes"), entry.get("previous_bytes")}
            if "previous_sha256" in entry and entry.get("previous_bytes") is None:
                sizes = {size}  # written before previous sizes were recorded: the checksum decides
            if isinstance(entry.get("bytes"), int) and size not in sizes:
                raise DamagedFileError(f"{path} failed verification: it holds {size} bytes, {entry['bytes']} "
                                       f"were written (damaged or replaced); not read")
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise DamagedFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        digest = _sha256(data)
        if digest != entry["sha256"] and digest != entry.get("previous_sha256"):
            raise DamagedFileError(f"{path} failed verification: its checksum does not match (damaged: "
                                   f"{len(data)} bytes, {entry.get('bytes')} written)")
        return data

    def _load_verified(self, name: str) -> Any:
        data = self.verified_bytes(name)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a file that passed its checksum but does not load
            raise DamagedFileError(f"cannot load {self._file(name)}: {first_line(exc)}") from None

    def discard(self, name: str) -> None:
        """Remove `name` and its checksum (a damaged file about to be recomputed, a finished arm's checkpoint)."""
        if not self.writes:
            return
        self._forget(name)
        try:
            os.remove(self._file(name))
        except FileNotFoundError:
            pass

    # masks
    def has_mask(self) -> bool:
        return os.path.exists(self._file(MASK))

    def save_mask(self, masks: Dict[str, torch.Tensor]) -> None:
        self._publish(MASK, torch_bytes(masks))

    def load_mask(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The saved mask, verified and checked against `model` (a MaskError names the file if it does not fit)."""
        return check_mask_file(self._load_verified(MASK), self._file(MASK), model)

    # rewind point
    def has_rewind(self) -> bool:
        return os.path.exists(self._file(REWIND))

    def save_rewind(self, state: Dict[str, torch.Tensor]) -> None:
        self._publish(REWIND, torch_bytes(state))

    def load_rewind(self) -> Dict[str, torch.Tensor]:
        return self._load_state_dict(REWIND)

    def _load_state_dict(self, name: str) -> Dict[str, torch.Tensor]:
        """A verified file that must hold a state dict (a DamagedFileError naming it otherwise)."""
        state = self._load_verified(name)
        if not isinstance(state, dict):
            raise DamagedFileError(f"{self._file(name)} holds a {type(state).__name__}, not a state dict")
        return state

    # metrics
    def write_metrics(self, metrics: List[Dict[str, float]]) -> None:
        if not self.writes:
            return
        atomic_write_text(self._file("metrics.jsonl"), "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))

    def read_metrics(self) -> List[Dict[str, Any]]:
        """The evaluations recorded so far; a torn last line (a killed writer) is skipped. A file that is not
        UTF-8 text raises DamagedFileError naming it."""
        entries: List[Dict[str, Any]] = []
        path = self._file("metrics.jsonl")
        if not os.path.exists(path):
            return entries
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DamagedFileError(f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    # checkpoint
    def has_checkpoint(self) -> bool:
        return os.path.exists(self._file(CHECKPOINT))

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        self._publish(CHECKPOINT, torch_bytes(state))

    def load_checkpoint(self, masks: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
        """The verified checkpoint. `masks` ({layer: mask}, e.g. from mask.pt): the checkpoint's model masks
        must equal them, else DamagedFileError (a checkpoint must not override the arm's mask)."""
        path = self._file(CHECKPOINT)
        ckpt = self._load_verified(CHECKPOINT)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise DamagedFileError(f"{path} is not a checkpoint (no model state)")
        for name, mask in (masks or {}).items():
            saved = ckpt["model"].get(f"{name}.weight_mask", ckpt["model"].get(f"{name}_mask"))  # nn.entry_name
            if not isinstance(saved, torch.Tensor) or not torch.equal(saved.cpu().bool(), mask.cpu().bool()):
                raise DamagedFileError(f"{path} failed verification: its mask of layer {name!r} differs from "
                                       f"{self._file(MASK)}")
        return ckpt

    def drop_checkpoint(self) -> None:
        """A finished arm needs no rolling checkpoint (final.pt and result.json hold what resume needs)."""
        self.discard(CHECKPOINT)

    def checkpoint_error(self, exc: BaseException) -> MaskError:
        """The error for a checkpoint that does not fit the model."""
        return DamagedFileError(f"checkpoint {self._file(CHECKPOINT)} does not fit the model ({first_line(exc)}); "
                                f"corrupted or from another run")

    # final weights
    def has_final(self) -> bool:
        return os.path.exists(self._file(FINAL))

    def save_final(self, state: Dict[str, torch.Tensor]) -> None:
        self._publish(FINAL, torch_bytes(state))

    def save_final_mask(self, masks: Dict[str, torch.Tensor]) -> None:
        self._publish(FINAL_MASK, torch_bytes(masks))

    def load_final_mask(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """A dynamic arm's final mask, verified and checked against `model`."""
        return check_mask_file(self._load_verified(FINAL_MASK), self._file(FINAL_MASK), model)

    def load_final(self) -> Dict[str, torch.Tensor]:
        return self._load_state_dict(FINAL)

    def load_final_into(self, model: nn.Module) -> None:
        path = self._file(FINAL)
        try:
            model.load_state_dict(self.load_final())
        except (RuntimeError, KeyError, ValueError) as exc:
            if isinstance(exc, DamagedFileError):
                raise
            raise DamagedFileError(f"{path} does not fit the model ({first_line(exc)}); corrupted or from "
                                   f"another run") from None

    # result
    def write_result(self, result: Dict[str, Any]) -> None:
        self._publish(RESULT, (json.dumps(result, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))

    def read_result(self, require_final: bool = True) -> Optional[Dict[str, Any]]:
        """result.json, verified with final.pt (a finished arm), or None while the arm is unfinished. A
        result.json or final.pt that fails verification raises DamagedFileError. require_final=False: the
        result alone (a report needs no weights)."""
        if not os.path.exists(self._file(RESULT)):
            return None
        data = self.verified_bytes(RESULT)
        try:
            result = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DamagedFileError(f"cannot read {self._file(RESULT)}: {first_line(exc)}") from None
        if not isinstance(result, dict) or {k: result.get(k) for k in self.identity} != self.identity:
            raise DamagedFileError(f"{self._file(RESULT)} failed verification: it is not this arm's result")
        if not require_final:
            return result
        if not self.has_final():
            raise DamagedFileError(f"{self._file(FINAL)} is missing although {self._file(RESULT)} exists")
        self.verified_bytes(FINAL)
        return result

    def discard_result(self) -> None:
        """Forget a finished arm whose files failed verification, so that it is trained again."""
        self.discard(RESULT)
        self.discard(FINAL)

