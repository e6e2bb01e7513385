"""The "cuda" backend's linear cross-entropy: the chunk driver (cuBLAS GEMMs) with the compiled rows op
`torch.ops.aimv2_kernels.cuda_ce_rows` (csrc/cross_entropy.cu), against the float64 reference.

On a CPU machine only the schema test runs. On a GPU: `ak.linear_cross_entropy` and `ak.aimv2_loss`
in fp32/fp16/bf16 at odd vocabularies (both kernel shapes: a warp per row up to V = 1024, a block per
row past it), with bias, ignored, all-ignored and strided labels, forward and gradients; the rows op
called directly (in place, into a separate fp16/bf16/fp32 buffer, loss only; strided and misaligned
rows; strided bias) against `ce_rows_torch` in float64; determinism; the device assert on a label out
of range; clear errors; `opcheck`. Every output the launcher writes in full starts as NaN bytes
(AIMV2_KERNELS_POISON_OUTPUTS), so an element the kernel forgets to write fails the comparison.

That the source compiles for sm_80/sm_90 without spills is checked by scripts/check_cuda_sources.sh.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE, assert_close, check_linear_ce, device_memsets, grads64, rel_err

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels import reference as ref
from aimv2_kernels import linear_ce_chunks
from aimv2_kernels.linear_ce_chunks import ce_rows_torch

REPO = Path(__file__).resolve().parent.parent
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Both kernel shapes and their edges (a warp per row up to 1024 columns), pack tails, odd sizes.
VOCABS = (1, 7, 259, 1024, 1025, 4099, 32003)

pytestmark = pytest.mark.usefixtures("poisoned_cuda_outputs")  # tests/conftest.py: outputs start as NaN


# ---- CPU: the op's schema ------------------------------------------------------------------------

def _ce_rows_schema() -> str:
    """The schema string of cuda_ce_rows as csrc/bindings.cpp defines it (adjacent literals joined)."""
    text = (REPO / "csrc" / "bindings.cpp").read_text()
    call = re.search(r'm\.def\(\s*("cuda_ce_rows\(.*?)\);', text, re.S)
    assert call is not None, "bindings.cpp defines no cuda_ce_rows"
    return "".join(re.findall(r'"([^"]*)"', call.group(1)))


def test_ce_rows_schema_declares_what_it_writes():
    """logits (scratch, and dlogits_out's alias), loss_out and dlogits_out are the written arguments;
    nothing else is, and nothing is returned (torch.compile and opcheck rely on the declaration)."""
    schema = torch._C.parse_schema("aimv2_kernels::" + _ce_rows_schema())
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert [a.name for a in schema.arguments] == ["logits", "bias", "labels", "ignore_index", "scale", "loss_out",
                                                  "dlogits_out"]
    assert written == {"logits", "loss_out", "dlogits_out"}
    assert len(schema.returns) == 0


# ---- GPU ---------------------------------------------------------------------------------------------

# `cuda_backend` (tests/conftest.py): the backend's device, which must load on a GPU machine.
needs_gpu = pytest.mark.gpu


@pytest.fixture
def rows_calls(cuda_backend, monkeypatch):
    """Under the "cuda" backend; a list that grows by one entry per call of the compiled rows op."""
    from aimv2_kernels import cuda_backend as impl

    calls = []
    original = impl._ce_rows_cuda

    def spy(*args):
        calls.append(tuple(args[0].shape))
        return original(*args)

    monkeypatch.setattr(impl, "_ce_rows_cuda", spy)
    with ak.use_backend("cuda"):
        assert backend.resolve("linear_ce", cuda_backend)[0] == "cuda"
        yield calls


def _labels(tokens, vocab, device, dtype=torch.int64):
    labels = torch.randint(0, vocab, (tokens,), device=device, dtype=dtype)
    labels[torch.rand(tokens, device=device) < 0.25] = -100
    if tokens > 3:
        labels[1] = -100
        labels[2] = 0  # the first and the last column as targets
        labels[3] = vocab - 1
    return labels


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_ce_matches_reference(rows_calls, dtype, vocab, with_bias):
    check_linear_ce(torch.device("cuda"), 37, vocab, 64, dtype, with_bias, _labels)
    assert len(rows_calls) == 1


@needs_gpu
@pytest.mark.parametrize("vocab", [1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ce_many_token_chunks(rows_calls, monkeypatch, vocab, dtype):
    """A tiny logits budget: 8 tokens per chunk at V = 1000, 1 at 4099 (dW summed over 300 chunks)."""
    monkeypatch.setattr(linear_ce_chunks, "CHUNK_ELEMENTS", 1 << 13)
    check_linear_ce(torch.device("cuda"), 300, vocab, 64, dtype, vocab == 1000, _labels)
    assert len(rows_calls) == -(-300 // linear_ce_chunks.chunk_tokens(300, vocab)) > 1


@needs_gpu
@pytest.mark.parametrize("ignore_index", [-100, 0])
@pytest.mark.parametrize("vocab", [11, 2000])
def test_linear_ce_all_ignored_is_zero_with_zero_gradients(rows_calls, ignore_index, vocab):
    hidden = torch.randn(2, 5, 16, device="cuda", requires_grad=True)
    weight = torch.randn(vocab, 16, device="cuda", requires_grad=True)
    bias = torch.randn(vocab, device="cuda", requires_grad=True)
    labels = torch.full((2, 5), ignore_index, device="cuda")
    out = ak.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
    out.backward()
    assert len(rows_calls) == 1
    assert out.item() == 0.0
    for t in (hidden, weight, bias):
        assert torch.isfinite(t.grad).all() and t.grad.abs().max() == 0


@needs_gpu
@pytest.mark.parametrize("vocab", [50, 3001])
def test_linear_ce_strided_int32_labels_strided_bias_and_dloss(rows_calls, vocab):
    """labels[:, ::2] of an int32 (B, 2T) tensor and a bias with stride 2 are read in place (the bias
    stride keeps the kernel on single-column loads); d loss = 2.5."""
    hidden = torch.randn(3, 9, 24, device="cuda", requires_grad=True)
    weight = torch.randn(vocab, 24, device="cuda", requires_grad=True)
    bias_wide = torch.randn(2 * vocab, device="cuda")
    bias = bias_wide[::2].requires_grad_()
    wide = torch.randint(0, vocab, (3, 18), dtype=torch.int32, device="cuda")
    labels = wide[:, ::2]
    labels[0, :4] = 7
    labels[2, 3] = -5
    assert labels.stride() == (18, 2)
    out = ak.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=-5)
    (2.5 * out).backward()
    expected, grads = grads64(lambda h, w, b: 2.5 * ref.linear_cross_entropy(h, w, labels.long(), b, -5),
                               hidden, weight, bias)
    assert len(rows_calls) == 1
    tol = TOLERANCE[torch.float32]
    assert_close(2.5 * out, expected, tol, "loss")
    assert_close(hidden.grad, grads[0], tol, "dhidden")
    assert_close(weight.grad, grads[1], tol, "dweight")
    assert_close(bias.grad, grads[2], tol, "dbias")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_aimv2_loss_matches_reference(rows_calls, dtype):
    B, N, P, T, D, V = 2, 6, 48, 5, 32, 1037
    pixel_out = torch.randn(B, N + 1, P, device="cuda").to(dtype).requires_grad_()
    patches = torch.randn(B, N + 1, P, device="cuda").to(dtype)
    mask = torch.rand(B, N, device="cuda") > 0.3
    hidden = torch.randn(B, T, D, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device="cuda") * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, -1] = -100
    out = ak.aimv2_loss(pixel_out[:, :-1], patches[:, 1:], mask, hidden, weight, labels)
    out.total.backward()

    def total64(po, h, w):
        pixel = ref.patch_mse_loss(po[:, :-1], patches[:, 1:].double(), mask)
        return 0.4 * pixel + ref.linear_cross_entropy(h, w, labels)

    expected, grads = grads64(total64, pixel_out, hidden, weight)
    assert len(rows_calls) == 1
    tol = TOLERANCE[dtype]
    assert_close(out.total, expected, max(tol, 1e-5), "total")
    assert_close(out.text, ref.linear_cross_entropy(hidden.double(), weight.double(), labels), 1e-5, "text")
    assert_close(pixel_out.grad, grads[0], tol, "dpixel")
    assert_close(hidden.grad, grads[1], tol, "dhidden")
    assert_close(weight.grad, grads[2], tol, "dweight")


@needs_gpu
def test_linear_ce_float64_uses_the_reference_rows_with_one_warning(rows_calls):
    from aimv2_kernels import cuda_backend as impl

    impl._warned.discard(("linear_ce", torch.float64))
    hidden = torch.randn(7, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    labels = torch.tensor([0, 8, -100, 3, 3, 1, 2], device="cuda")
    with pytest.warns(UserWarning, match="float64"):
        out = ak.linear_cross_entropy(hidden, weight, labels)
    out.backward()
    expected, grads = grads64(lambda h, w: ref.linear_cross_entropy(h, w, labels), hidden, weight)
    assert rows_calls == [] and out.dtype == torch.float64
    assert_close(out, expected, 1e-12, "loss")
    assert_close(hidden.grad, grads[0], 1e-12, "dhidden")


@needs_gpu
def test_gpu_linear_ce_bf16_real_size(rows_calls):
    """The AIMv2 text head: 10k tokens, D 1024, V 32000 (1024-token chunks), bf16."""
    T, D, V = 10_000, 1024, 32000
    hidden = (torch.randn(T, D, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, D, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (T,), device="cuda")
    labels[::7] = -100
    out = ak.linear_cross_entropy(hidden, weight, labels)
    out.backward()
    assert len(rows_calls) == -(-T // linear_ce_chunks.chunk_tokens(T, V))
    expected, grads = grads64(lambda h, w: ref.linear_cross_entropy(h, w, labels), hidden, weight)
    # The same computation by PyTorch at this precision (see test_loss_triton's real-size test).
    h_same, w_same = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    torch.nn.functional.cross_entropy((h_same @ w_same.t()).float(), labels, ignore_index=-100).backward()
    tol = TOLERANCE[torch.bfloat16]
    assert_close(out, expected, tol, "loss")
    assert_close(hidden.grad, grads[0], max(tol, 2 * rel_err(h_same.grad, grads[0])), "dhidden")
    assert_close(weight.grad, grads[1], max(tol, 2 * rel_err(w_same.grad, grads[1])), "dweight")


# ---- the rows op, called directly ----------------------------------------------------------------------

def _logits(c, vocab, layout, device):
    """(c, V) float32: contiguous, rows of a wider buffer (row stride V + 4), or those rows one element
    in (every row off the 16-byte grid: the single-column path)."""
    if layout == "contiguous":
        return torch.randn(c, vocab, device=device) * 3
    wide = torch.randn(c, vocab + 5, device=device) * 3
    start = 0 if layout == "strided" else 1
    return wide[:, start:start + vocab]


def _rows_reference(logits, bias, labels, ignore_index, scale):
    """ce_rows_torch in float64: (loss, dlogits)."""
    x = logits.double().clone()
    loss = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    ce_rows_torch(x, bias.double() if bias is not None else None, labels, ignore_index, scale.double(), loss, x)
    return loss, x


def _run_rows(logits, bias, labels, scale, mode, ignore_index=-100):
    """Calls the op; returns (loss_out, dlogits or None). mode: "in_place", "loss_only", or the
    dtype name of a separate dlogits buffer."""
    loss = torch.empty(logits.shape[0], device=logits.device)
    if mode == "in_place":
        dlogits = logits
    elif mode == "loss_only":
        dlogits = None
    else:
        dlogits = torch.empty(logits.shape, dtype=getattr(torch, mode), device=logits.device)
    torch.ops.aimv2_kernels.cuda_ce_rows(logits, bias, labels, ignore_index, scale, loss, dlogits)
    return loss, dlogits


ROW_MODES = ["in_place", "loss_only", "float32", "bfloat16", "float16"]


@needs_gpu
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("mode", ROW_MODES)
def test_ce_rows_against_torch_rows(cuda_backend, vocab, mode):
    c = 45
    logits = _logits(c, vocab, "contiguous", cuda_backend)
    labels = _labels(c, vocab, cuda_backend)
    scale = torch.tensor(1 / 31, device=cuda_backend)
    exp_loss, exp_d = _rows_reference(logits, None, labels, -100, scale)
    before = logits.clone()
    loss, dlogits = _run_rows(logits, None, labels, scale, mode)
    assert_close(loss, exp_loss, 1e-5, "loss")
    if mode == "loss_only":
        assert torch.equal(logits, before)  # without dlogits_out the logits are only read
        return
    if mode == "in_place":
        assert dlogits is logits
    else:
        assert torch.equal(logits, before)
    assert_close(dlogits, exp_d, TOLERANCE[dlogits.dtype], "dlogits")
    assert dlogits[labels == -100].abs().max() == 0  # labels[1] at least


@needs_gpu
@pytest.mark.parametrize("vocab", [259, 4099, 32003])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
@pytest.mark.parametrize("bias_kind", ["none", "float32", "bfloat16", "strided"])
@pytest.mark.parametrize("mode", ["in_place", "bfloat16"])
def test_ce_rows_layouts_bias_and_strided_labels(cuda_backend, vocab, layout, bias_kind, mode):
    c = 29
    logits = _logits(c, vocab, layout, cuda_backend)
    bias = {"none": None,
            "float32": torch.randn(vocab, device=cuda_backend),
            "bfloat16": torch.randn(vocab, device=cuda_backend).to(torch.bfloat16),
            "strided": torch.randn(3 * vocab, device=cuda_backend)[::3]}[bias_kind]
    labels = _labels(2 * c, vocab, cuda_backend, dtype=torch.int32)[::2]  # stride 2
    scale = torch.tensor(0.125, device=cuda_backend)
    exp_loss, exp_d = _rows_reference(logits, bias, labels.long(), -100, scale)
    loss, dlogits = _run_rows(logits, bias, labels, scale, mode)
    assert_close(loss, exp_loss, 1e-5, "loss")
    assert_close(dlogits, exp_d, TOLERANCE[dlogits.dtype], "dlogits")


@needs_gpu
def test_ce_rows_strided_loss_out(cuda_backend):
    logits = torch.randn(9, 300, device=cuda_backend)
    labels = _labels(9, 300, cuda_backend)
    scale = torch.tensor(0.5, device=cuda_backend)
    exp_loss, exp_d = _rows_reference(logits, None, labels, -100, scale)
    wide = torch.full((9, 2), 7.0, device=cuda_backend)
    torch.ops.aimv2_kernels.cuda_ce_rows(logits, None, labels, -100, scale, wide[:, 0], logits)
    assert_close(wide[:, 0], exp_loss, 1e-5, "loss")
    assert torch.equal(wide[:, 1], torch.full((9,), 7.0, device=cuda_backend))
    assert_close(logits, exp_d, 1e-5, "dlogits")


@needs_gpu
@pytest.mark.parametrize("vocab", [300, 5000])
def test_ce_rows_ignored_rows_are_not_read(cuda_backend, vocab):
    """An ignored row gets loss 0 and zeros without its logits being read: NaN there stays out."""
    logits = torch.randn(4, vocab, device=cuda_backend)
    labels = torch.tensor([3, -100, 0, -100], device=cuda_backend)
    logits[1] = float("nan")
    logits[3, 5] = float("inf")
    loss, dlogits = _run_rows(logits, None, labels, torch.tensor(0.5, device=cuda_backend), "in_place")
    assert loss[1] == 0 and loss[3] == 0 and torch.isfinite(loss).all()
    assert dlogits[1].abs().max() == 0 and dlogits[3].abs().max() == 0
    assert torch.isfinite(dlogits).all()


@needs_gpu
def test_ce_rows_are_bit_identical_across_runs(cuda_backend):
    logits = torch.randn(64, 32000, device=cuda_backend) * 4
    labels = _labels(64, 32000, cuda_backend)
    scale = torch.tensor(1 / 48, device=cuda_backend)
    first = _run_rows(logits.clone(), None, labels, scale, "bfloat16")
    for _ in range(3):
        again = _run_rows(logits.clone(), None, labels, scale, "bfloat16")
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@needs_gpu
def test_ce_rows_bad_input_is_a_clear_error(cuda_backend):
    ops = torch.ops.aimv2_kernels
    dev = cuda_backend
    x = torch.randn(4, 8, device=dev)
    y = torch.tensor([1, 2, -100, 7], device=dev)
    s = torch.tensor(0.25, device=dev)
    loss = torch.empty(4, device=dev)
    with pytest.raises(RuntimeError, match="ce_rows: logits must be float32"):
        ops.cuda_ce_rows(x.half(), None, y, -100, s, loss, None)
    with pytest.raises(RuntimeError, match="ce_rows: logits must have contiguous rows"):
        ops.cuda_ce_rows(torch.randn(8, 4, device=dev).t(), None, y, -100, s, loss, None)
    with pytest.raises(RuntimeError, match="ce_rows: labels must be int64 or int32"):
        ops.cuda_ce_rows(x, None, y.float(), -100, s, loss, None)
    with pytest.raises(RuntimeError, match="ce_rows: labels must have shape"):
        ops.cuda_ce_rows(x, None, y[:3], -100, s, loss, None)
    with pytest.raises(RuntimeError, match="ce_rows: bias must have shape"):
        ops.cuda_ce_rows(x, torch.randn(9, device=dev), y, -100, s, loss, None)
    with pytest.raises(RuntimeError, match="ce_rows: scale must be a float32 scalar"):
        ops.cuda_ce_rows(x, None, y, -100, s.double(), loss, None)
    with pytest.raises(RuntimeError, match="ce_rows: loss_out must be float32"):
        ops.cuda_ce_rows(x, None, y, -100, s, loss.half(), None)
    with pytest.raises(RuntimeError, match="ce_rows: dlogits_out must have shape"):
        ops.cuda_ce_rows(x, None, y, -100, s, loss, torch.empty(4, 9, device=dev))
    buf = torch.randn(5, 8, device=dev)
    with pytest.raises(RuntimeError, match="ce_rows: dlogits_out must be logits itself"):
        ops.cuda_ce_rows(buf[:4], None, y, -100, s, loss, buf[1:])
    with pytest.raises(RuntimeError, match="ce_rows: loss_out must not overlap logits"):
        ops.cuda_ce_rows(x, None, y, -100, s, x[0, :4], None)


_OUT_OF_RANGE_LABEL = textwrap.dedent("""
    import sys
    import torch
    import aimv2_kernels as ak

    assert ak.unavailable_reason("cuda") is None
    vocab = int(sys.argv[1])
    logits = torch.randn(4, vocab, device="cuda")
    labels = torch.tensor([1, vocab, -100, 2], device="cuda")
    loss = torch.empty(4, device="cuda")
    torch.ops.aimv2_kernels.cuda_ce_rows(logits, None, labels, -100, torch.tensor(0.25, device="cuda"), loss, logits)
    torch.cuda.synchronize()
    print("no error")
""")


@needs_gpu
@pytest.mark.parametrize("vocab", [300, 3000])
def test_ce_rows_out_of_range_label_is_a_device_assert(cuda_backend, vocab):
    """A label that is neither ignore_index nor in [0, V) traps (a device-side assert; in a child
    process, as it leaves the CUDA context unusable) instead of reading outside the row."""
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_RANGE_LABEL, str(vocab)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "AIMV2_KERNELS_POISON_OUTPUTS": "0"})
    assert proc.returncode != 0 and "no error" not in proc.stdout, proc.stdout + proc.stderr
    assert "device-side assert" in proc.stderr, proc.stderr[-3000:]


@needs_gpu
def test_opcheck_ce_rows(cuda_backend):
    dev = cuda_backend
    ops = torch.ops.aimv2_kernels
    labels = torch.tensor([0, 33, -100, 12, 5], device=dev)
    scale = torch.tensor(0.25, device=dev)
    for vocab in (40, 2000):
        x = torch.randn(5, vocab, device=dev)
        b = torch.randn(vocab, device=dev, dtype=torch.bfloat16)
        cases = [
            (x, None, labels, -100, scale, torch.empty(5, device=dev), torch.empty(5, vocab, device=dev)),
            (x, b, labels.int(), -100, scale, torch.empty(5, device=dev),
             torch.empty(5, vocab, device=dev, dtype=torch.bfloat16)),
            (x, b, labels, -100, scale, torch.empty(5, device=dev), None),
        ]
        for args in cases:
            torch.library.opcheck(ops.cuda_ce_rows, args)
        aliased = x.clone()
        torch.library.opcheck(ops.cuda_ce_rows,
                              (aliased, None, labels, -100, scale, torch.empty(5, device=dev), aliased))


@needs_gpu
def test_opcheck_public_linear_ce_on_the_cuda_backend(rows_calls):
    dev = torch.device("cuda")
    hidden = torch.randn(6, 3, 16, device=dev, requires_grad=True)
    weight = torch.randn(1500, 16, device=dev, requires_grad=True)
    bias = torch.randn(1500, device=dev, requires_grad=True)
    labels = torch.randint(0, 1500, (6, 3), device=dev)
    labels[0, 0] = -100
    torch.library.opcheck(torch.ops.aimv2_kernels.linear_cross_entropy,
                          (hidden, weight, labels, bias, -100, True, True))
    assert rows_calls


@needs_gpu
@pytest.mark.parametrize("mode", ["float32", "in_place"])
def test_poison_hook_fills_the_outputs_written_in_full(cuda_backend, monkeypatch, mode):
    """loss_out and a separate dlogits_out are filled with NaN bytes before the kernel (one memset
    each); logits used in place are not (the kernel reads them first)."""
    logits = torch.randn(37, 203, device=cuda_backend)
    labels = _labels(37, 203, cuda_backend)
    scale = torch.tensor(0.5, device=cuda_backend)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        loss, dlogits = _run_rows(logits, None, labels, scale, mode)
        torch.cuda.synchronize()
    memsets = device_memsets(prof)
    assert len(memsets) == (2 if mode == "float32" else 1), [e.name for e in prof.events()]
    assert torch.isfinite(loss).all() and torch.isfinite(dlogits).all()
