"""How the "cuda" backend's attention picks its compiled path, and when it hands a call on.

On any machine: the build plumbing (CuTe headers found, Hopper built as sm_90a) and the input rules
(dtype, head dim, 16-byte rows). On a GPU: the public op under ak.use_backend("cuda") runs the
compiled kernels, forward and backward, against the float64 reference, and falls back with one
warning for what they do not take. The kernels' own edge cases: tests/test_cuda_attention*.py.
"""
import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import backend, cuda_ext
from aimv2_kernels import reference as ref
from helpers import assert_close


# ---- any machine ------------------------------------------------------------------------------------

def test_cutlass_headers_are_found_and_can_be_overridden(monkeypatch, tmp_path):
    (include,) = cuda_ext.cutlass_include_dirs()
    assert (__import__("pathlib").Path(include) / "cute" / "tensor.hpp").is_file()
    monkeypatch.setenv(cuda_ext.CUTLASS_DIR_ENV, str(tmp_path))
    with pytest.raises(cuda_ext.CutlassNotFound, match="no include/cute"):
        cuda_ext.cutlass_include_dirs()
    (tmp_path / "include" / "cute").mkdir(parents=True)
    assert cuda_ext.cutlass_include_dirs() == [str(tmp_path / "include")]


def test_first_use_build_targets_sm_90a_on_hopper(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert cuda_ext.jit_arch_list() == "9.0a"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert cuda_ext.jit_arch_list() == "8.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    assert cuda_ext.jit_arch_list() == "8.0;9.0a"


def test_inputs_the_compiled_attention_does_not_take():
    from aimv2_kernels.cuda_attention import unsupported_reason

    q = torch.randn(2, 3, 8, 64, dtype=torch.bfloat16)
    assert "float16 and bfloat16" in unsupported_reason(q.float(), q.float(), q.float())
    small = torch.randn(2, 3, 8, 32, dtype=torch.bfloat16)
    assert "head dims (64, 128)" in unsupported_reason(small, small, small)
    odd = torch.randn(2, 8, 3, 65, dtype=torch.bfloat16)[..., :64].transpose(1, 2)  # rows 130 bytes apart
    assert "16-byte" in unsupported_reason(odd, odd, odd)


# ---- GPU ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_attention():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert ak.unavailable_reason("cuda") is None, ak.unavailable_reason("cuda")
    if "cuda" not in backend._REGISTRY["attention_fwd"]:
        pytest.fail("the cuda backend loaded without its attention kernels")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S,prefix", [(67, [0, 5]), (256, [1, 255]), (130, None)])
def test_public_op_runs_the_compiled_kernels(cuda_attention, dtype, D, S, prefix):
    device = cuda_attention
    qkv = torch.randn(2, S, 3, 3, D, device=device, dtype=dtype, requires_grad=True)  # packed projection
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    prefix_t = None if prefix is None else torch.tensor(prefix, device=device)
    with ak.use_backend("cuda"):
        assert backend.resolve("attention_fwd", device)[0] == "cuda"
        out = ak.prefix_causal_attention(q, k, v, prefix_t)
        dout = torch.randn_like(out)
        (dqkv,) = torch.autograd.grad(out, qkv, dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = ref.prefix_causal_attention(q64, k64, v64, prefix_t)
    grads = torch.autograd.grad(expected, (q64, k64, v64), dout.double())
    assert_close(out, expected, 2e-2, "out")
    for i, name in enumerate("qkv"):
        assert_close(dqkv[:, :, i].transpose(1, 2), grads[i], 3e-2, f"d{name}")


@pytest.mark.gpu
def test_unsupported_inputs_fall_back_with_one_warning(cuda_attention):
    q = torch.randn(1, 2, 33, 32, device=cuda_attention, dtype=torch.bfloat16)  # head dim 32
    with ak.use_backend("cuda"), pytest.warns(UserWarning, match="head dims"):
        out = ak.prefix_causal_attention(q, q, q, 4)
    assert_close(out, ref.prefix_causal_attention(q.double(), q.double(), q.double(), torch.tensor([4], device=q.device)),
                 2e-2, "fallback out")
