"""The staged GPU check behind `bash scripts/gpu_check.sh` (read docs/gpu_check.md first).

One run on a GPU machine answers, in order of what each answer decides: does it build, is every kernel
right (tests, every autotune candidate, edge cases), does any kernel touch memory it must not
(compute-sanitizer), and how fast is it against the alternatives (benchmark suites, most decisive
first). Every stage runs under its own hard timeout and, the moment it ends, appends its section to
OUTDIR/report.md and rewrites OUTDIR/results.json, so a run killed at any point still leaves every
finished stage. A stage that finishes early banks its unused seconds for the stages after it; the
budgets add up to TOTAL_BUDGET_S.

    python scripts/gpu_check.py OUTDIR                       # every stage (a GPU machine)
    python scripts/gpu_check.py --cpu-smoke OUTDIR           # the same plumbing without a GPU (CI)
    python scripts/gpu_check.py --only tests,sanitizer OUTDIR
    python scripts/gpu_check.py --suite attention OUTDIR      # env, then that benchmark suite only
    python scripts/gpu_check.py --plan                        # `stage NAME BUDGET_SECONDS` lines

Only the standard library is imported here: the stages run in child processes, so a crash, a hang
or a CUDA fault in one of them is reported instead of ending the run. OUTDIR receives at most eight
files (what one device call can bring back): report.md, results.json, results.md, log.txt and one
plot per benchmark stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TOTAL_BUDGET_S = 420

# Kernel tests first: they decide whether anything else matters. The rest of the suite (model,
# trainer, data, interop) runs after them with whatever is left of the stage.
KERNEL_TESTS = (
    # the CUDA C++ attention and CE kernels first: never run on a GPU before
    "tests/test_cuda_attention_dispatch.py", "tests/test_cuda_attention.py", "tests/test_cuda_attention_sm90.py",
    "tests/test_cuda_cross_entropy.py",
    "tests/test_attention_triton.py", "tests/test_attention_candidates.py", "tests/test_rms_norm_triton.py",
    "tests/test_swiglu_triton.py", "tests/test_loss_triton.py", "tests/test_loss_memory.py",
    "tests/test_cuda_backend.py", "tests/test_ops_layer.py", "tests/test_reference.py", "tests/test_layouts.py",
    "tests/test_norm_mixed_dtype.py", "tests/test_attention_varlen.py",
)
SMOKE_TESTS = ("tests/test_rms_norm_triton.py",)  # the plumbing, not the coverage, on the CPU
BENCH_SUITES = {"bench-attention": ("attention", "varlen"), "bench-loss": ("loss",),
                "bench-norm": ("norm", "swiglu"), "bench-step": ("step",)}


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: int
    what: str  # one line for --plan and the report


STAGES = (
    # env: the extension's build took 148 s on the H200 of 2026-12-04 (16 jobs; the CuTe attention
    # files set the pace), so 100 s cut it off and left the whole run without the cuda backend.
    Stage("env", 170, "card, driver, versions, peers; the CUDA extension built for this card only"),
    Stage("tests", 120, "kernel tests (every autotune candidate, edge cases, cuda backend), then the rest; autotuning off"),
    Stage("sanitizer", 35, "compute-sanitizer memcheck over one small forward+backward of every op on every backend, racecheck on the CUDA C++ attention and CE"),
    Stage("bench-attention", 40, "attention: ours vs FlexAttention (mask outside / inside), SDPA dense, SDPA causal; then varlen"),
    Stage("bench-loss", 20, "loss: ours vs Liger FLCE+MSE, Cut Cross-Entropy+MSE, eager, compiled"),
    Stage("bench-norm", 20, "RMSNorm and SwiGLU: ours (triton, cuda) vs Liger, eager, compiled"),
    Stage("bench-step", 15, "AIMv2-L training step: ours, eager reference, ours on the cuda backend, then ours and the reference compiled"),
)
assert sum(s.budget_s for s in STAGES) <= TOTAL_BUDGET_S


# ---- running commands under a deadline ----------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    returncode: Optional[int]  # None: killed at the deadline
    seconds: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


class Runner:
    """Runs child processes with their output streamed into OUTDIR/log.txt (so a killed run keeps
    it), each in its own process group so a timeout kills everything it started."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.log_path = out / "log.txt"
        self.env = env

    def note(self, text: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(text + "\n")

    def run(self, argv: list[str], deadline: float, extra_env: Optional[dict[str, str]] = None) -> Outcome:
        start = time.time()
        self.note(f"\n$ {' '.join(argv)}")
        timeout = deadline - start
        if timeout <= 1:
            return Outcome(None, 0.0, "not started: no time left in this stage")
        with tempfile.TemporaryFile("w+") as capture:
            proc = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **(extra_env or {})}, stdout=capture,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                code: Optional[int] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
            capture.seek(0)
            output = capture.read()
        with open(self.log_path, "a") as log:
            log.write(output)
            log.write(f"[exit {code if code is not None else 'KILLED at the stage deadline'}, "
                      f"{time.time() - start:.0f}s]\n")
        return Outcome(code, time.time() - start, output)


# ---- the record of the run ----------------------------------------------------------------------

class Record:
    """report.md (appended per stage) and results.json (rewritten whole, atomically, per stage)."""

    def __init__(self, out: Path, header: dict):
        self.out = out
        self.data = {"run": header, "stages": [], "tests": [], "records": [], "targets": []}
        (out / "report.md").write_text(self._header_md(header))
        self._write_json()

    @staticmethod
    def _header_md(h: dict) -> str:
        return (f"# GPU check {h['started']}\n\n- mode: {h['mode']}\n- command: `{h['command']}`\n"
                f"- commit: {h['commit']}\n- stages: {', '.join(h['stages'])} (budget {h['budget_s']} s)\n")

    def _write_json(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.out / "results.json")

    def stage(self, name: str, status: str, seconds: float, budget: float, lines: list[str], **fields) -> None:
        self.data["stages"].append({"name": name, "status": status, "seconds": round(seconds, 1),
                                    "budget_s": round(budget), **fields})
        with open(self.out / "report.md", "a") as f:
            f.write(f"\n## {name}: {status} ({seconds:.0f} s of {budget:.0f})\n\n")
            f.write("\n".join(lines) + "\n")
        self._write_json()

    def add(self, key: str, items: list) -> None:
        self.data[key].extend(items)


# ---- stage: env and build -----------------------------------------------------------------------

PROBE_ENV = r"""
import importlib, importlib.metadata, json, sys
info = {"python": sys.version.split()[0]}
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(card=p.name, capability="%d.%d" % (p.major, p.minor), sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
try:
    import triton; info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = "missing: %s" % e
peers = {}
for name in ("liger_kernel", "cut_cross_entropy", "flash_attn", "quack"):
    try:
        m = importlib.import_module(name)
        peers[name] = "ok " + str(getattr(m, "__version__", "") or importlib.metadata.version(name.replace("_", "-")))
    except Exception as e:
        peers[name] = "skipped: does not import (%s: %s)" % (type(e).__name__, str(e)[:100])
info["peers"] = peers
print("ENV " + json.dumps(info))
"""

PROBE_BACKENDS = r"""
import json
import aimv2_kernels as ak
from aimv2_kernels.cuda_backend.ext import load_status
print("BACKENDS " + json.dumps({"available": ak.available_backends(), "cuda": load_status() or "ok"}))
"""

PROBE_CARD = r"""
import json, torch
from benchmarks.harness import measure_card
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
c = measure_card(dev, quick=True)
print("CARD " + json.dumps({"name": c.name, "copy_gbps": round(c.copy_gbps), "matmul_tflops": round(c.matmul_tflops, 1)}))
"""


def _tagged_json(output: str, tag: str) -> Optional[dict]:
    for line in output.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None


def _error_path_lines(ctx: "Check", deadline: float) -> list[str]:
    """scripts/error_path_probe.py: whether the compiled ops' argument errors raise; on a crash, the
    native backtrace from cuda-gdb (the machine has no gdb) of a second run."""
    probe = ctx.runner.run([PYTHON, "-X", "faulthandler", "scripts/error_path_probe.py"], deadline)
    cases = [line for line in probe.output.splitlines() if line.startswith("ERROR_PATH ")]
    lines = [f"- argument errors of the compiled ops: exit {probe.returncode}; " + "; ".join(c[11:] for c in cases)]
    if probe.returncode not in (0, None) and shutil.which("cuda-gdb"):
        trace = ctx.runner.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args", PYTHON,
                                "scripts/error_path_probe.py"], min(deadline, time.time() + 40))
        frames = [line for line in trace.output.splitlines() if re.match(r"#\d+ ", line)]
        lines.append("  crashed; native backtrace (cuda-gdb):\n```\n" + "\n".join(frames[:25]) + "\n```")
    return lines


def stage_env(ctx: "Check", deadline: float) -> tuple[str, list[str], dict]:
    lines, fields, status = [], {}, "passed"
    if not ctx.smoke:
        smi = ctx.runner.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                              "temperature.gpu,power.draw", "--format=csv"], deadline)
        lines.append("```\n" + smi.output.strip() + "\n```")
    probe = ctx.runner.run([PYTHON, "-c", PROBE_ENV], deadline)
    info = _tagged_json(probe.output, "ENV") or {"error": probe.output[-400:]}
    fields["env"] = info
    lines.append(f"- python {info.get('python')}, torch {info.get('torch')} (CUDA {info.get('cuda')}), "
                 f"triton {info.get('triton')}; card {info.get('card', 'none')} sm_{info.get('capability', '-')}, "
                 f"{info.get('sms', '-')} SMs, {info.get('memory_gib', '-')} GiB")
    for peer, state in (info.get("peers") or {}).items():
        lines.append(f"- peer {peer}: {state}")

    # The project itself, with the CUDA extension built for this card only (faster than 8.0;9.0).
    if ctx.smoke:
        lines.append("- build: skipped (no GPU: the CPU smoke run uses the installed package, pure Python)")
    else:
        # The host compiler the build will use (torch's build honours CC/CXX): an error message that
        # formats a number crashed the process on 2026-12-04, with the build on /opt/gcc.
        compiler = ctx.runner.run(["bash", "-c", 'echo "CC=${CC:-} CXX=${CXX:-}"; ${CXX:-c++} --version | head -1; '
                                   'nvcc --version | tail -1'], deadline)
        lines.append(f"- compilers: {' | '.join(compiler.output.strip().splitlines())}")
        arch = info.get("capability", "9.0")
        arch = arch + "a" if arch == "9.0" else arch  # sm_90a: the Hopper-only instructions
        build = ctx.runner.run([PYTHON, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                                "-e", "."], deadline, {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 8)})
        fields["build"] = {"arch": arch, "exit": build.returncode, "seconds": round(build.seconds)}
        if build.returncode != 0:
            status = "failed"
            why = "timed out" if build.timed_out else f"exit {build.returncode}"
            lines.append(f"- build of the CUDA extension for {arch}: FAILED ({why}, {build.seconds:.0f} s); "
                         f"last lines:\n```\n{_tail(build.output, 25)}\n```")
            # Go on without the cuda backend: a pure-Python install so every other stage still runs.
            plain = ctx.runner.run([PYTHON, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                                    "-e", "."], deadline, {"AIMV2_KERNELS_SKIP_CUDA_BUILD": "1"})
            lines.append(f"- pure-Python install without the extension: exit {plain.returncode}")
        else:
            lines.append(f"- build of the CUDA extension for {arch}: ok ({build.seconds:.0f} s)")
    backends = ctx.runner.run([PYTHON, "-c", PROBE_BACKENDS], deadline)
    b = _tagged_json(backends.output, "BACKENDS") or {"error": _tail(backends.output, 10)}
    fields["backends"] = b
    lines.append(f"- backends: {b.get('available')}; cuda backend: {b.get('cuda', b.get('error'))}")
    if not ctx.smoke and b.get("cuda") != "ok":
        status = "failed"
    if not ctx.smoke and b.get("cuda") == "ok":
        lines += _error_path_lines(ctx, deadline)
    card = ctx.runner.run([PYTHON, "-c", PROBE_CARD], deadline)
    c = _tagged_json(card.output, "CARD")
    fields["card"] = c
    if c:
        lines.append(f"- measured: copy {c['copy_gbps']} GB/s (read + write), bf16 matmul 8192^3 {c['matmul_tflops']} TFLOP/s"
                     if not ctx.smoke else f"- measured (CPU, meaningless): copy {c['copy_gbps']} GB/s")
    if probe.returncode != 0 or backends.returncode != 0:
        status = "failed"
    return status, lines, fields


# ---- stage: tests -------------------------------------------------------------------------------

def _has_module(name: str) -> bool:
    probe = subprocess.run([PYTHON, "-c", f"import {name}"], capture_output=True)
    return probe.returncode == 0


def _junit_cases(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        tree = ET.parse(path)
    except ET.ParseError:
        return []
    cases = []
    for tc in tree.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = tc.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (node.get("message") or node.text or "").strip()
                break
        name = f"{tc.get('classname', '').replace('.', '/')}.py::{tc.get('name')}"
        cases.append({"test": name, "outcome": outcome, "seconds": round(float(tc.get("time") or 0), 2),
                      "message": message[:400]})
    return cases


_VERBOSE_LINE = re.compile(r"(?:\[gw\d+\]\s+\[\s*\d+%\]\s+)?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)"
                           r"|(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def _verbose_cases(output: str) -> list[dict]:
    """Outcomes from pytest -v lines: what a run killed before writing its junit file still shows."""
    cases = []
    for line in output.splitlines():
        m = _VERBOSE_LINE.search(line)
        if m:
            outcome, test = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            cases.append({"test": test, "outcome": outcome.lower(), "seconds": None, "message": ""})
    return cases


def _failure_events(path: Path) -> dict[str, str]:
    """test id -> message, from the lines tests/conftest.py appends as each failure happens."""
    events: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            events.setdefault(event["test"], f"{event['message']} (in {event['when']})")
    return events


def _pytest(ctx: "Check", paths: list[str], deadline: float, junit: Path, extra: list[str],
            env: dict[str, str]) -> tuple[Outcome, list[dict]]:
    argv = [PYTHON, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--no-header", "-rf", "--durations=12",
            f"--junitxml={junit}", *extra, *paths]
    events = junit.with_suffix(".events")
    outcome = ctx.runner.run(argv, deadline, {**env, "AIMV2_TEST_EVENTS": str(events)})
    cases = _junit_cases(junit) or _verbose_cases(outcome.output)
    messages = _failure_events(events)
    for case in cases:
        if not case["message"]:
            case["message"] = messages.get(case["test"], "")
    return outcome, cases


def stage_tests(ctx: "Check", deadline: float) -> tuple[str, list[str], dict]:
    extra, env = [], dict(ctx.test_env)
    if not ctx.smoke and _has_module("xdist"):
        workers = min(8, max(2, (os.cpu_count() or 2) // 2))
        extra += ["-n", str(workers)]  # compiles are the cost: spread them over processes
        # ...and keep their CPU work from oversubscribing the cores (16 threads per worker otherwise).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // workers))
    if _has_module("pytest_timeout"):
        extra += ["--timeout", "90"]  # one hung test must not take the stage with it
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_tests_"))
    parts = [("kernels", list(SMOKE_TESTS if ctx.smoke else KERNEL_TESTS))]
    if not ctx.smoke:
        rest = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                      if str(p.relative_to(ROOT)) not in KERNEL_TESTS)
        parts.append(("rest", rest))
    all_cases, lines, status = [], [], "passed"
    for label, paths in parts:
        paths = [p for p in paths if (ROOT / p).exists()]
        outcome, cases = _pytest(ctx, paths, deadline, tmp / f"{label}.xml", extra, env)
        for case in cases:
            case["part"] = label
        all_cases += cases
        counts = _count(cases)
        state = "KILLED at the deadline" if outcome.timed_out else f"exit {outcome.returncode}"
        lines.append(f"- {label} ({len(paths)} files): {state}, {outcome.seconds:.0f} s: {counts}")
        if outcome.timed_out or outcome.returncode not in (0, 5) or "failed" in counts or "error" in counts:
            status = "failed"
    failures = [c for c in all_cases if c["outcome"] in ("failed", "error")]
    if failures:
        lines += ["", "Failures (every one is in results.json with its message; here by test function):", ""]
        groups: dict[str, list[dict]] = {}
        for c in failures:
            groups.setdefault(c["test"].split("[")[0], []).append(c)
        for test, group in groups.items():
            message = next((c["message"] for c in group if c["message"]), "(no message: see log.txt)")
            lines.append(f"- `{test}` x{len(group)}: {message.splitlines()[0][:300]}")
    timed = sorted((c for c in all_cases if c["seconds"]), key=lambda c: -c["seconds"])[:10]
    if timed:
        lines += ["", "Slowest:", ""] + [f"- {c['seconds']:.1f} s `{c['test']}`" for c in timed]
    ctx.record.add("tests", all_cases)
    shutil.rmtree(tmp, ignore_errors=True)
    return status, lines, {"counts": _count(all_cases)}


def _count(cases: list[dict]) -> str:
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test outcome recorded"


# ---- stage: compute-sanitizer -------------------------------------------------------------------

def stage_sanitizer(ctx: "Check", deadline: float) -> tuple[str, list[str], dict]:
    script = "scripts/sanitize_calls.py"
    if ctx.smoke:
        run = ctx.runner.run([PYTHON, script, "--cpu"], deadline)
        lines = ["- compute-sanitizer: skipped (no GPU); the same calls ran on the CPU through the interpreter"]
        race_ok = True
    else:
        tool = shutil.which("compute-sanitizer") or _toolkit_tool("compute-sanitizer")
        if tool is None:
            return "skipped", ["- compute-sanitizer: not found on this machine"], {}
        # No caching allocator: each tensor its own allocation, so an access past its end is caught.
        run = ctx.runner.run([tool, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20",
                              PYTHON, script], deadline, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
        lines = []
        # Shared-memory races of the CUDA C++ kernels that stage tiles through shared memory (attention,
        # the CE rows): racecheck is slow, so one small call of each, after memcheck, in what time is left.
        race = ctx.runner.run([tool, "--tool", "racecheck", "--error-exitcode", "3", "--print-limit", "20",
                               PYTHON, script, "--backend", "cuda", "--only", "prefix_causal_attention,linear_cross_entropy"],
                              deadline)
        race_errors = [line for line in race.output.splitlines() if "========= ERROR" in line.upper() or "Race" in line]
        lines.append(f"- racecheck (cuda attention + CE): exit {'KILLED' if race.timed_out else race.returncode}; "
                     f"{len(race_errors)} race lines")
        lines += [f"  - {line.strip()}" for line in race_errors[:10]]
        race_ok = race.returncode == 0 or race.timed_out  # out of time is not a race found
    calls = [line for line in run.output.splitlines() if line.startswith("call ")]
    errors = [line for line in run.output.splitlines() if "========= Invalid" in line or "========= ERROR" in line.upper()]
    lines.append(f"- {len(calls)} calls; exit {'KILLED' if run.timed_out else run.returncode}; "
                 f"{len(errors)} memcheck error lines")
    lines += [f"  - {line}" for line in calls if not line.rstrip().endswith(" ok")][:30]
    lines += [f"  - {line.strip()}" for line in errors[:20]]
    status = "passed" if run.returncode == 0 and race_ok else "failed"
    return status, lines, {"calls": calls, "memcheck_errors": errors[:50]}


def _toolkit_tool(name: str) -> Optional[str]:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).exists():
            return str(Path(root) / "bin" / name)
    return None


# ---- stages: benchmarks -------------------------------------------------------------------------

def bench_stage(suites: tuple[str, ...]) -> Callable:
    def stage(ctx: "Check", deadline: float) -> tuple[str, list[str], dict]:
        chosen = [s for s in suites if not ctx.suites or s in ctx.suites]
        tmp = Path(tempfile.mkdtemp(prefix="gpu_check_bench_"))
        run = ctx.runner.run([PYTHON, "-m", "benchmarks", "--quick", "--suite", ",".join(chosen), "--out", str(tmp)],
                             deadline, ctx.bench_env)
        data = _read_json(tmp / "results.json")
        ctx.record.add("records", data.get("records", []))
        ctx.record.add("targets", data.get("targets", []))
        md = tmp / "results.md"
        if md.exists():
            with open(ctx.out / "results.md", "a") as f:
                f.write(md.read_text() + "\n")
        plot = tmp / "results.png"
        if plot.exists():
            shutil.copy(plot, ctx.out / f"plot-{'-'.join(chosen)}.png")
        shutil.rmtree(tmp, ignore_errors=True)
        measured = [r for r in data.get("records", []) if r.get("ms")]
        lines = [f"- suites {', '.join(chosen)}: exit {'KILLED at the deadline' if run.timed_out else run.returncode}, "
                 f"{len(measured)} measurements (full table in results.md)"]
        for t in data.get("targets", []):
            lines.append(f"  - {t.get('line') or t.get('label')}")
        if run.returncode != 0:
            lines.append(f"```\n{_tail(run.output, 15)}\n```")
        status = "passed" if run.returncode == 0 and measured else "failed"
        return status, lines, {"suites": chosen, "measurements": len(measured)}
    return stage


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# ---- the run ------------------------------------------------------------------------------------

STAGE_FUNCTIONS = {"env": stage_env, "tests": stage_tests, "sanitizer": stage_sanitizer,
                   **{name: bench_stage(suites) for name, suites in BENCH_SUITES.items()}}


@dataclasses.dataclass
class Check:
    out: Path
    smoke: bool
    suites: list[str]
    runner: Runner
    record: Record

    @property
    def test_env(self) -> dict[str, str]:
        # Autotuning off: one config per kernel (every candidate is checked by its own test), so the
        # stage pays for one compile per kernel rather than one per candidate. No first-use build.
        env = {"AIMV2_KERNELS_AUTOTUNE": "0", "AIMV2_KERNELS_NO_JIT": "1"}
        if self.smoke:
            env["TRITON_INTERPRET"] = "1"
        return env

    @property
    def bench_env(self) -> dict[str, str]:
        return {"AIMV2_KERNELS_NO_JIT": "1"}


def select_stages(only: list[str], suites: list[str]) -> list[Stage]:
    """env always runs (the others need the install it makes); --only and --suite narrow the rest."""
    wanted = set()
    for item in only:
        wanted |= {s.name for s in STAGES if s.name.startswith("bench-")} if item == "bench" else {item}
    for suite in suites:
        wanted |= {name for name, members in BENCH_SUITES.items() if suite in members}
    unknown = wanted - {s.name for s in STAGES}
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in STAGES]}, or 'bench'")
    return [s for s in STAGES if s.name == "env" or not wanted or s.name in wanted]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", nargs="?", help="where report.md, results.json, results.md, log.txt go")
    p.add_argument("--plan", action="store_true", help="print `stage NAME BUDGET_SECONDS` per stage and exit")
    p.add_argument("--cpu-smoke", action="store_true", help="every stage's plumbing without a GPU (tiny sizes, interpreter)")
    p.add_argument("--only", action="append", default=[], help="stage(s) to run besides env (comma-separated; 'bench' = all benchmark stages)")
    p.add_argument("--suite", action="append", default=[], help="benchmark suite(s) only: attention, loss, norm, swiglu, step")
    args = p.parse_args(argv)
    args.only = [x for item in args.only for x in item.split(",") if x]
    args.suite = [x for item in args.suite for x in item.split(",") if x]
    if not args.plan and not args.outdir:
        p.error("OUTDIR is required (or --plan)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    stages = select_stages(args.only, args.suite)
    if args.plan:
        for s in stages:
            print(f"stage {s.name} {s.budget_s}  # {s.what}")
        print(f"total {sum(s.budget_s for s in stages)}")
        return 0
    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("report.md", "results.json", "results.md", "log.txt", *(p.name for p in out.glob("plot-*.png"))):
        (out / stale).unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]))
    smoke = args.cpu_smoke
    header = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "mode": "cpu-smoke (no GPU: interpreter, tiny sizes)" if smoke else "gpu",
              "command": "bash scripts/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": _commit(), "stages": [s.name for s in stages], "budget_s": sum(s.budget_s for s in stages)}
    check = Check(out, smoke, args.suite, Runner(out, env), Record(out, header))
    banked, failed = 0.0, []
    for s in stages:
        start = time.time()
        allowed = s.budget_s + banked
        print(f"== stage {s.name} (up to {allowed:.0f} s)", flush=True)
        try:
            status, lines, fields = STAGE_FUNCTIONS[s.name](check, start + allowed)
        except Exception as exc:  # noqa: BLE001 - a broken stage is reported, the run goes on
            status, lines, fields = "failed", [f"- the stage itself crashed: {type(exc).__name__}: {exc}"], {}
        seconds = time.time() - start
        banked = max(0.0, allowed - seconds)
        if seconds > allowed + 5:
            status = f"{status}, over budget"
        check.record.stage(s.name, status, seconds, allowed, lines, **fields)
        print(f"   {status} in {seconds:.0f} s", flush=True)
        if status != "passed" and status != "skipped":
            failed.append(s.name)
    summary = f"\n## Summary\n\n- stages failed: {', '.join(failed) or 'none'}\n"
    with open(out / "report.md", "a") as f:
        f.write(summary)
    print((out / "report.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
