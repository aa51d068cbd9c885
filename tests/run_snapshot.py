"""What two runs of one search are compared by (tests that resume, regroup or distribute a search)."""
import glob
import json
import os

import torch

# One intra-op thread (see the one_torch_thread fixture in conftest.py): subprocesses compared bit for bit
# must use the same thread count as each other.
ONE_THREAD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_dir_snapshot(out):
    """({arm: result.json without wall time}, {arm/file: final.pt or mask.pt}, {arm: metrics.jsonl text})."""
    rows, tensors, lines = {}, {}, {}
    for path in sorted(glob.glob(os.path.join(out, "levels", "*", "*", "result.json"))):
        with open(path) as f:
            r = json.load(f)
        r.pop("wall_time_s")
        key = os.path.relpath(os.path.dirname(path), out)
        rows[key] = r
        with open(os.path.join(os.path.dirname(path), "metrics.jsonl")) as f:
            lines[key] = f.read()
        for name in ("final.pt", "mask.pt"):
            tensors[f"{key}/{name}"] = load(os.path.join(os.path.dirname(path), name))
    return rows, tensors, lines
