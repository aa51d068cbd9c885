"""Stacked arms on the triton backend (kernels/grouped_linear.py, wired by the vmap rule of fastticket/sparse/ops.py):
K arms' masked linear layers as one grouped launch (the arm a grid dimension over the arms' concatenated
live-tile lists), or one batched dense GEMM where the dispatch rule says dense.

Kernels: float64 and float32 parity of the grouped forward / dX / dW against the per-arm float64 reference,
with different masks per arm (dead tiles, all dead, all live, element-thinned), odd shapes (not multiples of
the 16 x 16 interpreter tile), outputs NaN-poisoned first. Training: the stacked engine on the triton backend
takes the same steps (float64, 1e-9) as each arm alone on the torch backend, with pruned weights exactly
zero in every arm, through the grouped kernels and through the batched GEMM. sm_90: the grouped kernels
compile with tensor cores, pipelining and no spills (tests/sm90.py).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from fastticket.sparse.backend import use_backend
from fastticket.kernels import grouped_linear, masked_linear, masked_optim
from fastticket.sparse import linear as linear_op
from fastticket.kernels.tile_map import build_stacked_tile_map
from fastticket.sparse.nn import MaskedLinear
from fastticket.lottery.presets import get_preset
from fastticket.sparse.testing import rel_error
from sm90 import Expect, assert_properties

ON_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.usefixtures("one_torch_thread")
launches = pytest.mark.launches_triton
# Dense threshold 1.01: every masked linear layer takes the grouped tile-skipping launch (a Triton kernel);
# 0: the batched dense GEMM (no Triton launch, so it also runs where the interpreter cannot run the kernels).
THRESHOLDS = [pytest.param("1.01", marks=launches, id="grouped-launch"), pytest.param("0", id="batched-gemm")]


def arm_masks(arms: int, n: int, k: int, block, gen: torch.Generator) -> torch.Tensor:
    """A different mask per arm: 0 whole dead tiles (block-pruned, element-thinned inside), 1 all live,
    2 element mask at 50%, 3 all dead, then more block masks."""
    bn, bk = block
    masks = []
    for a in range(arms):
        kind = a if a < 4 else 0
        if kind == 1:
            m = torch.ones(n, k, dtype=torch.bool)
        elif kind == 2:
            m = torch.rand(n, k, generator=gen) < 0.5
        elif kind == 3:
            m = torch.zeros(n, k, dtype=torch.bool)
        else:
            tiles = torch.rand(-(-n // bn), -(-k // bk), generator=gen) < 0.5
            tiles[0, 0], tiles[-1, -1] = True, False  # a live tile and a dead (partial edge) tile at least
            m = tiles.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k] & (torch.rand(n, k, generator=gen) < 0.7)
        masks.append(m)
    return torch.stack(masks)


def make_case(arms, m, n, k, dtype, seed, device, bias=True):
    gen = torch.Generator().manual_seed(seed)
    block = masked_linear.linear_tile_sizes(device, dtype)
    mask = arm_masks(arms, n, k, block, gen)
    x = torch.randn(arms, m, k, generator=gen, dtype=torch.float64)
    w = torch.randn(arms, n, k, generator=gen, dtype=torch.float64) / k ** 0.5 * mask  # zero invariant
    b = torch.randn(arms, n, generator=gen, dtype=torch.float64) if bias else None
    g = torch.randn(arms, m, n, generator=gen, dtype=torch.float64)
    to = dict(device=device, dtype=dtype)
    return (x.to(**to), w.to(**to), None if b is None else b.to(**to), mask.to(device), g.to(**to),
            build_stacked_tile_map(mask.to(device), *block))


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@launches
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(4, 19, 37, 45), (1, 5, 16, 33), (3, 33, 17, 16)])
def test_grouped_launchers_match_per_arm_float64_reference(device, dtype, shape):
    """Forward, dX and dW of every arm in one launch each, against each arm's float64 reference; outputs
    NaN-poisoned, so an element a kernel leaves unwritten (a dead tile of dW included) fails."""
    arms, m, n, k = shape
    x, w, b, mask, g, tile_map = make_case(arms, m, n, k, dtype, seed=sum(shape), device=device)
    assert tile_map.n_live < tile_map.n_tiles or arms == 1
    nan = lambda *s: torch.full(s, float("nan"), device=device, dtype=dtype)  # noqa: E731
    y = grouped_linear.grouped_linear_forward(x, w, b, tile_map, out=nan(arms, m, n))
    dx = grouped_linear.grouped_linear_grad_input(g, w, tile_map, out=nan(arms, m, k))
    dw = grouped_linear.grouped_linear_grad_weight(g, x, mask, tile_map, out=nan(arms, n, k))
    ref_y = grouped_linear.reference_grouped_linear(x, w, b, mask)
    ref_dx, ref_dw, _ = grouped_linear.reference_grouped_linear_grads(x, w, b, mask, g)
    for a in range(arms):
        for out, ref, what in ((y, ref_y, "Y"), (dx, ref_dx, "dX"), (dw, ref_dw, "dW")):
            if ref[a].abs().max() == 0:  # an all-dead arm: exact zeros (dW, dX) or the bias (Y, no bias here)
                assert torch.equal(out[a].cpu(), torch.zeros_like(out[a]).cpu()), (what, a)
                continue
            err = rel_error(out[a], ref[a])
            assert err < TOL[dtype], f"{what} arm {a}: relative error {err}"
    # Pruned entries of dW (dead tiles and pruned entries of live tiles) are exact zeros in every arm.
    assert torch.all(dw[~mask] == 0)


@launches
def test_all_dead_arm_gets_its_bias_and_zero_gradients(device):
    x, w, b, mask, g, tile_map = make_case(4, 7, 20, 18, torch.float32, seed=3, device=device)
    y = grouped_linear.grouped_linear_forward(x, w, b, tile_map, out=torch.full((4, 7, 20), float("nan"), device=device))
    assert not mask[3].any()
    assert torch.equal(y[3], b[3].expand(7, 20))
    dx = grouped_linear.grouped_linear_grad_input(g, w, tile_map)
    assert torch.equal(dx[3], torch.zeros_like(dx[3]))


def test_stacked_tile_map_of_wrong_arms_or_block_is_rejected(device):
    x, w, b, mask, g, tile_map = make_case(2, 5, 20, 18, torch.float32, seed=4, device=device)
    with pytest.raises(ValueError, match="arms"):
        grouped_linear.grouped_linear_forward(x[:1], w[:1], b[:1], tile_map)
    wrong = build_stacked_tile_map(mask, 8, 8)
    with pytest.raises(ValueError, match="tiles"):
        grouped_linear.grouped_linear_forward(x, w, b, wrong)


# ------------------------------------------------------------------------------------------------ under vmap

class TinyNet(nn.Module):
    """Two masked linear layers with odd sizes (45 -> 37 -> 10): 3 x 3 and 1 x 3 interpreter tiles."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = MaskedLinear(45, 37)
        self.fc2 = MaskedLinear(37, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_arms(arms: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    models = []
    for a in range(arms):
        torch.manual_seed(seed + a)
        model = TinyNet().to(dtype)
        for layer in (model.fc1, model.fc2):
            n, k = layer.weight.shape
            layer.set_mask_(arm_masks(arms, n, k, (16, 16), gen)[a])
        models.append(model)
    return models


class Calls:
    """Counts calls of module-level functions (wrapping them), so a test sees which path ran."""

    def __init__(self, monkeypatch, **targets) -> None:
        self.n = {name: 0 for name in targets}
        for name, (module, attr) in targets.items():
            real = getattr(module, attr)

            def wrapped(*args, _real=real, _name=name, **kwargs):
                self.n[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, attr, wrapped)


def spy(monkeypatch) -> Calls:
    return Calls(monkeypatch, grouped_call=(linear_op, "grouped_masked_linear"),
                 grouped_fwd=(grouped_linear, "grouped_linear_forward"),
                 grouped_dx=(grouped_linear, "grouped_linear_grad_input"),
                 grouped_dw=(grouped_linear, "grouped_linear_grad_weight"),
                 one_arm_fwd=(masked_linear, "linear_forward"))


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_vmapped_masked_linear_runs_the_grouped_path_forward_and_backward(monkeypatch, threshold):
    """vmap(functional_call(model)) of masked linear layers on the triton backend: one grouped call per layer
    and arm group (forward, dX, dW), gradients of each arm equal to that arm alone on the torch backend."""
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", threshold)
    models = tiny_arms(4, seed=11)
    params, buffers = stack_module_state(models)
    x = torch.randn(4, 6, 45, dtype=torch.float64)
    calls = spy(monkeypatch)
    with use_backend("triton"):
        out = vmap(lambda p, b, xx: functional_call(models[0], (p, b), (xx,)))(params, buffers, x)
        out.square().sum().backward()
    skipping = threshold != "0"
    assert calls.n == dict(grouped_call=2, grouped_fwd=2 * skipping, grouped_dx=1 * skipping, grouped_dw=2 * skipping,
                           one_arm_fwd=0)
    for a, model in enumerate(models):
        with use_backend("torch"):
            ref = model(x[a])
            ref.square().sum().backward()
        assert rel_error(out[a], ref) < 1e-12
        for name, p in model.named_parameters():
            assert rel_error(params[name].grad[a], p.grad) < 1e-12, (a, name)
            if name.endswith("weight"):
                assert torch.all(params[name].grad[a][~buffers[name + "_mask"][a]] == 0)


def test_vmap_of_grad_inside_is_correct_too():
    """A transform nested inside the vmap (torch.func.grad) sees the layer's dense form: still each arm's
    masked gradient."""
    models = tiny_arms(3, seed=5)
    params, buffers = stack_module_state(models)
    x = torch.randn(3, 4, 45, dtype=torch.float64)

    def loss(p, b, xx):
        return functional_call(models[0], (p, b), (xx,)).square().sum()

    with use_backend("triton"):
        grads = vmap(torch.func.grad(loss))(params, buffers, x)
    for a, model in enumerate(models):
        with use_backend("torch"):
            model(x[a]).square().sum().backward()
        for name, p in model.named_parameters():
            assert rel_error(grads[name][a], p.grad) < 1e-12, (a, name)


def test_fused_dw_update_inside_vmap_is_refused_in_one_line():
    """The dW+update fusion writes one arm's weight in place: under vmap it would update the base model, not
    the stacked arms, so it is refused with a clear error."""
    models = tiny_arms(2, seed=9)
    models[0].fc1.fused_update = lambda grad, x: None
    params, buffers = stack_module_state(models)
    x = torch.randn(2, 3, 45, dtype=torch.float64)
    with use_backend("triton"), pytest.raises(RuntimeError, match="fused_update.*vmap"):
        vmap(lambda p, b, xx: functional_call(models[0], (p, b), (xx,)))(params, buffers, x)


# ------------------------------------------------------------------------------------------------ the engine

class TinyData:
    """What the stacked engine reads of DeviceData: per-(seed, iteration) batches, drawn afresh."""

    device = torch.device("cpu")

    def batch(self, iteration: int, batch_size: int, seed: int):
        gen = torch.Generator().manual_seed(1000 * seed + iteration)
        x = torch.randn(batch_size, 45, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, 10, (batch_size,), generator=gen)

    def batches(self, iteration: int, batch_size: int, seeds):
        drawn = [self.batch(iteration, batch_size, s) for s in seeds]
        return torch.stack([x for x, _ in drawn]), torch.stack([y for _, y in drawn])


@launches  # the masked Adam's fused Triton step, whatever the layers' path
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("arms", [3, 1])
def test_stacked_engine_on_triton_steps_like_each_arm_alone_on_torch(monkeypatch, threshold, arms):
    """The stacked training step on the triton backend (grouped launches or batched GEMM; the masked Adam's
    fused Triton step over the stacked tensors, float64 included) against the one-arm engine on the torch backend, arm by arm, in float64: equal to 1e-9
    after several steps, pruned weights and their Adam state exactly zero in every arm. K = 1 too: a lone
    arm of a level trains stacked on the triton backend."""
    from fastticket.lottery.engine import Engine, make_optimizer

    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", threshold)
    config = get_preset("lenet-mnist5k").replace(optimizer="adam", lr=0.01, batch_size=7)
    data = TinyData()
    models = tiny_arms(arms, seed=21)
    alone = [copy.deepcopy(m) for m in models]
    seeds = [3, 3, 8][:arms]  # two arms of one trial share a batch stream, a third has its own
    with use_backend("triton"):
        states = [SimpleNamespace(model=m, optimizer=make_optimizer(config, m)) for m in models]
        jobs = [SimpleNamespace(seed=s, model=m) for s, m in zip(seeds, models)]
        engine = Engine(config, jobs, states, data, stacked=True)
        calls = spy(monkeypatch)
        adam = Calls(monkeypatch, fused=(masked_optim, "adam_step_"))
        for it in range(3):
            engine.step(it)
        engine.sync_out()
    assert calls.n["one_arm_fwd"] == 0 and calls.n["grouped_call"] == 2 * 3  # 2 layers x 3 steps
    assert adam.n["fused"] == 3  # the optimizer's fused Triton step over the stacked tensors, one per step
    assert (calls.n["grouped_fwd"] > 0) == (threshold != "0")
    for a, model in enumerate(alone):
        with use_backend("torch"):
            opt = make_optimizer(config, model)
            single = Engine(config, [SimpleNamespace(seed=seeds[a], model=model)],
                            [SimpleNamespace(model=model, optimizer=opt)], data, stacked=False)
            for it in range(3):
                single.step(it)
        stacked = dict(models[a].named_parameters())
        for name, p in model.named_parameters():
            assert rel_error(stacked[name], p) < 1e-9, (a, name)
        for layer in (models[a].fc1, models[a].fc2):
            pruned = ~layer.weight_mask
            assert pruned.any() or a == 1
            assert torch.all(layer.weight[pruned] == 0)
            for value in states[a].optimizer.state[layer.weight].values():
                if torch.is_tensor(value) and value.shape == layer.weight.shape:
                    assert torch.all(value[pruned] == 0)


# ------------------------------------------------------------------------------------------------ sm_90

# sm_90 compile checks (tests/sm90.py, the sm90_compiled fixture) of the grouped kernels as a real launch would
# compile them: 8 arms of an 8192-token batch through a 4096 x 4096 layer, contiguous, bf16 (and one tf32 set).
# THE table for the grouped kernels: whoever changes their configs or code updates it here. The configs are
# the one-arm kernels' (kernels/masked_linear.py) at program width 64, as the autotuner keeps them on an H100.
SM90_EXPECT = {
    "grouped fwd bf16 BM128 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "grouped fwd bf16 BM64 w4 s5": Expect("wgmma", buffers=5, async16=True),
    "grouped dx bf16 BM128 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "grouped dw bf16 BM64 w4 s4": Expect("wgmma", buffers=4, async16=True, no_atomics=True),
    "grouped dw bf16 BM128 w4 s3": Expect("wgmma", buffers=3, async16=True, no_atomics=True),
    "grouped fwd tf32 BM128 w8 s4": Expect("wgmma", buffers=4),
    "grouped dx tf32 BM128 w8 s4": Expect("wgmma", buffers=4),
    "grouped dw tf32 BM64 w4 s4": Expect("wgmma", buffers=4, no_atomics=True),
}

SM90_BODY = r"""
import torch
import triton.language as tl
import fastticket.kernels.grouped_linear as gl
import fastticket.kernels.masked_linear as ml

WANTED = %r
A, M, N, K = 8, 8192, 4096, 4096
BN, BK = ml.linear_tile_sizes(torch.device("cuda"), torch.bfloat16)
BUCKET = ml.live_bucket(0.4)
i32, u8 = ptr(torch.int32), ptr(torch.uint8)
lists = dict(LIST_CHUNK=ml._LIST_CHUNK, GROUP_M=ml._GROUP_M)



ml._SMEM_BUDGET = SMEM_LIMIT_SM90  # the pruning asks an H100 for this; here no device answers
for dtype, tag, precision in ((torch.bfloat16, "bf16", None), (torch.float32, "tf32", "tf32")):
    t = ptr(dtype)
    for kind, named, wide in (("fwd", "x_ptr", "BLOCK_N"), ("dx", "dy_ptr", "BLOCK_K")):
        for c in ml._prune_configs(ml._cuda_configs(), {"M": M, named: Arg(dtype)}, **{wide: 64}):
            name = f"grouped {kind} {tag} BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
            if name not in WANTED:
                continue
            meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            if kind == "fwd":
                check(name, gl._grouped_fwd_kernel, t, t, t, t, i32, i32, M, N, K, N // BN,
                      M * K, K, 1, N * K, K, 1, N, M * N, N, 1, A, BUCKET, HAS_BIAS=True,
                      INPUT_PRECISION=precision, ACC=tl.float32, BLOCK_N=BN, BLOCK_K=BK, **lists, **meta)
            else:
                check(name, gl._grouped_dx_kernel, t, t, t, i32, i32, M, N, K, K // BK,
                      M * N, N, 1, N * K, K, 1, M * K, K, 1, A, BUCKET,
                      INPUT_PRECISION=precision, ACC=tl.float32, BLOCK_N=BN, BLOCK_K=BK, **lists, **meta)
    for c in ml._dw_cuda_configs():
        name = f"grouped dw {tag} BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
        if name in WANTED:
            check(name, gl._grouped_dw_kernel, t, t, u8, u8, t, M, N, K, K // BK,
                  M * N, N, 1, M * K, K, 1, N * K, K, 1, N * K, K, 1, A, BUCKET,
                  INPUT_PRECISION=precision, ACC=tl.float32, BLOCK_N=BN, BLOCK_K=BK, **c.kwargs,
                  num_warps=c.num_warps, num_stages=c.num_stages)
""" % sorted(SM90_EXPECT)


@pytest.mark.skipif(ON_CUDA, reason="with a GPU the other tests compile the kernels for real")
def test_grouped_kernels_compile_for_sm90_without_a_gpu(sm90_compiled):
    missing = sorted(set(SM90_EXPECT) - set(sm90_compiled))
    assert not missing, f"configurations no longer launched (update SM90_EXPECT): {missing}"


@pytest.mark.skipif(ON_CUDA, reason="offline compile check; a GPU runs the kernels themselves")
@pytest.mark.parametrize("name", sorted(SM90_EXPECT))
def test_grouped_sm90_tensor_cores_pipelining_no_spills(name, sm90_compiled):
    assert_properties(sm90_compiled, name, SM90_EXPECT[name])
