"""No (tokens x vocab) logits, ever: the peak memory of forward and backward of the AIMv2 loss stays
within a bound several times smaller than the full float32 logits would take.

Memory is measured where it is spent. A TorchDispatchMode would see each custom op as one call and
never the allocations inside its body, so on the CPU a fresh subprocess runs the step and reports its
peak resident set size (VmHWM, else `ru_maxrss`), and on a GPU `torch.cuda.max_memory_allocated` is read in-process.

The bound follows from the chunk budget `linear_ce_chunks.CHUNK_ELEMENTS` as the parent process sees
it: a few chunks of float32 logits (logits, their gradient, a temporary of the row function) plus
small terms. To see the test catch unchunked logits, run it with AIMV2_TEST_CHUNK_ELEMENTS=1099511627776
(2**40): the steps then use that budget while the bound stays the real one, and every case fails.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import linear_ce_chunks

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

# The child: build the inputs, run one warm-up step on tiny inputs (so that lazily loaded libraries
# and caches are in place), then measure one forward and backward of ak.aimv2_loss. The increase is
# peak RSS after the step minus the current RSS before it: never less than what the step added. The
# peak is reset to the current RSS first ("5" > /proc/self/clear_refs) and read as VmHWM: an earlier
# peak would otherwise count as part of the step, and ru_maxrss cannot be reset and even starts at the
# parent's resident size (Linux carries it across fork and exec: a pytest parent grown to 500 MB made
# a 3 MB step look like 110 MB). Without /proc, ru_maxrss is the fallback.
_CHILD = r"""
import json, os, resource, sys
import torch
import aimv2_kernels as ak
from aimv2_kernels import linear_ce_chunks

backend, tokens, vocab, dim, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if chunk != "default":
    linear_ce_chunks.CHUNK_ELEMENTS = int(chunk)
torch.manual_seed(0)


def step(T, V):
    B, N, P = 2, 9, 48
    pixel_out = torch.randn(B, N + 1, P, requires_grad=True)
    patches = torch.randn(B, N + 1, P)
    mask = torch.rand(B, N) > 0.3
    hidden = torch.randn(T, dim, requires_grad=True)
    weight = (torch.randn(V, dim) * 0.1).requires_grad_()
    labels = torch.randint(0, V, (T,))
    labels[::5] = -100
    return pixel_out, patches, mask, hidden, weight, labels


def run(pixel_out, patches, mask, hidden, weight, labels):
    out = ak.aimv2_loss(pixel_out[:, :-1], patches[:, 1:], mask, hidden, weight, labels)
    out.total.backward()
    assert hidden.grad is not None and weight.grad is not None and pixel_out.grad is not None
    return float(out.text)


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


with ak.use_backend(backend):
    run(*step(8, 16))
    inputs = step(tokens, vocab)
    reset_peak()
    before, peak_before = rss_now(), peak()
    text = run(*inputs)
    after = peak()
    ran = ak.backend.resolve("linear_ce", torch.device("cpu"))[0]
print(json.dumps({"increase": after - before, "headroom": peak_before - before, "text": text,
                  "chunk_elements": linear_ce_chunks.CHUNK_ELEMENTS, "backend": ran}))
"""


def _chunk_override(default):
    """The budget the child applies: the test's own, unless AIMV2_TEST_CHUNK_ELEMENTS overrides it (to
    see the test fail with unchunked logits)."""
    return os.environ.get("AIMV2_TEST_CHUNK_ELEMENTS", default)


def _measure_cpu(backend, tokens, vocab, dim, chunk, env=None):
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, backend, str(tokens), str(vocab), str(dim), str(_chunk_override(chunk))],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# backend, tokens, vocab, chunk budget (elements; "default": the module's), slack. The torch case runs
# the real default budget at 2 GiB of full logits; the triton case runs the real kernel in Triton's
# interpreter (explicitly, also on a GPU machine), so it is smaller and its budget too.
CPU_CASES = {
    "torch": ("torch", 16384, 32768, "default", 16 * MiB),
    "triton-interpreter": ("triton", 512, 16384, 1 << 18, 6 * MiB),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_peak_memory_stays_within_a_few_logits_chunks(case):
    backend, tokens, vocab, chunk, slack = CPU_CASES[case]
    chunk_elements = linear_ce_chunks.CHUNK_ELEMENTS if chunk == "default" else chunk
    dim = 8
    bound = 2.25 * chunk_elements * 4 + 4 * (tokens + vocab) * dim * 4 + slack
    full_logits = tokens * vocab * 4
    assert full_logits >= 3 * bound, "the full logits must be several times the bound, or the test shows nothing"
    env = {"TRITON_INTERPRET": "1"} if backend == "triton" else {}
    result = _measure_cpu(backend, tokens, vocab, dim, chunk, env)
    assert result["backend"] == backend, f"the child ran {result['backend']}, not {backend}"
    assert result["increase"] <= bound, (
        f"peak RSS grew by {result['increase'] / MiB:.1f} MiB during the step, over the bound of "
        f"{bound / MiB:.1f} MiB (full logits {full_logits / MiB:.0f} MiB; the child's budget was "
        f"{result['chunk_elements']} elements; headroom below the earlier peak {result['headroom'] / MiB:.1f} MiB)")
    assert 0 < result["text"] < 20


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_peak_memory_stays_within_a_few_logits_chunks(monkeypatch, backend):
    tokens, vocab, dim = 16384, 32768, 64
    chunk_bytes = linear_ce_chunks.CHUNK_ELEMENTS * 4
    size = 2  # bf16
    # Up to four chunks: the logits, their bf16 gradient and the row function's temporaries (the torch
    # rows' logsumexp may hold two), plus the float32 dW, the gradients and cuBLAS workspace.
    bound = 4 * chunk_bytes + 4 * vocab * dim * 4 + 4 * tokens * dim * size + 48 * MiB
    full_logits = tokens * vocab * 4
    assert full_logits >= 3 * bound
    monkeypatch.setattr(linear_ce_chunks, "CHUNK_ELEMENTS", int(_chunk_override(linear_ce_chunks.CHUNK_ELEMENTS)))
    B, N, P = 2, 9, 48
    pixel_out = torch.randn(B, N + 1, P, device="cuda", requires_grad=True)
    patches = torch.randn(B, N + 1, P, device="cuda")
    mask = torch.rand(B, N, device="cuda") > 0.3
    hidden = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, dim, device="cuda") * 0.1).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[::5] = -100
    with ak.use_backend(backend):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = ak.aimv2_loss(pixel_out[:, :-1], patches[:, 1:], mask, hidden, weight, labels)
        out.total.backward()
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert hidden.grad is not None and weight.grad is not None
    assert extra <= bound, f"peak extra memory {extra / MiB:.0f} MiB > {bound / MiB:.0f} MiB (full logits {full_logits / MiB:.0f} MiB)"
