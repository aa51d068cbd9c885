"""`fastticket export` (fastticket.app.export) and a tiny N:M search: the files load with torch alone and
reproduce the masked ticket's outputs exactly in float64."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastticket
from fastticket.app.cli import main
from fastticket.app.export import export_model, load_ticket
from fastticket.errors import ConfigError
from fastticket.lottery.nm import is_nm
from fastticket.lottery.presets import get_preset
from fastticket.lottery.search import run_search
from fastticket.sparse.nn import masked_modules, sparsify

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Loads a file with torch alone: fastticket is made unimportable (a None entry in sys.modules makes `import`
# raise), and the working directory is not the repository.
LOADER = r"""
import sys, io
sys.modules["fastticket"] = None
import torch
dense_path, sparse_path, x_path = sys.argv[1:4]
x = torch.load(x_path)
d = torch.load(dense_path, weights_only=False)
model = torch.jit.load(io.BytesIO(d["program"])).double()
s = torch.load(sparse_path, weights_only=True)
sd = {k: (v.to_dense().reshape(s["shapes"][k]) if v.layout == torch.sparse_csr else v)
      for k, v in s["state_dict"].items()}
torch.save({"dense_out": model(x), "sparse_state": sd}, x_path + ".out")
"""


@pytest.fixture(scope="module")
def nm_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("nm") / "run")
    config = get_preset("lenet-mnist5k").replace(iterations=8, eval_every=4, levels=1, controls=("random",),
                                                 val_size=500, granularity="nm:2:4")
    run_search(config, run)
    return run


def torch_alone(dense, sparse, x, tmp_path):
    x_path = str(tmp_path / "x.pt")
    torch.save(x, x_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", LOADER, dense, sparse, x_path], check=True, cwd=str(tmp_path), env=env,
                   timeout=120)
    return torch.load(x_path + ".out")


def test_nm_search_tickets_are_exactly_2_4_and_the_random_control_too(nm_run):
    from fastticket.lottery.rundir import RunDir
    for arm in ("ticket", "random"):
        ad = RunDir(nm_run, writes=False).arm(1, arm, 0)
        masks = torch.load(os.path.join(ad.path, "mask.pt"), weights_only=True)
        pruned = [k for k, m in masks.items() if not bool(m.all())]
        assert pruned, arm
        for k in pruned:
            assert is_nm(masks[k], (2, 4), exact=True), (arm, k)
    model, _ = load_ticket(nm_run, 1)
    for _, m in masked_modules(model):  # the invariant on the trained weights
        assert bool((m.weight[~m.weight_mask.bool()] == 0).all())


def test_dense_and_sparse_exports_load_with_torch_alone_and_match_in_float64(nm_run, tmp_path):
    dense = fastticket.export(nm_run, level=1, format="dense", out=str(tmp_path / "t.pt"))
    sparse = str(tmp_path / "s.pt")
    assert main(["export", nm_run, "--level", "1", "--format", "sparse", "--out", sparse]) == 0
    model, _ = load_ticket(nm_run, 1)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = model.double().eval()(x)
    got = torch_alone(dense, sparse, x, tmp_path)
    assert torch.equal(got["dense_out"], expected)
    d = torch.load(dense, weights_only=False)
    assert d["model"] == "lenet300" and d["level"] == 1 and all("mask" not in k for k in d["state_dict"])
    # The sparse file's weights, rebuilt with torch alone, are the ticket's bit for bit, and the plain
    # (densified) built-in model loads them strictly and gives the same outputs.
    plain = fastticket.densify(load_ticket(nm_run, 1)[0])
    sd = plain.state_dict()
    state = got["sparse_state"]
    assert sorted(state) == sorted(sd) and all(torch.equal(state[k], sd[k]) for k in sd)
    plain.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(plain.double().eval()(x), expected)


def test_sparse_file_at_5_percent_is_a_small_fraction_of_dense(tmp_path):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 100)))
    g = torch.Generator().manual_seed(1)
    for _, m in masked_modules(model):
        m.set_mask_(torch.rand(m.weight.shape, generator=g) < 0.05)
    dense = export_model(model, "dense", str(tmp_path / "d.pt"), input_shape=(400,))
    sparse = export_model(model, "sparse", str(tmp_path / "s.pt"))
    ratio = os.path.getsize(sparse) / os.path.getsize(dense)
    assert ratio < 0.15, ratio
    d = torch.load(sparse, weights_only=True)
    w = d["state_dict"]["0.weight"].to_dense().reshape(d["shapes"]["0.weight"])
    assert torch.equal(w, model[0].weight.detach() * model[0].weight_mask)


def test_2_4_on_cpu_and_bad_input_are_one_line(nm_run, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message")
    assert main(["export", nm_run, "--level", "1", "--format", "2:4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "need a CUDA GPU" in err
    for argv, message in [(["--level", "7"], "no level 7"), (["--level", "1", "--format", "onnx"], "unknown export"),
                          (["--level", "1", "--trial", "3"], "no trial 3")]:
        assert main(["export", nm_run, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert main(["export", str(tmp_path), "--level", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_2_4_refuses_a_ticket_that_is_not_2_4(tmp_path):
    model = sparsify(nn.Sequential(nn.Linear(8, 8)))
    model[0].set_mask_(torch.eye(8, dtype=torch.bool) | torch.eye(8, dtype=torch.bool).roll(1, 1)
                       | torch.eye(8, dtype=torch.bool).roll(2, 1))
    with pytest.raises(ConfigError, match="0.weight not 2:4"):
        export_model(model, "2:4", str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="no layer is pruned"):
        export_model(sparsify(nn.Sequential(nn.Linear(8, 8))), "2:4", str(tmp_path / "x"))


def test_a_python_api_run_on_a_module_object_exports_with_model_given(tmp_path, capsys):
    """fastticket.search on an nn.Module object: config.json cannot name the object, so export needs it back
    (model=); without it one line says so, a model of another shape is refused in one line, and the file
    reproduces the ticket (weights and masks from final.pt, not the object's) in float64."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from user_sources import learnable_data
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 2))
    run = str(tmp_path / "run")
    fastticket.search(net, learnable_data(n=240), run, levels=1, iterations=6, eval_every=3, batch_size=20,
                      controls=(), rate=0.5, device="cpu", progress=False)
    assert main(["export", run, "--level", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model=" in err and "cannot be rebuilt" in err, err
    with pytest.raises(ConfigError, match="not the one .* searched"):
        fastticket.export(run, level=1, model=nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Linear(5, 2)))
    dense = fastticket.export(run, level=1, model=net, out=str(tmp_path / "t.pt"))
    sparse = export_model(load_ticket(run, 1, model=net)[0], "sparse", str(tmp_path / "s.pt"))
    ticket, _ = load_ticket(run, 1, model=net)
    assert 0.4 < float(ticket[1].weight_mask.float().mean()) < 0.6  # the ticket's mask, not the object's
    assert not torch.equal(ticket[1].weight.detach(), net[1].weight.detach())
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = ticket.double().eval()(x)
    assert torch.equal(torch_alone(dense, sparse, x, tmp_path)["dense_out"], expected)
