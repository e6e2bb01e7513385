"""The ahead-of-time compile harness, on a small kernel of its own (runs without TRITON_INTERPRET)."""
import os
import subprocess
import sys
import textwrap

SAMPLE = textwrap.dedent(
    """
    import triton
    import triton.language as tl
    from aimv2_kernels.compile_check import KernelConfig, format_table, run

    @triton.jit
    def scale_rows(X, Y, n_cols, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        x = tl.load(X + row * stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(Y + row * stride + cols, (x * 2.0).to(Y.dtype.element_ty), mask=cols < n_cols)

    @triton.jit
    def small_matmul(A, B, C, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        a = tl.load(A + idx[:, None] * BLOCK + idx[None, :])
        b = tl.load(B + idx[:, None] * BLOCK + idx[None, :])
        tl.store(C + idx[:, None] * BLOCK + idx[None, :], tl.dot(a, b).to(tl.float16))

    @triton.jit
    def broken(X, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), undefined_name)

    configs = [
        KernelConfig("scale_rows bf16", scale_rows, {"X": "*bf16", "Y": "*bf16", "n_cols": "i32", "stride": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
        KernelConfig("small_matmul fp16", small_matmul, {"A": "*fp16", "B": "*fp16", "C": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 64}),
        KernelConfig("broken", broken, {"X": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16}, hot=False),
    ]
    results = run(configs, [80, 90])
    print(format_table(results))
    by = {(r.label, r.arch): r for r in results}
    assert not by[("scale_rows bf16", 90)].error and by[("scale_rows bf16", 90)].registers > 0
    assert not by[("scale_rows bf16", 90)].spills and not by[("scale_rows bf16", 90)].failed
    assert by[("small_matmul fp16", 80)].mma == "HMMA", by[("small_matmul fp16", 80)]
    assert "GMMA" in by[("small_matmul fp16", 90)].mma or "HMMA" in by[("small_matmul fp16", 90)].mma
    assert by[("broken", 90)].error and by[("broken", 90)].failed
    print("SAMPLE OK")
    """
)


def _run_script(tmp_path, source: str, done: str) -> None:
    """Run `source` in a fresh process that compiles for real GPUs (no TRITON_INTERPRET); it prints
    `done` when its asserts passed."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert done in out.stdout


def test_compile_harness_on_sample_kernels(tmp_path):
    _run_script(tmp_path, SAMPLE, "SAMPLE OK")


def test_compile_check_refuses_interpreter_mode():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "aimv2_kernels.compile_check"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "TRITON_INTERPRET" in (out.stdout + out.stderr)


def test_a_config_over_the_shared_memory_limit_fails():
    """227 KiB fits an H100/H200 block but not an A100's 163 KiB: the launch would fail there."""
    from aimv2_kernels.compile_check import CompileResult

    big = 200 * 1024
    on_a100 = CompileResult("tile", 80, registers=128, local_bytes=0, stack_bytes=0, shared_bytes=big, hot=False)
    on_h100 = CompileResult("tile", 90, registers=128, local_bytes=0, stack_bytes=0, shared_bytes=big, hot=False)
    assert on_a100.over_shared_limit and on_a100.failed
    assert not on_h100.over_shared_limit and not on_h100.failed


def test_every_attention_kernel_has_a_first_candidate_for_every_dtype_and_head_dim():
    from aimv2_kernels.triton_backend.attention import KERNEL_HEAD_DIMS, candidate_configs

    for kernel in ("fwd", "dkdv", "dq"):
        for head_dim in KERNEL_HEAD_DIMS:
            for element_size in (2, 4):
                for capability in ((8, 0), (9, 0), (8, 6)):
                    assert candidate_configs(kernel, head_dim, capability, element_size), (kernel, head_dim, element_size)


# ---- dot layouts: duplicated tensor-core work ------------------------------------------------------

CHAINED = textwrap.dedent(
    """
    import triton
    import triton.language as tl
    from aimv2_kernels.compile_check import KernelConfig, format_table, run

    @triton.jit
    def chained(A, B, C, O, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        # o = (a @ b) @ c: the first dot feeds the second, as scores feed P @ V in attention
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(A + rm[:, None] * K + rk[None, :])
        b = tl.load(B + rk[:, None] * N + rn[None, :])
        c = tl.load(C + rn[:, None] * K + rk[None, :])
        s = tl.dot(a, b)
        o = tl.dot(s.to(tl.float16), c)
        tl.store(O + rm[:, None] * K + rk[None, :], o.to(tl.float16))

    sig = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "O": "*fp16", "M": "constexpr", "N": "constexpr", "K": "constexpr"}
    tile = {"M": 64, "N": 64, "K": 128}
    configs = [KernelConfig("chained 64x64 w4", chained, sig, tile, num_warps=4),
               KernelConfig("chained 64x64 w8", chained, sig, tile, num_warps=8),
               KernelConfig("chained 64x64 w8 cold", chained, sig, tile, num_warps=8, hot=False)]
    results = run(configs, [90])
    print(format_table(results))
    by = {r.label: r for r in results}
    four, eight, cold = by["chained 64x64 w4"], by["chained 64x64 w8"], by["chained 64x64 w8 cold"]
    assert len(four.dots) == 2 and all(d.version == 3 for d in four.dots), four.dots
    assert not four.duplicated and not four.failed, four
    # 8 warps on 64 rows: the layout stacks two warpgroups on the same rows
    assert eight.duplicated and eight.failed and "DUPLICATED" in eight.status, eight
    assert any(d.warps[0] * 16 > d.rows for d in eight.dots), eight.dots
    assert cold.duplicated and not cold.failed  # reported, fails only a hot config
    print("CHAINED OK")
    """
)


def test_a_hot_config_whose_dot_layout_repeats_rows_fails(tmp_path):
    _run_script(tmp_path, CHAINED, "CHAINED OK")


# TTGIR excerpts as triton 3.6 to 3.9 print them (layout aliases), plus a layout written in place and
# a dot without tensor cores.
TTGIR = """
#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [8, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 64, 16]}>
#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 8], instrShape = [16, 8]}>
    %s = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<64x128xbf16, #shared, #smem> * !ttg.memdesc<128x64xbf16, #shared2, #smem, mutable> -> tensor<64x64xf32, #mma> loc(#loc1)
    %w:3 = ttng.warp_group_dot_wait %s, %a, %b {pendings = 0 : i32} : tensor<64x64xf32, #mma>, !ttg.memdesc<64x128xbf16, #shared, #smem>, !ttg.memdesc<128x64xbf16, #shared2, #smem, mutable> loc(#loc1)
    %d = ttng.warp_group_dot %p, %v, %acc {inputPrecision = 0 : i32, isAsync = true} : tensor<64x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 2}>> * !ttg.memdesc<64x128xbf16, #shared, #smem, mutable> -> tensor<64x128xf32, #mma1> loc(#loc2)
    %s2 = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<64x128xbf16, #shared, #smem> * !ttg.memdesc<128x64xbf16, #shared2, #smem, mutable> -> tensor<64x64xf32, #mma> loc(#loc3)
    %e = tt.dot %x, %y, %z, inputPrecision = tf32 : tensor<64x128xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma2, kWidth = 8}>> * tensor<128x64xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma2, kWidth = 8}>> -> tensor<64x64xf32, #mma2> loc(#loc4)
    %f = tt.dot %x, %y, %z : tensor<32x32xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<32x32xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<32x32xf32, #blocked> loc(#loc5)
    %g = tt.dot %x, %y, %z : tensor<32x16xf16, #ttg.dot_op<{opIdx = 0}>> * tensor<16x32xf16, #ttg.dot_op<{opIdx = 1}>> -> tensor<32x32xf32, #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>> loc(#loc6)
"""


def test_dot_layouts_are_read_from_ttgir():
    from aimv2_kernels.compile_check import DotLayout, dot_layouts

    dots = dot_layouts(TTGIR)
    assert dots == [
        DotLayout(64, 64, 3, (8, 1), (16, 32, 16)),  # listed once although it appears twice
        DotLayout(64, 128, 3, (4, 2), (16, 64, 16)),
        DotLayout(64, 64, 2, (1, 8), (16, 8)),
        DotLayout(32, 32),
        DotLayout(32, 32, 2, (4, 1), (16, 8)),
    ], dots
    assert [d.duplicated for d in dots] == [True, False, False, False, True]
    assert dots[0].describe() == "64x64 wgmma m64n32k16 w8x1 DUP"
    assert dots[1].describe() == "64x128 wgmma m64n64k16 w4x2"
    assert dots[2].describe() == "64x64 mma m16n8 w1x8"
    assert dots[3].describe() == "32x32 fma"


def test_a_layout_wider_than_its_tile_is_duplicated():
    from aimv2_kernels.compile_check import CompileResult, DotLayout

    assert DotLayout(128, 64, 3, (4, 2), (16, 64, 16)).duplicated  # 2 x 64 columns on a 64-wide tile
    assert not DotLayout(128, 64, 3, (8, 1), (16, 64, 16)).duplicated
    assert not DotLayout(128, 128, 3, (4, 2), (16, 64, 16)).duplicated
    dup = CompileResult("tile", 90, 128, 0, 0, 1024, dots=[DotLayout(64, 64, 3, (8, 1), (16, 64, 16))])
    assert dup.failed and dup.status == "DUPLICATED"
    dup.hot = False
    assert not dup.failed
