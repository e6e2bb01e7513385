"""The fused AIMv2 loss on the "triton" backend against the float64 reference.

Every test runs on the `device` fixture's device: without a GPU the real kernels run in Triton's
interpreter on CPU tensors (fp32, fp16 and, for the patch loss, which has no tl.dot, bf16), with one
the compiled kernels run on CUDA tensors; `gpu`-marked tests add bf16 and real sizes. Every test
asserts that the Triton implementations ran, not a fallback, and the launchers' output buffers start
as NaN (`common.poisoned_outputs`) so an element a kernel does not write cannot pass.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels import reference as ref
from aimv2_kernels import linear_ce_chunks
from aimv2_kernels.ops import loss
from tests.helpers import TOLERANCE, assert_close, check_linear_ce, grads64, rel_err

REPO = Path(__file__).resolve().parent.parent

KERNELS = ("patch_mse_fwd", "patch_mse_bwd", "linear_ce")


@pytest.fixture
def spies(monkeypatch):
    """Counts calls of the triton implementations and of the Triton row launcher."""
    assert backend.unavailable_reason("triton") is None  # imports the triton_backend modules
    from aimv2_kernels.triton_backend import linear_cross_entropy as lce

    counts = dict.fromkeys(KERNELS + ("ce_rows_triton",), 0)

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name in KERNELS:
        monkeypatch.setitem(backend._REGISTRY[name], "triton", spy(name, backend._REGISTRY[name]["triton"]))
    monkeypatch.setattr(lce, "ce_rows_triton", spy("ce_rows_triton", lce.ce_rows_triton))

    with ak.use_backend("triton"):
        yield counts


@pytest.fixture
def calls(spies):
    """`spies`, with the Triton launchers' output buffers poisoned (NaN) so unwritten outputs show up.
    The launchers poison their own allocations (`common.poison`): a TorchDispatchMode would see the
    custom op as one call, never the allocations inside its body."""
    from aimv2_kernels.triton_backend import common

    with common.poisoned_outputs():
        yield spies


# ---- patch MSE ---------------------------------------------------------------------------------

def _mask(kind, B, N, device):
    if kind == "none":
        return None
    if kind == "all_false":
        return torch.zeros(B, N, dtype=torch.bool, device=device)
    mask = torch.rand(B, N, device=device) > 0.4
    mask[0] = False  # an all-False row
    mask[-1, 0] = True
    return mask


@pytest.mark.parametrize("P", [3, 48, 588])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["random", "none", "all_false"])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_mse_matches_reference(calls, device, P, dtype, mask_kind, norm_pix):
    B, N = 3, 7
    # The caller's shift: pred = pixel_out[:, :-1], target = patches[:, 1:], both strided views.
    pixel_out = (torch.randn(B, N + 1, P, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    patches = (torch.randn(B, N + 1, P, device=device) * 3 - 1).to(dtype)
    pred, target = pixel_out[:, :-1], patches[:, 1:]
    mask = _mask(mask_kind, B, N, device)
    out = ak.patch_mse_loss(pred, target, mask, norm_pix=norm_pix)
    out.backward()
    expected, (dpred,) = grads64(lambda p: ref.patch_mse_loss(p, target.double(), mask, norm_pix), pred)
    assert calls["patch_mse_fwd"] == 1 and calls["patch_mse_bwd"] == 1
    assert out.dtype == torch.float32
    assert_close(out, expected, TOLERANCE[torch.float32], "loss")
    assert_close(pixel_out.grad[:, :-1], dpred, TOLERANCE[dtype], "dpred")
    assert pixel_out.grad[:, -1].abs().max() == 0  # the unused last output gets no gradient
    if mask_kind == "all_false":
        assert out.item() == 0.0 and pixel_out.grad.abs().max() == 0
    elif mask_kind == "random":
        assert pixel_out.grad[0].abs().max() == 0  # the all-False row


def test_patch_mse_strided_last_dim_and_dloss(calls, device):
    """A non-unit stride inside the patch, and a d loss other than 1 (alpha * pixel)."""
    B, N, P = 2, 5, 48
    pred = torch.randn(B, P, N, device=device).transpose(1, 2).requires_grad_()  # strides (P*N, 1, N)
    target = torch.randn(N, B, P, device=device).transpose(0, 1)
    mask = torch.rand(B, N, device=device) > 0.3
    (0.4 * ak.patch_mse_loss(pred, target, mask)).backward()
    expected, (dpred,) = grads64(lambda p: 0.4 * ref.patch_mse_loss(p, target.double(), mask), pred)
    assert calls["patch_mse_bwd"] == 1
    assert_close(pred.grad, dpred, TOLERANCE[torch.float32], "dpred")


def test_patch_mse_runs_are_bit_identical(calls, device):
    pred, target = torch.randn(4, 33, 588, device=device), torch.randn(4, 33, 588, device=device)
    mask = torch.rand(4, 33, device=device) > 0.5
    first = ak.patch_mse_loss(pred, target, mask)
    assert torch.equal(first, ak.patch_mse_loss(pred, target, mask))
    assert calls["patch_mse_fwd"] == 2


def test_patch_mse_too_large_patch_falls_back_with_a_warning(calls, device):
    from aimv2_kernels.triton_backend import common, patch_mse

    common._warned.discard("patch_mse_size")
    P = patch_mse.MAX_PATCH + 1
    pred, target = torch.randn(1, 2, P, device=device), torch.randn(1, 2, P, device=device)
    with pytest.warns(RuntimeWarning, match="reference"):
        out = ak.patch_mse_loss(pred, target)
    assert calls["patch_mse_fwd"] == 1
    assert_close(out, ref.patch_mse_loss(pred.double(), target.double()), TOLERANCE[torch.float32], "loss")


# ---- linear cross-entropy ------------------------------------------------------------------------

def _labels(tokens, vocab, device):
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[torch.rand(tokens, device=device) < 0.25] = -100
    if tokens > 1:
        labels[1] = -100
    return labels


def _check_linear_ce(calls, device, tokens, vocab, dtype, with_bias):
    check_linear_ce(device, tokens, vocab, 32, dtype, with_bias, _labels)
    assert calls["linear_ce"] == 1 and calls["ce_rows_triton"] >= 1


@pytest.fixture(params=["one pass", "two passes"])
def row_passes(request, monkeypatch):
    """The row kernel's two forms: the whole row on chip (every vocabulary of these tests fits), and
    two passes over vocab tiles (what rows wider than ONE_PASS_MAX_BLOCK take), forced here."""
    from aimv2_kernels.triton_backend import linear_cross_entropy as lce

    if request.param == "two passes":
        monkeypatch.setattr(lce, "ONE_PASS_MAX_BLOCK", 0)
    assert lce.launch_config(4099)["ONE_PASS"] == (request.param == "one pass")
    return request.param


@pytest.mark.parametrize("tokens", [1, 37, 300])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_ce_matches_reference(calls, device, tokens, vocab, dtype, row_passes):
    _check_linear_ce(calls, device, tokens, vocab, dtype, with_bias=vocab != 1000)


@pytest.mark.parametrize("vocab", [1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_ce_many_token_chunks(calls, device, monkeypatch, vocab, dtype, row_passes):
    """A tiny logits budget: 8 tokens per chunk at vocab 1000, 1 at 4099 (dW summed over 300 chunks)."""
    monkeypatch.setattr(linear_ce_chunks, "CHUNK_ELEMENTS", 1 << 13)
    _check_linear_ce(calls, device, 300, vocab, dtype, with_bias=vocab == 1000)
    assert calls["ce_rows_triton"] == -(-300 // linear_ce_chunks.chunk_tokens(300, vocab)) > 1


@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_linear_ce_all_ignored_is_zero_with_zero_gradients(calls, device, ignore_index, row_passes):
    hidden = torch.randn(2, 5, 16, device=device, requires_grad=True)
    weight = torch.randn(11, 16, device=device, requires_grad=True)
    bias = torch.randn(11, device=device, requires_grad=True)
    labels = torch.full((2, 5), ignore_index, device=device)
    out = ak.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
    out.backward()
    assert calls["ce_rows_triton"] == 1
    assert out.item() == 0.0
    for t in (hidden, weight, bias):
        assert torch.isfinite(t.grad).all() and t.grad.abs().max() == 0


def test_linear_ce_batched_hidden_int32_labels_and_dloss(calls, device):
    hidden = torch.randn(3, 9, 24, device=device, requires_grad=True)
    weight = torch.randn(50, 24, device=device, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9), dtype=torch.int32, device=device)
    labels[0, :4] = 7
    labels[2, 3] = -5
    out = ak.linear_cross_entropy(hidden, weight, labels, ignore_index=-5)
    (2.5 * out).backward()
    expected, grads = grads64(lambda h, w: 2.5 * ref.linear_cross_entropy(h, w, labels.long(), None, -5), hidden, weight)
    assert calls["ce_rows_triton"] == 1
    assert_close(2.5 * out, expected, TOLERANCE[torch.float32], "loss")
    assert_close(hidden.grad, grads[0], TOLERANCE[torch.float32], "dhidden")
    assert_close(weight.grad, grads[1], TOLERANCE[torch.float32], "dweight")


def test_linear_ce_asks_only_for_needed_gradients(calls, device):
    hidden, weight = torch.randn(6, 8, device=device), torch.randn(5, 8, device=device)
    labels = torch.tensor([0, 4, -100, 2, 2, 1], device=device)
    expected = ref.linear_cross_entropy(hidden.double(), weight.double(), labels)
    loss_only, dh, dw, db = loss.linear_ce_op(hidden, weight, labels, None, -100, False, False)
    assert dh.numel() == dw.numel() == db.numel() == 0
    assert_close(loss_only, expected, TOLERANCE[torch.float32], "loss")
    frozen_weight = ak.linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    frozen_weight.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        assert_close(ak.linear_cross_entropy(hidden, weight, labels), expected, TOLERANCE[torch.float32], "no_grad")


def test_linear_ce_float64_uses_the_reference_rows(calls, device):
    hidden = torch.randn(7, 6, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 8, -100, 3, 3, 1, 2], device=device)
    out = ak.linear_cross_entropy(hidden, weight, labels)
    out.backward()
    expected, grads = grads64(lambda h, w: ref.linear_cross_entropy(h, w, labels), hidden, weight)
    assert calls["linear_ce"] == 1 and calls["ce_rows_triton"] == 0
    assert out.dtype == torch.float64
    assert_close(out, expected, 1e-12, "loss")
    assert_close(hidden.grad, grads[0], 1e-12, "dhidden")


_OUT_OF_RANGE_LABELS = textwrap.dedent("""
    import torch
    import aimv2_kernels as ak

    ak.linear_cross_entropy(torch.randn(3, 4, device="cuda"), torch.randn(5, 4, device="cuda"),
                            torch.tensor([0, 5, 1], device="cuda"))
    torch.cuda.synchronize()
    print("no error")
""")


def test_linear_ce_rejects_out_of_range_labels(calls, device):
    """On the CPU a ValueError naming labels. On CUDA the check is a device-side assert (no host sync
    per call), which leaves the CUDA context unusable: it runs in a child process."""
    if device.type == "cpu":
        with pytest.raises(ValueError, match="labels"):
            ak.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 5, 1]))
        return
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_RANGE_LABELS], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "no error" not in proc.stdout, proc.stdout + proc.stderr
    assert "labels must be ignore_index" in proc.stderr, proc.stderr[-3000:]


def test_linear_ce_refuses_double_backward(calls, device):
    hidden = torch.randn(3, 4, device=device, requires_grad=True)
    weight = torch.randn(5, 4, device=device, requires_grad=True)
    out = ak.linear_cross_entropy(hidden, weight, torch.tensor([0, 4, 2], device=device))
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out, hidden, create_graph=True)


# ---- the combined loss ---------------------------------------------------------------------------

def test_aimv2_loss_matches_reference_and_compiles(calls, device):
    B, N, P, T, D, V = 2, 6, 48, 5, 16, 33
    pixel_out = torch.randn(B, N + 1, P, device=device, requires_grad=True)
    patches = torch.randn(B, N + 1, P, device=device)
    mask = torch.rand(B, N, device=device) > 0.3
    hidden = torch.randn(B, T, D, device=device, requires_grad=True)
    weight = torch.randn(V, D, device=device, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=device)
    labels[:, -1] = -100

    def step(po, h, w):
        out = ak.aimv2_loss(po[:, :-1], patches[:, 1:], mask, h, w, labels)
        return out.total, out.pixel, out.text

    total, pixel, text = step(pixel_out, hidden, weight)
    grads = torch.autograd.grad(total, (pixel_out, hidden, weight))
    exp_pixel = ref.patch_mse_loss(pixel_out.double()[:, :-1], patches.double()[:, 1:], mask)
    exp_text = ref.linear_cross_entropy(hidden.double(), weight.double(), labels)
    assert_close(pixel, exp_pixel, TOLERANCE[torch.float32], "pixel")
    assert_close(text, exp_text, TOLERANCE[torch.float32], "text")
    assert_close(total, 0.4 * exp_pixel + exp_text, TOLERANCE[torch.float32], "total")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(pixel_out, hidden, weight)
    compiled_grads = torch.autograd.grad(compiled[0], (pixel_out, hidden, weight))
    assert calls["patch_mse_fwd"] == 2 and calls["linear_ce"] == 2
    torch.testing.assert_close(compiled[0], total)
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b)


# ---- the poison hook: an output a kernel does not write shows up --------------------------------

class _DropLastProgram:
    """Stands in for a @triton.jit kernel and launches it without the last program of grid axis 0: a
    broken store, as a wrong grid or a wrong loop bound would make one."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        assert grid[0] > 1, "the case needs several programs, so that one can be left out"
        return self.kernel[(grid[0] - 1, *grid[1:])]


def _patch_mse_grad(device):
    pred = torch.randn(4, 33, 588, device=device, requires_grad=True)
    ak.patch_mse_loss(pred, torch.randn(4, 33, 588, device=device)).backward()
    return pred.grad


def _linear_ce_loss(device):
    hidden, weight = torch.randn(37, 16, device=device), torch.randn(50, 16, device=device)
    return ak.linear_cross_entropy(hidden, weight, torch.randint(0, 50, (37,), device=device))


def _rms_norm_out(device):
    return ak.rms_norm(torch.randn(16, 1024, device=device), torch.randn(1024, device=device))


def _swiglu_out(device):
    return ak.swiglu(torch.randn(64, 256, device=device), torch.randn(64, 256, device=device))


BROKEN_STORES = {  # case -> (module, kernel, what runs it and returns the output to look at)
    "patch_mse": ("patch_mse", "_patch_mse_kernel", _patch_mse_grad),
    "linear_ce_rows": ("linear_cross_entropy", "_ce_rows_kernel", _linear_ce_loss),
    "rms_norm_fwd": ("rms_norm", "_rms_norm_fwd_kernel", _rms_norm_out),
    "swiglu_fwd": ("swiglu", "_swiglu_fwd_kernel", _swiglu_out),
}


@pytest.mark.parametrize("case", list(BROKEN_STORES))
def test_poisoned_outputs_show_a_broken_store(spies, device, monkeypatch, case):
    """With poisoning on, a kernel that leaves its last block unwritten yields NaN; the same call with
    the intact kernel is finite. Proves the hook poisons the buffers the kernels write."""
    import importlib

    from aimv2_kernels.triton_backend import common

    module_name, kernel_name, run = BROKEN_STORES[case]
    module = importlib.import_module(f"aimv2_kernels.triton_backend.{module_name}")
    with common.poisoned_outputs():
        assert torch.isfinite(run(device)).all()
    monkeypatch.setattr(module, kernel_name, _DropLastProgram(getattr(module, kernel_name)))
    with common.poisoned_outputs():
        broken = run(device)
    assert torch.isnan(broken).any(), "the elements the broken kernel left unwritten are not NaN"


# ---- GPU: bf16 and real sizes --------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_patch_mse_bf16_real_size(calls):
    B, N, P = 16, 256, 588
    pixel_out = torch.randn(B, N + 1, P, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    patches = torch.randn(B, N + 1, P, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(B, N, device="cuda") > 0.5
    mask[0] = False
    out = ak.patch_mse_loss(pixel_out[:, :-1], patches[:, 1:], mask)
    out.backward()
    expected, (dpred,) = grads64(lambda p: ref.patch_mse_loss(p, patches[:, 1:].double(), mask), pixel_out[:, :-1])
    assert calls["patch_mse_fwd"] == 1 and calls["patch_mse_bwd"] == 1
    assert_close(out, expected, 1e-5, "loss")
    assert_close(pixel_out.grad[:, :-1], dpred, TOLERANCE[torch.bfloat16], "dpred")
    assert torch.equal(out, ak.patch_mse_loss(pixel_out[:, :-1], patches[:, 1:], mask))  # bit-identical rerun


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_linear_ce_real_size(calls, dtype):
    T, D, V = 10_000, 1024, 32000
    hidden = (torch.randn(T, D, device="cuda") * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device="cuda") * 0.05).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device="cuda")
    labels[::7] = -100
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ak.linear_cross_entropy(hidden, weight, labels)
    out.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert calls["ce_rows_triton"] >= 1
    # Bounded by one chunk of logits (float32) and dlogits, the float32 dW accumulator, the gradients
    # themselves and a little slack: no term grows with tokens x vocab.
    size = hidden.element_size()
    chunk = linear_ce_chunks.chunk_tokens(T, V) * V * (4 + (size if dtype != torch.float32 else 0))
    budget = chunk + V * D * (4 + 2 * size) + 3 * T * D * size + 16 * 2**20
    assert extra <= budget, f"peak extra memory {extra / 2**20:.0f} MiB > {budget / 2**20:.0f} MiB"
    expected, grads = grads64(lambda h, w: ref.linear_cross_entropy(h, w, labels), hidden, weight)
    # The same computation by PyTorch at this precision (materialized logits, fp32 cross-entropy):
    # fp16 gradients of a mean over 10^4 tokens sit in fp16's subnormal range (about 1e-6), where
    # no implementation reaches 2e-3; the kernel may be at most twice as far off as PyTorch.
    h_same, w_same = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    torch.nn.functional.cross_entropy((h_same @ w_same.t()).float(), labels, ignore_index=-100).backward()
    tol = TOLERANCE[dtype] if dtype != torch.float32 else 3e-4  # fp32 GEMMs may use tf32
    assert_close(out, expected, tol, "loss")
    assert_close(hidden.grad, grads[0], max(tol, 2 * rel_err(h_same.grad, grads[0])), "dhidden")
    assert_close(weight.grad, grads[1], max(tol, 2 * rel_err(w_same.grad, grads[1])), "dweight")



@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_linear_ce_fp16_gradients_survive_a_loss_scale(spies, device, backend_name):
    """fp16 under a GradScaler: the loss scaled by 2^16, the gradients divided by it after. Mean
    gradients over ~3300 counted tokens with a small weight are about 1e-6, below fp16's normal range
    (6e-5): stored at that scale they would lose most of their bits before the scale reached them. The
    driver keeps them unscaled by 1/n_counted and the backward applies dloss / n_counted once."""
    torch.manual_seed(0)
    T, V, D = 4096, 64, 16
    hidden = torch.randn(T, D, device=device).half().requires_grad_()
    weight = (torch.randn(V, D, device=device) * 0.02).half().requires_grad_()
    bias = (torch.randn(V, device=device) * 0.1).half().requires_grad_()
    labels = torch.randint(0, V, (T,), device=device)
    labels[::5] = -100
    with ak.use_backend(backend_name):
        (ak.linear_cross_entropy(hidden, weight, labels, bias=bias) * 2.0**16).backward()
    _, grads = grads64(lambda h, w, b: ref.linear_cross_entropy(h, w, labels, b), hidden, weight, bias)
    for name, t, g in zip(("dhidden", "dweight", "dbias"), (hidden, weight, bias), grads):
        assert t.grad.dtype == torch.float16
        assert_close(t.grad.double() / 2.0**16, g, TOLERANCE[torch.float16], name)
