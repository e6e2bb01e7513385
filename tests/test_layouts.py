"""Every public op gives the reference's answer for any layout of every argument it accepts.

One table drives one test: for each op, how to make its (small, odd-shaped, random) inputs, how to
call it and its float64 reference, and which arguments need a unit last stride. The test replaces
one argument at a time by the same values in another layout:

  strided     a view of a larger tensor, every dim strided by 2 and a storage offset (a unit last
              stride kept where the API requires one); the rest of the larger tensor holds other
              random values, so reading by element index instead of by stride gives a wrong answer
  evenly_spaced  every other element of a larger flat tensor, from an offset: one stride of 2 for
              the whole tensor, as `big[:, ::2]` of a (B, 2T) tensor (its reshape(-1) is a view)
  transposed  a non-contiguous copy: two dims swapped in memory (leading dims only where the last
              must stay contiguous)
  expanded    stride 0 in one dim (a (B,) prefix expanded from a scalar, a mask or labels shared
              by every sample, a weight constant along D); the values are the first slice's

and compares forward and backward on every backend that runs here (torch, triton: the interpreter
on the CPU; cuda as well on a GPU) to the float64 reference, by relative error and per element.
Gradients are taken with respect to the tensor the layout was made from (the larger tensor, the
scalar that was expanded), so they also check that nothing is written outside the view.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels import reference as ref

BACKENDS = ("torch", "triton", "cuda")
LAYOUTS = ("strided", "evenly_spaced", "transposed", "expanded")
REL_TOL = 3e-5  # fp32 kernels against float64 (SPEC section 5: fp32 near 1e-5)
ELEMENT_TOL = 1e-4  # per element, relative to the largest expected magnitude: a wrong row fails
# Least magnitude the errors are measured against. Every real gradient here has a norm above 0.05;
# the one exception is exactly 0 (a bias expanded from a scalar shifts all logits alike), where
# rounding must stay below 3e-7 in norm and 1e-6 per element.
FLOOR = 1e-2
IGNORE = -100
V = 37  # vocabulary of the cross-entropy cases


# ---- random inputs -------------------------------------------------------------------------------

def _floats(shape, device):
    return torch.randn(shape, device=device)


def _labels(shape, device):
    """Valid labels with about one in six ignored."""
    labels = torch.randint(0, V, shape, device=device)
    return labels.masked_fill(torch.rand(shape, device=device) < 0.17, IGNORE)


def _mask(shape, device):
    return torch.rand(shape, device=device) < 0.6


def _prefix(S):
    def make(shape, device):
        return torch.randint(1, S, shape, device=device)  # 1..S-1: neither plain causal nor all visible
    return make


@dataclasses.dataclass(frozen=True)
class Arg:
    shape: tuple[int, ...]
    make: Callable = _floats  # (shape, device) -> random values (also the filler of larger tensors)
    grad: bool = False
    unit_last_stride: bool = False  # the API requires a contiguous last dim
    # The dim `expanded` repeats. A (V, D) weight repeats along D: repeated vocab rows would give
    # every class the same logit, and every gradient would be 0.
    expand_dim: int = 0


@dataclasses.dataclass(frozen=True)
class OpCase:
    args: dict[str, Arg]
    call: Callable  # (**args) -> tuple of outputs, on the backend under test
    reference: Callable  # (**args in float64) -> tuple of outputs


def _aimv2_reference(pixel_pred, patches, patch_mask, text_hidden, text_weight, labels):
    pixel = ref.patch_mse_loss(pixel_pred, patches, patch_mask)
    text = ref.linear_cross_entropy(text_hidden, text_weight, labels, ignore_index=IGNORE)
    return 0.4 * pixel + text, pixel, text


ATTN = (3, 2, 13, 16)  # (B, H, S, D): D = 16 is the smallest head dim the kernels take
ROWS = (3, 5, 37)

OPS = {
    "rms_norm": OpCase(
        {"x": Arg(ROWS, grad=True), "weight": Arg((37,), grad=True)},
        lambda x, weight: (ak.rms_norm(x, weight),),
        lambda x, weight: (ref.rms_norm(x, weight),)),
    "rms_norm_residual": OpCase(
        {"x": Arg(ROWS, grad=True), "residual": Arg(ROWS, grad=True), "weight": Arg((37,), grad=True)},
        lambda x, residual, weight: ak.rms_norm_residual(x, residual, weight),
        lambda x, residual, weight: ref.rms_norm_residual(x, residual, weight)),
    "swiglu": OpCase(
        {"gate": Arg(ROWS, grad=True), "up": Arg(ROWS, grad=True)},
        lambda gate, up: (ak.swiglu(gate, up),),
        lambda gate, up: (ref.swiglu(gate, up),)),
    "swiglu_packed": OpCase(
        {"x": Arg((3, 5, 74), grad=True)},
        lambda x: (ak.swiglu_packed(x),),
        lambda x: (ref.swiglu_packed(x),)),
    "prefix_causal_attention": OpCase(
        {**{n: Arg(ATTN, grad=True, unit_last_stride=True) for n in "qkv"},
         "prefix_len": Arg(ATTN[:1], make=_prefix(ATTN[2]))},
        lambda q, k, v, prefix_len: (ak.prefix_causal_attention(q, k, v, prefix_len),),
        lambda q, k, v, prefix_len: (ref.prefix_causal_attention(q, k, v, prefix_len),)),
    "patch_mse_loss": OpCase(
        {"pred": Arg((3, 7, 13), grad=True), "target": Arg((3, 7, 13)), "mask": Arg((3, 7), make=_mask)},
        lambda pred, target, mask: (ak.patch_mse_loss(pred, target, mask),),
        lambda pred, target, mask: (ref.patch_mse_loss(pred, target, mask),)),
    "linear_cross_entropy": OpCase(
        {"hidden": Arg((3, 7, 24), grad=True), "weight": Arg((V, 24), grad=True, expand_dim=1),
         "labels": Arg((3, 7), make=_labels), "bias": Arg((V,), grad=True)},
        lambda hidden, weight, labels, bias: (ak.linear_cross_entropy(hidden, weight, labels, bias=bias),),
        lambda hidden, weight, labels, bias: (ref.linear_cross_entropy(hidden, weight, labels, bias),)),
    "aimv2_loss": OpCase(
        {"pixel_pred": Arg((3, 7, 13), grad=True), "patches": Arg((3, 7, 13)), "patch_mask": Arg((3, 7), make=_mask),
         "text_hidden": Arg((3, 5, 24), grad=True), "text_weight": Arg((V, 24), grad=True, expand_dim=1),
         "labels": Arg((3, 5), make=_labels)},
        lambda **a: tuple(ak.aimv2_loss(**a)),
        _aimv2_reference),
}


# ---- layouts -------------------------------------------------------------------------------------
# Each returns (source, view): `view(source)` has the values of `t` in the layout; gradients are
# compared on `source`. `applies` says which layouts an argument can take.

def strided(t: torch.Tensor, arg: Arg, device):
    """Every dim of a larger random tensor strided by 2 from index 1 (a storage offset); a required
    unit last stride is kept, the last dim then starting at offset 2 of a wider row."""
    index, big_shape = [], []
    for dim, size in enumerate(t.shape):
        if arg.unit_last_stride and dim == t.dim() - 1:
            index.append(slice(2, 2 + size))
            big_shape.append(size + 3)
        else:
            index.append(slice(1, 1 + 2 * size, 2))
            big_shape.append(2 * size + 1)
    big = arg.make(tuple(big_shape), device)
    big[tuple(index)] = t
    return big, lambda source: source[tuple(index)]


def evenly_spaced(t: torch.Tensor, arg: Arg, device):
    """Every other element of a flat random tensor from index 1, viewed as t's shape: the dims merge
    into one stride of 2, so `reshape(-1)` of it is a view, not a copy (where an index-based read
    goes wrong). Not for arguments that need a unit last stride (`strided` covers those)."""
    flat = arg.make((2 * t.numel() + 1,), device)
    flat[1::2] = t.reshape(-1)
    return flat, lambda source: source[1::2].view(t.shape)


def _swappable_dims(arg: Arg) -> list[int]:
    """Dims of size > 1 that may move in memory (all but a required unit-stride last dim)."""
    movable = len(arg.shape) - 1 if arg.unit_last_stride else len(arg.shape)
    return [d for d in range(movable) if arg.shape[d] > 1]


def transposed(t: torch.Tensor, arg: Arg, device):
    """Same shape, two dims swapped in memory (the first and the last swappable one)."""
    dims = _swappable_dims(arg)
    a, b = dims[0], dims[-1]
    return t.transpose(a, b).contiguous(), lambda source: source.transpose(a, b)


def expanded(t: torch.Tensor, arg: Arg, device):
    """Stride 0 in one dim (the first unless the argument names another): the first slice's values
    expanded; a 1-D tensor is a scalar expanded."""
    first = t[0].clone() if t.dim() == 1 else t.narrow(arg.expand_dim, 0, 1).clone()
    return first, lambda source: source.expand(t.shape)


LAYOUT_FNS = {"strided": strided, "evenly_spaced": evenly_spaced, "transposed": transposed, "expanded": expanded}


def applies(arg: Arg, layout: str) -> bool:
    if layout == "evenly_spaced":
        return not arg.unit_last_stride
    if layout == "transposed":
        return len(_swappable_dims(arg)) >= 2
    if layout == "expanded":
        return arg.shape[arg.expand_dim] >= 2
    return True


# ---- the test ------------------------------------------------------------------------------------

CASES = [pytest.param(op, name, layout, id=f"{op}-{name}-{layout}")
         for op, case in OPS.items() for name, arg in case.args.items() for layout in LAYOUTS if applies(arg, layout)]


@pytest.fixture
def ran(monkeypatch):
    """The (kernel, backend) pairs that ran, so a test knows a kernel ran and not the reference."""
    assert backend.unavailable_reason("triton") is None
    backend.unavailable_reason("cuda")  # both register their implementations, which are wrapped here
    seen: set[tuple[str, str]] = set()
    for kernel, impls in backend._REGISTRY.items():
        for name, fn in list(impls.items()):
            def recorded(*args, _fn=fn, _key=(kernel, name)):
                seen.add(_key)
                return _fn(*args)
            monkeypatch.setitem(impls, name, recorded)
    return seen


def _scalarize(outputs, weights):
    """A scalar whose gradient reaches every output element with a different random weight."""
    return sum((o.double() * w).sum() for o, w in zip(outputs, weights))


def _assert_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    got, want = got.detach().double(), want.detach()
    err = float((got - want).norm()) / max(float(want.norm()), FLOOR)
    scale = max(float(want.abs().max()), FLOOR)
    worst = float((got - want).abs().max())
    assert err <= REL_TOL, f"{what}: relative error {err:.3e} > {REL_TOL:.0e}"
    assert worst <= ELEMENT_TOL * scale, f"{what}: max element error {worst:.3e} > {ELEMENT_TOL:.0e} x {scale:.3e}"


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("op, arg_name, layout", CASES)
def test_any_layout_matches_reference(ran, device, backend_name, op, arg_name, layout):
    reason = backend.unavailable_reason(backend_name)
    if reason is not None:
        pytest.skip(f"backend {backend_name}: {reason}")
    case = OPS[op]
    values = {name: arg.make(arg.shape, device) for name, arg in case.args.items()}
    source, view = LAYOUT_FNS[layout](values[arg_name], case.args[arg_name], device)

    # Sources: the tensors gradients are taken against, in fp32 and float64 (the reference's).
    sources = {**values, arg_name: source}
    leaves, leaves64 = {}, {}
    for name, arg in case.args.items():
        t = sources[name]
        t64 = t.double() if t.is_floating_point() else t
        leaves[name] = t.clone().requires_grad_(arg.grad)
        leaves64[name] = t64.clone().requires_grad_(arg.grad)

    def inputs(ts):
        return {name: view(t) if name == arg_name else t for name, t in ts.items()}

    args = inputs(leaves)
    assert not args[arg_name].is_contiguous(), "the layout under test must not be the contiguous one"
    with ak.use_backend(backend_name):
        outputs = case.call(**args)
        expected = case.reference(**inputs(leaves64))
        for i, (got, want) in enumerate(zip(outputs, expected)):
            _assert_matches(got, want, f"output {i}")

        weights = [torch.randn(w.shape, dtype=torch.float64, device=device) for w in expected]
        grad_names = [name for name, arg in case.args.items() if arg.grad]
        grads = torch.autograd.grad(_scalarize(outputs, weights), [leaves[n] for n in grad_names])
    grads64 = torch.autograd.grad(_scalarize(expected, weights), [leaves64[n] for n in grad_names])
    for name, got, want in zip(grad_names, grads, grads64):
        _assert_matches(got, want, f"d {name}")

    if backend_name != "torch":
        fell_back = sorted(kernel for kernel, name in ran if name == "torch")
        assert not fell_back, f"the reference ran instead of a {backend_name} kernel: {fell_back}"


# ---- attention gradients of a packed projection --------------------------------------------------

PACKINGS = {  # name: (shape of the projection output, how to take the (B, H, S, D) views q, k, v)
    "(B, S, 3, H, D)": (lambda B, S, H, D: (B, S, 3, H, D), lambda t: [x.transpose(1, 2) for x in t.unbind(2)]),
    "(3, B, S, H, D)": (lambda B, S, H, D: (3, B, S, H, D), lambda t: [x.transpose(1, 2) for x in t.unbind(0)]),
    "(B, S, H, 3, D)": (lambda B, S, H, D: (B, S, H, 3, D), lambda t: [x.transpose(1, 2) for x in t.unbind(3)]),
}


def _attention_case(device, make_views):
    """Inputs, output and gradients (with respect to q, k, v) of one call, and the float64 reference's."""
    B, S, H, D = 2, 11, 3, 16
    shape, views = make_views
    qkv = torch.randn(shape(B, S, H, D), device=device, requires_grad=True)
    q, k, v = views(qkv)
    prefix = torch.tensor([4, 9], device=device)
    out = ak.prefix_causal_attention(q, k, v, prefix)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = ref.prefix_causal_attention(q64, k64, v64, prefix)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out64, *grads64)):
        _assert_matches(got, want, name)
    return (q, k, v), grads


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("packing", PACKINGS)
def test_attention_gradients_of_packed_qkv_share_its_layout(ran, device, backend_name, packing):
    """q, k, v as views of one projection output: dq, dk, dv come back as the same views of one
    buffer laid out like the projection (one storage, the same strides and relative offsets)."""
    if backend.unavailable_reason(backend_name) is not None:
        pytest.skip(f"backend {backend_name}: {backend.unavailable_reason(backend_name)}")
    with ak.use_backend(backend_name):
        inputs, grads = _attention_case(device, PACKINGS[packing])
    storages = {g.untyped_storage().data_ptr() for g in grads}
    assert len(storages) == 1, "dq, dk, dv are not views of one buffer"
    assert grads[0].untyped_storage().nbytes() == 3 * inputs[0].numel() * inputs[0].element_size()
    for x, g in zip(inputs, grads):
        assert g.stride() == x.stride()
        assert g.storage_offset() - grads[0].storage_offset() == x.storage_offset() - inputs[0].storage_offset()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_attention_gradients_of_separate_qkv_stay_separate(ran, device, backend_name):
    """Three separate tensors (or views that do not tile one buffer) get three gradient tensors
    allocated like them."""
    if backend.unavailable_reason(backend_name) is not None:
        pytest.skip(f"backend {backend_name}: {backend.unavailable_reason(backend_name)}")
    separate = (lambda B, S, H, D: (3, B, S, H, D), lambda t: [x.transpose(1, 2).clone() for x in t.unbind(0)])
    with ak.use_backend(backend_name):
        inputs, grads = _attention_case(device, separate)
    assert len({g.untyped_storage().data_ptr() for g in grads}) == 3
    assert all(g.stride() == x.stride() for x, g in zip(inputs, grads))


def test_attention_row_offsets_past_2_31(ran, device):
    """Rows addressed at row * stride past 2^31 elements (a long packed sequence of a wide
    projection): the kernels' row offsets must not wrap in int32. q, k, v have a row stride of
    2^23 + 64 elements, so row 256 starts past element 2^31 of the view. The views start at element
    2^31 of an 8.6 GB fp16 buffer that is never touched beyond the rows used, so a wrapped offset
    still reads inside the buffer: wrong values, not a crash."""
    S, D, row_stride, start = 257, 16, 2**23 + 64, 2**31
    assert (S - 1) * row_stride >= 2**31
    try:
        buffer = torch.empty(start + (S - 1) * row_stride + 3 * D, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as exc:  # address space for an untouched 8.6 GB buffer
        pytest.skip(f"cannot reserve the buffer: {exc}")
    strides = (S * row_stride, 3 * D, row_stride, 1)
    q, k, v = (buffer.as_strided((1, 1, S, D), strides, start + i * D) for i in range(3))
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, device=device))
        t.requires_grad_()
    prefix = torch.tensor([100], device=device)
    with ak.use_backend("triton"):
        out = ak.prefix_causal_attention(q, k, v, prefix)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = ref.prefix_causal_attention(q64, k64, v64, prefix)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out64, *grads64)):
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        got, want = got.detach().double(), want.detach()
        err = float((got - want).norm() / want.norm())
        worst = float((got - want).abs().max() / want.abs().max())
        assert err <= 2e-3 and worst <= 1e-2, f"{name}: relative error {err:.2e}, worst element {worst:.2e} (fp16)"
    assert ("attention_fwd", "triton") in ran and ("attention_bwd", "triton") in ran
