"""python -m benchmarks [--suite NAME]... [--quick] [--out DIR] [--list] [--write-auto-table]"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line with the status argparse uses (2), not the usage block first
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse(argv):
    parser = _Parser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", action="append", default=[],
                        help="suite(s) to run (repeat or comma-separate); default: all, in order")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions: every suite in minutes")
    parser.add_argument("--out", metavar="DIR",
                        help="write results.md, results.csv, results.json and results.png into DIR")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--write-auto-table", action="store_true",
                        help="GPU only: run the CUDA C++ tests, then the suites of the table (default: norm, swiglu, "
                             "attention, varlen), and write what each measured fastest into "
                             "aimv2_kernels/auto_tables/<card>.json, which backend 'auto' then follows")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        # Before anything imports triton: the smoke run sends the Triton kernels through its interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from . import SUITES
    from .auto_table import TABLE_SUITES, choices, run_cuda_tests, write
    from .harness import Context, Result, configure_compile, environment, measure_card
    from .report import fill_speedups, markdown, write_outputs
    from .targets import Verdict

    if args.list:
        for name, module in SUITES.items():
            print(f"{name:10s} {module.__doc__.strip().splitlines()[0]}")
        return 0
    if args.write_auto_table and not cuda:
        print("python -m benchmarks: error: --write-auto-table needs a CUDA GPU (it records what ran fastest on the "
              "card)", file=sys.stderr)
        return 2
    default = list(TABLE_SUITES) if args.write_auto_table else list(SUITES)
    names = [n for item in args.suite for n in item.split(",") if n] or default
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"python -m benchmarks: error: --suite: unknown suite(s) {', '.join(unknown)}; expected some of "
              f"{', '.join(SUITES)}", file=sys.stderr)
        return 2
    if not cuda:
        print("No CUDA GPU on this machine: the benchmark suites need one to give meaningful numbers.\n"
              "Running a CPU smoke run instead: tiny sizes through the reference and Triton-interpreter paths,\n"
              "to show the harness works. GPU results: benchmarks/RESULTS.md.\n")

    device = torch.device("cuda" if cuda else "cpu")
    configure_compile()
    card = measure_card(device, quick=args.quick)
    ctx = Context(device, args.quick, card)
    command = ("python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    env = dict(environment(device), command=command)  # the command too: rows of many runs get pooled
    print(f"{env['gpu']}: copy {card.copy_gbps:.0f} GB/s, matmul {card.matmul_tflops:.1f} TFLOP/s", flush=True)

    cuda_tests = run_cuda_tests() if args.write_auto_table else ""
    if args.write_auto_table:
        print(f"CUDA C++ tests: {cuda_tests}", flush=True)
    results: list[Result] = []
    done: list[tuple[str, float, list[Verdict]]] = []

    def publish(current: list[Result], name: Optional[str] = None, start: float = 0.0) -> str:
        """The table and output files of every finished suite plus the current one's results so far."""
        rows = results + current
        fill_speedups(rows)
        suites = done + ([(name, time.time() - start, SUITES[name].targets(current))] if name else [])
        text = markdown(env, card, command, suites, rows, smoke=not cuda)
        if args.out:
            verdicts = [v for _, _, suite_verdicts in suites for v in suite_verdicts]
            write_outputs(args.out, env, card, text, rows, verdicts, {n: SUITES[n].X_LABEL for n, _, _ in suites},
                          with_plot=not current)
        return text

    text = ""
    for name in names:
        module, start, current = SUITES[name], time.time(), []
        ctx.on_result = lambda r, name=name, start=start, current=current: (current.append(r), publish(current, name, start))
        print(f"== {name}", flush=True)
        try:
            suite_results = module.run(ctx, log=lambda line: print(line, flush=True))
        except Exception as exc:  # noqa: BLE001 - report the broken suite and go on with the others
            traceback.print_exc()
            suite_results = current + [Result(name, name, "-", "-", 0, "-", False, False,
                                              note=f"suite failed: {type(exc).__name__}: {str(exc)[:160]}")]
        results += suite_results
        done.append((name, time.time() - start, module.targets(suite_results)))
        text = publish([])
    print("\n" + text)
    if args.write_auto_table:
        rows = choices(results, cuda_tests)
        path = write(env["gpu"], env, rows, cuda_tests)
        print(f"auto table: {len(rows)} choices (CUDA C++ tests: {cuda_tests}) written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
