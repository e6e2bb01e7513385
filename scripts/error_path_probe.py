"""Does an argument error inside the compiled ops raise, or end the process?

On the H200 of 2026-12-04, checks in csrc/ whose message formats a number or a shape crashed the
process (segmentation fault) instead of raising RuntimeError, while checks whose message holds only
text and dtypes raised. gpu_check's env stage runs this once after the build; where it crashes, the
stage runs it again under cuda-gdb for the native backtrace. Prints one `ERROR_PATH <case>: raised`
line per case as it goes, so the last line before a crash names the case.
    python scripts/error_path_probe.py
"""
import torch

import aimv2_kernels as ak


def main() -> None:
    assert ak.unavailable_reason("cuda") is None, ak.unavailable_reason("cuda")
    ops = torch.ops.aimv2_kernels
    x = torch.randn(4, 8, device="cuda")
    labels = torch.tensor([1, 2, -100, 7], device="cuda")
    scale = torch.tensor(0.25, device="cuda")
    loss = torch.empty(4, device="cuda")
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    cases = {
        "text and dtype only (ce_rows half logits)": lambda: ops.cuda_ce_rows(x.half(), None, labels, -100, scale, loss, None),
        "a shape (rms_norm weight)": lambda: ops.cuda_rms_norm_fwd(x, torch.ones(9, device="cuda"), 1e-5),
        "strides (ce_rows column-major logits)": lambda: ops.cuda_ce_rows(torch.randn(8, 4, device="cuda").t(), None,
                                                                           labels, -100, scale, loss, None),
        "an integer (sm80 head dim 48)": lambda: ops.cuda_attention_fwd_sm80(q[..., :48], q[..., :48], q[..., :48],
                                                                            None, True, 0.125),
        "a double (sm80 scale -1)": lambda: ops.cuda_attention_fwd_sm80(q, q, q, None, True, -1.0),
    }
    for name, call in cases.items():
        try:
            call()
        except RuntimeError:
            print(f"ERROR_PATH {name}: raised", flush=True)
        else:
            print(f"ERROR_PATH {name}: no error (expected one)", flush=True)


if __name__ == "__main__":
    main()
