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


def test_compile_harness_on_sample_kernels(tmp_path):
    script = tmp_path / "sample.py"
    script.write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SAMPLE OK" in out.stdout


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
    from aimv2_kernels.triton_kernels.attention import KERNEL_HEAD_DIMS, candidate_configs

    for kernel in ("fwd", "dkdv", "dq"):
        for head_dim in KERNEL_HEAD_DIMS:
            for element_size in (2, 4):
                for capability in ((8, 0), (9, 0), (8, 6)):
                    assert candidate_configs(kernel, head_dim, capability, element_size), (kernel, head_dim, element_size)
