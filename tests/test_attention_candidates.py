"""Every autotuning candidate of the attention kernels, each launched on its own, against float64.

The autotuner only ever runs the fastest candidate, so a config that computes wrong numbers (a tile
shape the range arithmetic gets wrong, a pipelining depth that miscompiles) would stay hidden until
the day it wins on some GPU. Here each candidate of `candidate_configs(kernel, D, capability)` runs
through `forced_config` (a direct launch, no autotuner) while the other two kernels run their first
candidate (AIMV2_KERNELS_AUTOTUNE=0), on odd S, with a per-sample prefix, plain causal and without
a mask. Outputs are poisoned (NaN) before the kernels write them, and a spy on the kernels' launches
checks that the forced config is the one that ran.

GPU (`gpu`): head dims 64 and 128, bf16 with FlashAttention's rule (error at most twice that of the
same computation in PyTorch bf16, plus a floor) and fp32 with exact (ieee) dots. CPU: one small
candidate per kernel in fp32 under TRITON_INTERPRET=1, so the harness itself is exercised; plus the
autotuning switch and key, through the real autotuner in the interpreter.
"""
from __future__ import annotations

import contextlib
import re

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels import reference as ref
from aimv2_kernels.backend import interpreter_enabled
from aimv2_kernels import layouts
from aimv2_kernels.triton_backend import attention as common
from aimv2_kernels.triton_backend.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from aimv2_kernels.triton_backend.attention_fwd import attention_fwd_kernel
from tests.helpers import rel_err

B, H = 3, 2
SEQ_LENS = (67, 300)  # not multiples of any tile: every kernel has a partial last tile
# "bwd" (dQ by atomics, the default backward) is the dK/dV kernel with ATOMIC_DQ; "dkdv" and "dq" the
# deterministic backward
KERNEL_FNS = {"fwd": attention_fwd_kernel, "dkdv": attention_bwd_dkdv_kernel, "dq": attention_bwd_dq_kernel,
              "bwd": attention_bwd_dkdv_kernel}
DETERMINISTIC_KERNELS = ("dkdv", "dq")
MODES = ("prefix", "causal", "bidirectional")

# fp32 with ieee dots: near 1e-5 (SPEC section 5), per element relative to the largest magnitude.
FP32_REL, FP32_ELEM = 2e-5, 2e-5
# bf16 floors on top of twice PyTorch's own bf16 error (half a bf16 ulp is 2e-3 relative).
BF16_REL_FLOOR, BF16_ELEM_FLOOR = 1e-3, 2e-3


def _gpu_capability() -> tuple[int, int]:
    """The candidate set depends on the device class; without a GPU the ids still list sm_90's."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)


def _as_tuple(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _config_id(kernel: str, head_dim: int, config: triton.Config) -> str:
    bm, bn, warps, stages = _as_tuple(config)
    return f"{kernel}-D{head_dim}-{bm}x{bn}-w{warps}-s{stages}"


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    """Run under the triton backend and record (BLOCK_M, BLOCK_N, warps, stages) of every launch of
    each tiled kernel. `run` is what both a direct launch and the autotuner (each benchmark and the
    final launch) end in, so the record also shows any candidate the autotuner tried."""
    seen: dict[str, list[tuple]] = {name: [] for name in KERNEL_FNS}
    for fn in set(KERNEL_FNS.values()):
        def spy(*args, _run=fn.run, _fn=fn, **kwargs):
            config = (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs.get("num_warps"), kwargs.get("num_stages"))
            name = next(n for n, f in KERNEL_FNS.items() if f is _fn and n != "bwd")
            seen["bwd" if kwargs.get("ATOMIC_DQ") else name].append(config)
            return _run(*args, **kwargs)

        monkeypatch.setattr(fn, "run", spy)
    with ak.use_backend("triton"):
        assert backend.unavailable_reason("triton") is None
        yield seen


@pytest.fixture
def fresh_autotuners():
    """Autotuners cache their choice per key: every test that looks at them starts from new ones."""
    common.reset_autotuners()
    yield
    common.reset_autotuners()


@contextlib.contextmanager
def _poisoned_outputs(monkeypatch):
    """NaN in every float buffer the launchers allocate (out, lse, delta, dq, dk, dv), so an element a
    kernel forgets to write fails the comparison instead of passing on leftover memory."""
    def poisoned(alloc):
        def wrapped(*args, **kwargs):
            t = alloc(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return wrapped

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", poisoned(torch.empty))
        m.setattr(torch, "empty_like", poisoned(torch.empty_like))
        m.setattr(layouts, "empty_bshd_output", poisoned(layouts.empty_bshd_output))
        yield


# ---- one case: inputs, the kernels, the references -----------------------------------------------

def _mode(mode: str, S: int, device) -> tuple[torch.Tensor | None, bool]:
    """(prefix_len, causal). The per-sample prefix mixes plain causal (0), a random length and one
    past S (every key visible)."""
    if mode == "prefix":
        middle = int(torch.randint(1, S, ()))
        return torch.tensor([0, middle, S + 2], dtype=torch.int32, device=device), True
    return None, mode == "causal"


def _attention_in_dtype(q, k, v, prefix, causal):
    """The same attention in plain PyTorch at the inputs' dtype (scores, probabilities and products
    rounded to bf16), the baseline of FlashAttention's tolerance rule."""
    S, D = q.shape[-2:]
    visible = ref.prefix_visibility(S, prefix, causal, device=q.device).unsqueeze(1)  # (B|1, 1, S, S)
    scores = (q @ k.transpose(-2, -1)) * D**-0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def _forward_backward(fn, q, k, v, dout, prefix, causal):
    """(out, dq, dk, dv) of `fn` at fresh leaves made from q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, prefix, causal)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def _kernel_op(q, k, v, prefix, causal):
    return ak.prefix_causal_attention(q, k, v, prefix, causal=causal)


def _reference_op(q, k, v, prefix, causal):
    return ref.prefix_causal_attention(q, k, v, prefix, causal)


def _check(name: str, got: torch.Tensor, want: torch.Tensor, baseline: torch.Tensor | None) -> None:
    """Relative error norm AND the worst element (a wrong row must fail). `baseline` is PyTorch's own
    result at the kernel's dtype (bf16 rule); None means fixed fp32 tolerances."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element was never written?)"
    err = (got.double() - want).abs()
    scale = float(want.abs().max())
    if baseline is None:
        rel_tol, elem_tol = FP32_REL, FP32_ELEM * scale
    else:
        rel_tol = 2 * rel_err(baseline, want) + BF16_REL_FLOOR
        elem_tol = 2 * float((baseline.double() - want).abs().max()) + BF16_ELEM_FLOOR * scale
    rel = rel_err(got, want)
    assert rel <= rel_tol, f"{name}: relative error {rel:.3e} > {rel_tol:.3e}"
    worst = int(err.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert float(err.max()) <= elem_tol, (
        f"{name}: |error| {float(err.max()):.3e} at (b, h, s, d) = {where} > {elem_tol:.3e} "
        f"(largest |value| {scale:.3e})")


def _run_candidate(kernel, config, D, dtype, mode, S, device, launches, monkeypatch) -> None:
    # the backward design whose kernel is forced (the forward's runs with the default one)
    monkeypatch.setenv(backend.DETERMINISTIC_ENV, "1" if kernel in DETERMINISTIC_KERNELS else "0")
    q, k, v, dout = (torch.randn(B, H, S, D, device=device).to(dtype) for _ in range(4))
    prefix, causal = _mode(mode, S, device)
    for seen in launches.values():
        seen.clear()
    with common.forced_config(kernel, config), _poisoned_outputs(monkeypatch):
        got = _forward_backward(_kernel_op, q, k, v, dout, prefix, causal)
    assert launches[kernel] and set(launches[kernel]) == {_as_tuple(config)}, (
        f"{kernel} ran {sorted(set(launches[kernel]))}, not the forced {_as_tuple(config)}")

    want = _forward_backward(_reference_op, q.double(), k.double(), v.double(), dout.double(), prefix, causal)
    baseline = [None] * 4
    if dtype != torch.float32:
        baseline = _forward_backward(_attention_in_dtype, q, k, v, dout, prefix, causal)
    for name, g, w, b in zip(("out", "dq", "dk", "dv"), got, want, baseline):
        _check(f"{name} ({kernel} forced, {mode}, S={S}, {dtype})", g, w, b)


# ---- GPU: every candidate, head dims 64 and 128, bf16 and fp32 -----------------------------------

def _gpu_cases():
    """bf16 in every mask mode; fp32 (ieee dots, twice the shared memory: its own candidate set)
    with the prefix mask."""
    cases = []
    for kernel in KERNEL_FNS:
        for D in (64, 128):
            for dtype, modes in ((torch.bfloat16, MODES), (torch.float32, ("prefix",))):
                for index, config in enumerate(common.candidate_configs(kernel, D, _gpu_capability(), dtype.itemsize)):
                    for mode in modes:
                        name = f"{_config_id(kernel, D, config)}-{str(dtype)[6:]}-{mode}"
                        cases.append(pytest.param(kernel, D, index, config, dtype, mode, id=name))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,D,index,config,dtype,mode", _gpu_cases())
def test_candidate_on_gpu(launches, monkeypatch, kernel, D, index, config, dtype, mode):
    monkeypatch.setenv(common.AUTOTUNE_ENV, "0")  # the other two kernels: their first candidate
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32: ieee dots
    for S in SEQ_LENS:
        try:
            _run_candidate(kernel, config, D, dtype, mode, S, "cuda", launches, monkeypatch)
        except OutOfResources as exc:
            # The autotuner drops a config that does not fit; the first candidate, which
            # AIMV2_KERNELS_AUTOTUNE=0 runs alone, must fit.
            if index == 0:
                raise
            pytest.skip(f"does not fit this GPU in {dtype} ({exc}); the autotuner drops it")


# ---- CPU: the harness itself, one small candidate per kernel in the interpreter -------------------

def _smallest_candidate(kernel: str) -> triton.Config:
    """The fp32 D = 64 candidate with the smallest tile unlike the interpreter's: fastest in the
    interpreter, still a real entry."""
    differ = [c for c in common.candidate_configs(kernel, 64, element_size=4)
              if _as_tuple(c)[:2] != common._INTERPRETER[kernel][:2]]  # see test_candidate_in_interpreter
    return min(differ, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])


needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="runs CPU tensors in TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel,config", [
    pytest.param(kernel, _smallest_candidate(kernel), id=_config_id(kernel, 64, _smallest_candidate(kernel)))
    for kernel in KERNEL_FNS])
def test_candidate_in_interpreter(launches, monkeypatch, kernel, config, mode):
    # The other kernels keep the interpreter config, whose tiles differ from the forced ones: a
    # launcher that ignored the forced config would show in the launch record.
    assert _as_tuple(config)[:2] != common._INTERPRETER[kernel][:2]
    for S in SEQ_LENS:
        _run_candidate(kernel, config, 64, torch.float32, mode, S, "cpu", launches, monkeypatch)


def _table_tiles():
    """Every distinct tile of the 16-bit candidate tables, D = 64 and 128, sm_80 and sm_90: in the
    interpreter warps and stages change nothing, the tile is what the range arithmetic, the masks and
    the partial last tiles depend on."""
    tiles = {}
    for kernel in KERNEL_FNS:
        for D in (64, 128):
            for capability in common.TABLE_CAPABILITIES.values():
                for config in common.candidate_configs(kernel, D, capability):
                    tiles.setdefault((kernel, D, _as_tuple(config)[:2]), config)
    return [pytest.param(kernel, D, config, id=f"{kernel}-D{D}-{bm}x{bn}") for (kernel, D, (bm, bn)), config in tiles.items()]


@needs_interpreter
@pytest.mark.parametrize("kernel,D,config", _table_tiles())
def test_every_table_tile_in_interpreter(launches, monkeypatch, kernel, D, config):
    """The GPU tables' tiles, computed in fp32 (the interpreter's bf16 dots are wrong) with the
    per-sample prefix (plain causal, a random prefix and all keys visible in one batch)."""
    for S in SEQ_LENS:
        _run_candidate(kernel, config, D, torch.float32, "prefix", S, "cpu", launches, monkeypatch)


def test_each_card_gets_its_arch_table():
    cards = {(8, 0): 80, (8, 6): 80, (8, 9): 80, (9, 0): 90, (10, 0): 90, (12, 0): 80, (0, 0): 80}
    assert {c: common.table_arch(c) for c in cards} == cards
    for kernel in KERNEL_FNS:
        hopper, ampere = (common.candidate_configs(kernel, 128, c) for c in ((9, 0), (8, 0)))
        assert [_as_tuple(c) for c in hopper] != [_as_tuple(c) for c in ampere], kernel


def test_gpu_case_ids_are_readable_and_unique():
    ids = [p.id for p in _gpu_cases()]
    pattern = r"(fwd|dkdv|dq|bwd)-D(64|128)-\d+x\d+-w\d+-s\d+-(bfloat16-(prefix|causal|bidirectional)|float32-prefix)"
    assert all(re.fullmatch(pattern, i) for i in ids), ids
    assert len(ids) == len(set(ids))


def test_forced_config_is_scoped():
    config = _smallest_candidate("fwd")
    with common.forced_config("fwd", config):
        assert common.fixed_config("fwd", torch.empty(1))["BLOCK_M"] == config.kwargs["BLOCK_M"]
        with common.forced_config("fwd", _smallest_candidate("dq")):
            assert common._forced["fwd"] is not config
        assert common._forced["fwd"] is config
    assert "fwd" not in common._forced
    with pytest.raises(ValueError, match="kernel must be one of"):
        with common.forced_config("dk", config):
            pass


# ---- the autotuning switch and key ----------------------------------------------------------------

def test_autotune_switch_selects_the_first_candidate(fresh_autotuners, monkeypatch):
    for kernel, fn in KERNEL_FNS.items():
        candidates = common.candidate_configs(kernel, 128, (9, 0))
        monkeypatch.setenv(common.AUTOTUNE_ENV, "0")
        assert common.autotuned(fn, kernel, 128, (9, 0)).configs == candidates[:1]
        monkeypatch.setenv(common.AUTOTUNE_ENV, "1")
        tuner = common.autotuned(fn, kernel, 128, (9, 0))
        assert tuner.configs == candidates
        # older triton versions silently drop a key name that is not an argument; VARLEN keeps packed
        # batches (whose S bucket is max_seqlen's) from reusing a padded batch's tuning, and back
        assert set(tuner.keys) == {"S_BUCKET", "CAUSAL", "HAS_PREFIX", "DOT_PRECISION", "VARLEN"} <= set(tuner.arg_names)
        # the atomic backward adds into DQ_ACC: each timed candidate and the real launch start from zero
        assert tuner.reset_to_zero == (["DQ_ACC"] if kernel == "bwd" else []), kernel


@pytest.fixture
def through_autotuner(monkeypatch, fresh_autotuners):
    """CPU launches take the autotuner route (as on a GPU) instead of the interpreter config."""
    monkeypatch.setattr(common, "use_interpreter_config", lambda t: False)


@needs_interpreter
@pytest.mark.parametrize("deterministic", [False, True])
def test_autotune_off_launches_the_first_candidate_once(launches, through_autotuner, monkeypatch, deterministic):
    monkeypatch.setenv(common.AUTOTUNE_ENV, "0")
    monkeypatch.setenv(backend.DETERMINISTIC_ENV, "1" if deterministic else "0")
    q, k, v, dout = torch.randn(4, B, H, 67, 32).unbind(0)
    _forward_backward(_kernel_op, q, k, v, dout, torch.tensor([0, 5, 40]), True)
    ran = ("fwd", *(DETERMINISTIC_KERNELS if deterministic else ("bwd",)))
    for kernel in KERNEL_FNS:
        first = common.candidate_configs(kernel, 32, common.device_capability(q), q.element_size())[0]
        want = [_as_tuple(first)] if kernel in ran else []
        assert launches[kernel] == want, f"{kernel}: benchmarked, ran another config or ran in the other design"


@needs_interpreter
def test_autotuner_tunes_each_mask_mode_separately(launches, through_autotuner, monkeypatch):
    """A config tuned for the causal decoder must not be reused for the prefix encoder: the tuner's
    cache gets one entry per (S bucket, mask mode, dot precision, dtypes)."""
    monkeypatch.setenv(common.AUTOTUNE_ENV, "1")
    S, D = 67, 32
    q, k, v = torch.randn(3, 1, 1, S, D).unbind(0)
    tuner = common.autotuned(attention_fwd_kernel, "fwd", D, common.device_capability(q), q.element_size())
    timings = iter(range(1000))  # a growing "time" per benchmark: the first candidate wins

    def bench(call, quantiles):  # runs each candidate once (no GPU timer in the interpreter)
        call()
        return [float(next(timings))] * len(quantiles)

    monkeypatch.setitem(tuner.__dict__, "do_bench", bench)
    for prefix, causal in ((torch.tensor([9]), True), (None, True), (None, False)):
        ak.prefix_causal_attention(q, k, v, prefix, causal=causal)
    keys = list(tuner.cache)
    assert len(keys) == 3, keys
    assert {(key[1], key[2]) for key in keys} == {(True, True), (True, False), (False, False)}
    n_candidates = len(tuner.configs)
    assert len(launches["fwd"]) == 3 * (n_candidates + 1)  # each mode: benchmark every candidate, then run
    # what a benchmark records: each mode's choice (the first candidate, which "ran fastest" here)
    picked = common.picked_configs()
    assert len(picked) == 3 and {row["config"] for row in picked} == {common.config_label(tuner.configs[0])}, picked
    assert {(row["key"]["CAUSAL"], row["key"]["HAS_PREFIX"]) for row in picked} == {(True, True), (True, False), (False, False)}
    assert all(row["kernel"] == "fwd" and row["head_dim"] == D and row["key"]["S_BUCKET"] == 128 for row in picked), picked
