"""Prefix-causal flash attention, the parts shared by the forward and backward kernels.

Key j is visible to query i of sample b iff (not causal) or j <= i or j < P[b]. All three cases reduce
to one number per sample, the visible prefix P in [0, S]: non-causal is P = S, plain causal P = 0.
The kernels (attention_fwd.py, attention_bwd.py) never build the S x S mask; they classify tiles:

  query tile [m0, m0 + BLOCK_M), key blocks of BLOCK_N:
    blocks entirely below max(m0 + 1, P)     visible to every query of the tile: no mask arithmetic
    further blocks below max(m0 + BLOCK_M, P)  boundary blocks: compute (j <= i) | (j < P)
    keys from max(m0 + BLOCK_M, P) on        hidden from every query of the tile: never loaded
  key block [n0, n1) (dK/dV), the same sets seen from the key side:
    queries below n0 when n0 >= P            see none of the block: skipped
    queries >= n1 - 1 (all if n1 <= P)       see all of it: no mask arithmetic
    the query blocks in between              boundary: compute the mask

Work saved for a typical AIMv2 encoder batch (S = 256, P uniform in 1..255; exact counts over all P
from `tile_work`, asserted in the tests): a dense-mask kernel computes every tile of the S x S score
matrix and applies the mask to all of them. With 128 x 64 tiles (the first forward candidate) this
code computes 84% of the tiles and applies the mask to 37%; with 64 x 32 tiles, 76% and 19%. On
average 66.7% of the query-key pairs are visible, so the remaining excess is the partly visible tiles
along the diagonal and at the prefix edge. dK/dV visits the same tiles from the key side.

The same kernels serve packed variable-length sequences (VARLEN, attention_varlen.py): the batch
coordinate becomes the sequence, whose start and length come from cu_seqlens (`program_coords`), and
everything above holds with S = that sequence's length.

Also here: the launch configurations (one small autotuning set per kernel, head dim and device
class, the fixed small interpreter config, the AIMV2_KERNELS_AUTOTUNE switch, `forced_config` for
tests, and `launch`, which picks among them), the compile-check entries, the dtype/head-dim gate with
its one-time fallback warning, and host helpers (tf32 choice, strides, device).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl

from ..backend import interpreter_enabled
from .kernel_config import KernelConfig

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E): the kernels fold it into the softmax scale
LOG2E_DEVICE = tl.constexpr(LOG2E)  # the same, usable inside kernels
LN2 = tl.constexpr(0.6931471805599453)  # log2 -> natural log, for the saved lse
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two (tl.arange) and >= 16 (tl.dot)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- mask classification (device helpers) --------------------------------------------------------

@triton.jit
def visible_prefix(PREFIX, off_b, S, HAS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr):
    """P in [0, S]: keys j < P are visible to every query of sample off_b. Read from device memory, so
    new prefix values never recompile."""
    prefix = S
    if CAUSAL:
        prefix = 0
        if HAS_PREFIX:
            prefix = tl.minimum(tl.load(PREFIX + off_b), S).to(tl.int32)  # values > S: all visible
    return prefix


@triton.jit
def row_ptrs(base, stride, rows, offs_d, LONG_ROWS: tl.constexpr):
    """(len(rows), D) pointers to rows `rows` of one head's (S, D) matrix with row stride `stride`.
    LONG_ROWS (set by the launcher when S x stride can pass 2^31: long packed or varlen sequences of
    a wide projection) computes rows * stride in int64; otherwise it stays int32, as widening every
    row's offset cost up to 25 registers per thread and spilled on sm_80."""
    if LONG_ROWS:
        offsets = rows.to(tl.int64)[:, None] * stride
    else:
        offsets = rows[:, None] * stride
    return base + offsets + offs_d[None, :]


@triton.jit
def load_rows(base, stride, rows, offs_d, S, MASKED: tl.constexpr, LONG_ROWS: tl.constexpr):
    """(len(rows), D) tile of one head's (S, D) matrix (see `row_ptrs`). MASKED bounds-checks rows
    against S (zeros past the end); unmasked loads are for tiles known to lie inside S."""
    ptrs = row_ptrs(base, stride, rows, offs_d, LONG_ROWS)
    if MASKED:
        tile = tl.load(ptrs, mask=rows[:, None] < S, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def program_coords(PREFIX, CU_SEQLENS, S, T, H, BLOCK: tl.constexpr, LAST_FIRST: tl.constexpr,
                   HAS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """Where this program works in the 1-D grid over (batch * head, tile of BLOCK positions): tiles of
    one head are adjacent (they share K/V or Q/dO in L2); LAST_FIRST starts the last tiles, which see
    the most keys, first to shorten the tail. The grid has cdiv(S, BLOCK) tiles per (batch, head).

    VARLEN (packed (T, H, D) tokens of n sequences): "batch" is the sequence s, S only sizes the grid
    (max_seqlen, so new lengths never recompile) and this sequence's own length comes from
    CU_SEQLENS (n + 1,); tiles starting at or past it have nothing to do (the caller returns).

    Returns (batch offset (int64) in units of the batch stride: the sample index, or with VARLEN the
    sequence's first token, the launcher passing the token stride as the batch stride; head (int64);
    tile start; the sample's visible prefix; the sample's length; the int64 index of its position 0
    in the fp32 row statistics (lse, delta): (B, H, S) padded, (H, T) with VARLEN)."""
    num_tiles = tl.cdiv(S, BLOCK)
    pid = tl.program_id(0)
    off_bh = pid // num_tiles
    tile = pid % num_tiles
    if LAST_FIRST:
        tile = num_tiles - 1 - tile
    off_b = off_bh // H
    off_h64 = (off_bh % H).to(tl.int64)
    if VARLEN:
        start = tl.load(CU_SEQLENS + off_b)
        seq_len = tl.load(CU_SEQLENS + off_b + 1) - start
        batch_off = start.to(tl.int64)
        stats_row = off_h64 * T + batch_off
    else:
        seq_len = S
        batch_off = off_b.to(tl.int64)
        stats_row = off_bh.to(tl.int64) * S
    prefix = visible_prefix(PREFIX, off_b, seq_len, HAS_PREFIX, CAUSAL)
    return batch_off, off_h64, tile * BLOCK, prefix, seq_len, stats_row


@triton.jit
def key_ranges(m0, prefix, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query tile [m0, m0 + BLOCK_M): key blocks starting below `full_end` are visible to the
    whole tile (and lie inside S); blocks in [full_end, hi) need the mask; keys >= hi are hidden."""
    full_end = (tl.minimum(tl.maximum(m0 + 1, prefix), S) // BLOCK_N) * BLOCK_N
    hi = tl.maximum(tl.minimum(m0 + BLOCK_M, S), prefix)
    return full_end, hi


@triton.jit
def query_ranges(n0, prefix, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the key block [n0, n0 + BLOCK_N): query blocks starting in [lo, full_start) need the mask,
    those from full_start on see every key of the block, queries below lo see none of it."""
    n1 = tl.minimum(n0 + BLOCK_N, S)
    lo = tl.where(n0 < prefix, 0, n0)
    lo = (lo // BLOCK_M) * BLOCK_M
    first_full = tl.where(n1 <= prefix, 0, n1 - 1)  # smallest query that sees every key of the block
    full_start = tl.maximum(tl.cdiv(first_full, BLOCK_M) * BLOCK_M, lo)
    return lo, full_start


@triton.jit
def visibility(q_pos, k_pos, prefix):
    """Query q_pos sees key k_pos, broadcast: (BLOCK_M, 1) x (1, BLOCK_N) gives the score tile's mask,
    (1, BLOCK_M) x (BLOCK_N, 1) its transpose. Keys >= S are hidden from real queries because
    prefix <= S and k <= q < S."""
    return (k_pos <= q_pos) | (k_pos < prefix)


def tile_work(S: int, prefix: int, block_m: int, block_n: int) -> tuple[int, int, int]:
    """(tiles computed, tiles masked, tiles of a dense kernel) for one (sample, head), by the same rule
    as `key_ranges`; used for the numbers in the module docstring and checked by the tests."""
    computed = masked = 0
    prefix = min(prefix, S)
    for m0 in range(0, S, block_m):
        full_end = (min(max(m0 + 1, prefix), S) // block_n) * block_n
        hi = max(min(m0 + block_m, S), prefix)
        n_full, n_all = full_end // block_n, math.ceil(hi / block_n)
        computed += n_all
        masked += n_all - n_full
    return computed, masked, math.ceil(S / block_m) * math.ceil(S / block_n)


# ---- launch configurations -----------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture, kernel and head dim, best first: the
# first entry is what AIMV2_KERNELS_AUTOTUNE=0 runs, so it must launch in every dtype
# (tests/test_attention_candidates.py checks bf16 and fp32); the autotuner picks one per (head dim,
# S bucket, mask mode, dot precision, dtype), see AUTOTUNE_KEY. BLOCK_M tiles queries, BLOCK_N keys.
#
# No candidate for D <= 128 makes two warpgroups compute the same rows or columns (D = 256: D256_NOTE). The dots are chained (scores
# feed P @ V, and dP^T feeds dK), and Triton lays a chained dot's warps along its rows: on sm_90 four
# warps make one 64-row wgmma, so 8 warps need 128 rows. The rows are queries in the forward and dQ
# (BLOCK_M), keys in dK/dV (BLOCK_N, its dots being K Q^T and V dO^T). compile_check reads each
# compiled dot's layout and fails a hot config that repeats rows or columns; the candidates of D = 64
# and 128 also compile without spills for their arch. Hence on sm_90: the forward at 128 x 128 with
# 8 warps or 64 x 64 with 4 (two programs per SM); dK/dV with 128 keys under 8 warps (or 64 keys
# under 4 at D = 64: at D = 128 that spills); dQ at 128 queries with 8 warps. sm_80's mma.sync lays its warps out differently (8 warps
# on a 64 x 32 score tile still repeat columns) and keeps operands in registers, which limits tiles.
#
# "bwd" is the dK/dV kernel of the atomic backward (attention_bwd.py): it also forms a (BLOCK_M, D)
# fp32 dQ tile per step, so its query tiles are shorter than dK/dV's where registers ran out (the
# tiles tried, in `python -m aimv2_kernels.compile_check --only attention_bwd_bwd`). "dkdv" and "dq" are the
# deterministic backward's kernels.
#
# dK/dV keeps two (BLOCK_N, D) fp32 accumulators, dQ one. A head dim without its own entry uses the
# next larger one (D = 16 uses D = 32's forward set and the D = 64 backward sets). GPUs with less
# shared memory than sm_80/sm_90 get num_stages capped at 2 (a config that still does not fit is
# dropped by the autotuner). See table_arch for which cards take which set.
_CANDIDATES = {
    90: {
        "fwd": {
            32: [(128, 64, 4, 3), (64, 64, 4, 3)],
            64: [(128, 128, 8, 3), (64, 64, 4, 3)],
            128: [(128, 128, 8, 2), (64, 64, 4, 3)],
            256: [(64, 32, 8, 2)],  # see D256_NOTE
        },
        "dkdv": {
            64: [(64, 128, 8, 3), (64, 64, 4, 3)],
            128: [(32, 128, 8, 3), (32, 128, 8, 2)],  # 64 keys with 4 warps spill here
            256: [(32, 32, 8, 2)],
        },
        "dq": {
            64: [(128, 64, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 2), (128, 32, 8, 3)],
            256: [(32, 32, 4, 2), (64, 32, 8, 2)],
        },
        "bwd": {
            64: [(64, 128, 8, 3), (64, 64, 4, 3)],
            128: [(32, 128, 8, 2), (32, 128, 8, 3)],  # 64 x 128 spills (dQ's 64 x 128 fp32 tile on top)
            256: [(32, 32, 8, 2)],
        },
    },
    80: {
        "fwd": {
            32: [(64, 64, 4, 3), (128, 64, 4, 3)],
            64: [(128, 64, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 2), (64, 32, 4, 3)],
            256: [(64, 32, 8, 2)],  # see D256_NOTE
        },
        "dkdv": {
            64: [(32, 128, 8, 3), (32, 64, 4, 3)],
            128: [(32, 64, 4, 3), (32, 64, 4, 2)],
            256: [(32, 32, 8, 2)],
        },
        "dq": {
            64: [(128, 32, 8, 3), (64, 64, 4, 3)],
            128: [(128, 32, 8, 2), (64, 32, 4, 3)],
            256: [(32, 32, 4, 2), (64, 32, 8, 2)],
        },
        "bwd": {
            64: [(32, 128, 8, 3), (32, 64, 4, 3)],
            128: [(16, 128, 8, 2)],  # every 32-query tile tried spills here
            256: [(32, 32, 8, 2)],
        },
    },
}
# D256_NOTE: D = 256 (no AIMv2 size, not hot in compile_check) keeps tiles whose layouts repeat rows
# (8 warps on 32 or 64 rows) but compile without spills; the non-repeating 4-warp tiles tried (forward
# 64 x 32, dK/dV 32 x 64, dQ 64 x 32) spilled on both arches, dK/dV by up to 5.8 KB of stack on sm_80.
KERNELS = ("fwd", "dkdv", "dq", "bwd")
# float32 inputs take twice the shared memory per tile: their own, smaller sets. Every first entry
# fits the 163 KiB per block of sm_80 (compile_check fails a first candidate that does not); shared
# bytes on sm_80 at D = 64 / 128 / 256: fwd 41 / 74 / 103 KiB, dK/dV 37 / 70 / 100, dQ 37 / 70 / 135.
_CANDIDATES_FP32 = {
    "fwd": {
        32: [(64, 32, 4, 2), (32, 32, 4, 2)],
        64: [(64, 32, 4, 2), (64, 64, 4, 2)],
        128: [(64, 32, 4, 2), (32, 32, 4, 2)],
        256: [(32, 32, 4, 2), (64, 32, 4, 1)],
    },
    "dkdv": {
        64: [(32, 32, 8, 2), (32, 64, 8, 2)],
        128: [(32, 32, 8, 2), (16, 32, 4, 2)],
        256: [(16, 32, 4, 2), (32, 32, 4, 1)],
    },
    "dq": {
        64: [(32, 32, 4, 2), (64, 32, 4, 2)],
        128: [(32, 32, 4, 2), (64, 32, 4, 2)],
        256: [(32, 32, 4, 2), (32, 32, 4, 1)],
    },
    "bwd": {
        64: [(32, 32, 8, 2), (32, 64, 8, 2)],
        128: [(32, 32, 8, 2), (16, 32, 4, 2)],
        256: [(16, 32, 4, 2), (32, 32, 4, 1)],
    },
}
# The interpreter runs one fixed small config (fast on CPU); tiles are deliberately not square so the
# tests exercise BLOCK_M != BLOCK_N in both directions, as the GPU configs do.
_INTERPRETER = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1), "bwd": (32, 64, 4, 1)}
PREPROCESS_BLOCK_M = 64  # rows per program of the delta = rowsum(dO * O) kernel


def table_arch(capability: tuple[int, int]) -> int:
    """Which candidate table serves a device: 90 for Hopper and the data-center Blackwells (sm_100:
    as much shared memory), else 80: Ampere, Ada, and the consumer Blackwells (sm_12x: mma.sync and
    about 100 KB of shared memory, where sm_90's 160 KB forward tile would not launch); also the
    CPU's (0, 0), whose launches never reach the autotuner."""
    return 90 if capability[0] in (9, 10) else 80


# compile_check's architectures and the device capability whose table each one checks
TABLE_CAPABILITIES = {80: (8, 0), 90: (9, 0)}


def candidate_configs(kernel: str, head_dim: int, capability: tuple[int, int] = (9, 0),
                      element_size: int = 2) -> list[triton.Config]:
    """The autotuning set of `kernel` ("fwd", "dkdv", "dq") for a head dim, a device capability and
    the inputs' element size (2: fp16/bf16, 4: fp32)."""
    big_smem = capability in ((8, 0), (9, 0), (10, 0))
    configs = []
    table = _CANDIDATES_FP32[kernel] if element_size == 4 else _CANDIDATES[table_arch(capability)][kernel]
    for block_m, block_n, warps, stages in table[min(d for d in table if d >= head_dim)]:
        stages = stages if big_smem else min(stages, 2)
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages))
    return configs


def aligned_args(signature: dict[str, str]) -> tuple[str, ...]:
    """Arguments a launch at AIMv2 sizes passes as multiples of 16 (Triton specializes on it): every
    pointer (fresh torch allocations, qkv slices at multiples of D) and every stride (multiples of D)."""
    return tuple(name for name, kind in signature.items() if kind.startswith("*") or name.startswith("stride_"))


def kernel_config(name: str, kernel_fn, signature: dict[str, str], head_dim: int, case: str, has_prefix: bool,
                  config: triton.Config, hot: bool, long_rows: bool = False, dtype: str = "bf16",
                  varlen: bool = False, arch: int | None = None) -> KernelConfig:
    """A compile-check entry for one of the tiled kernels (causal) at one autotuning config; the
    signature's pointers must be of `dtype` ("bf16", or "fp32" with exact dots); long_rows: int64
    row offsets (S x stride past 2^31), AIMv2 sizes use int32; varlen: the packed-sequence variant
    (the signature must then type CU_SEQLENS and T); arch: the one SM version whose candidate table
    the config comes from (None: compiled for every arch checked)."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    constexprs = dict(HAS_PREFIX=has_prefix, CAUSAL=True, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", LONG_ROWS=long_rows, VARLEN=varlen,
                      EVEN_S=even_s(dict(VARLEN=varlen, S=CASE_LENGTHS.get(case, 1), BLOCK_M=bm, BLOCK_N=bn)))
    if not has_prefix:
        constexprs["PREFIX"] = None
    if not varlen:
        constexprs.update(CU_SEQLENS=None, T=None)
    label = f"{name} D={head_dim} {dtype} {case} {bm}x{bn} w{config.num_warps} s{config.num_stages}"
    return KernelConfig(label, kernel_fn, signature, constexprs, config.num_warps, config.num_stages,
                        hot=hot, divisible_by_16=aligned_args(signature), arches=None if arch is None else (arch,))


FP32_HEAD_DIMS = (32, 64, 128, 256)  # fp32 compile-check entries: the first candidate must fit


# AIMv2 uses: encoder (S=256, per-sample prefix) and decoder (S=334, plain causal), head dim 128; 64 too.
AIMV2_CASES = (("enc S=256 prefix", True), ("dec S=334 causal", False))
# case label -> its S, for EVEN_S (a case without one checks the bounds-masked variant)
CASE_LENGTHS = {"enc S=256 prefix": 256, "dec S=334 causal": 334}


def interpreter_config(kernel: str) -> dict:
    block_m, block_n, warps, stages = _INTERPRETER[kernel]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def s_bucket(S: int) -> int:
    """Autotuning key for the sequence length: the next power of two (256 and 334 tune separately)."""
    return 1 << max(S - 1, 0).bit_length()


def even_s(args: dict) -> bool:
    """EVEN_S for a launch's arguments (config included): every tile lies inside S, so the kernels
    drop the bounds masks of their loads and stores. Padded batches only: with VARLEN, S is the
    grid's max_seqlen, not a sequence's length."""
    return not args["VARLEN"] and args["S"] % args["BLOCK_M"] == 0 and args["S"] % args["BLOCK_N"] == 0


@functools.cache
def _with_even_s(kernel_fn):
    # A heuristic, not a launcher argument: it depends on the tile, which the autotuner picks.
    return triton.heuristics({"EVEN_S": even_s})(kernel_fn)


AUTOTUNE_ENV = "AIMV2_KERNELS_AUTOTUNE"
# What one tuning result is reused for: the S bucket and every constexpr that changes the kernel's
# work per tile (mask mode, dot precision, packed sequences); without them a config tuned on the causal decoder would
# be reused for the prefix encoder. The autotuner reads its key from keyword arguments as well as
# positional ones (triton 3.6 to 3.9 alike), so the launchers pass these as keywords; it appends the
# tensor dtypes itself. The head dim and device class pick the autotuner instance (`autotuned`).
AUTOTUNE_KEY = ["S_BUCKET", "CAUSAL", "HAS_PREFIX", "DOT_PRECISION", "VARLEN"]


def autotune_enabled() -> bool:
    """False when AIMV2_KERNELS_AUTOTUNE=0: every kernel runs the first config of its candidate set and
    nothing is benchmarked (no tuning time, the same launch every run: sanitizers, short GPU checks).
    Read at each launch, so a test or a script can switch it without re-importing."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"


def autotuned(kernel_fn, kernel: str, head_dim: int, capability: tuple[int, int], element_size: int = 2):
    """`kernel_fn` wrapped in an autotuner over its candidate set, one per (head dim, device class,
    element size) and tuning switch; with AIMV2_KERNELS_AUTOTUNE=0 the set is only the first
    candidate, which triton.autotune launches without benchmarking."""
    return _autotuner(kernel_fn, kernel, head_dim, capability, element_size, autotune_enabled())


# (kernel, head dim, capability, element size, tuning switch) -> its triton Autotuner, for picked_configs
_tuners: dict[tuple, triton.runtime.Autotuner] = {}


# Buffers a kernel accumulates into (atomic adds): the autotuner zeroes them before timing each
# candidate and again before the real launch, or every timed run would add to the result.
ACCUMULATED = {"bwd": ["DQ_ACC"]}


@functools.cache
def _autotuner(kernel_fn, kernel: str, head_dim: int, capability: tuple[int, int], element_size: int, tune: bool):
    configs = candidate_configs(kernel, head_dim, capability, element_size)
    tuner = triton.autotune(configs=configs if tune else configs[:1], key=AUTOTUNE_KEY,
                            reset_to_zero=ACCUMULATED.get(kernel))(_with_even_s(kernel_fn))
    _tuners[(kernel, head_dim, capability, element_size, tune)] = tuner
    return tuner


def reset_autotuners() -> None:
    """Forget every autotuner and its choices (tests start from new ones)."""
    _autotuner.cache_clear()
    _tuners.clear()


def config_label(config: triton.Config) -> str:
    """e.g. "128x128 w8 s2": BLOCK_M x BLOCK_N, warps, stages."""
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"


def picked_configs() -> list[dict]:
    """What the autotuners of this process chose so far, for benchmarks to record next to their
    timings: one entry per kernel, head dim, device capability, element size and tuning key (the
    AUTOTUNE_KEY values, then the dtypes Triton appends). With AIMV2_KERNELS_AUTOTUNE=0 nothing is
    tuned: the entry has key None and the first candidate."""
    rows = []
    for (kernel, head_dim, capability, element_size, tune), tuner in _tuners.items():
        base = dict(kernel=kernel, head_dim=head_dim, capability=capability, element_size=element_size)
        if not tune:
            rows.append({**base, "key": None, "config": config_label(tuner.configs[0])})
            continue
        for key, config in tuner.cache.items():
            named = dict(zip(AUTOTUNE_KEY, key))
            named["dtypes"] = tuple(str(k) for k in key[len(AUTOTUNE_KEY):])
            rows.append({**base, "key": named, "config": config_label(config)})
    return rows


# kernel name -> the config every launch of it must use; set only by `forced_config` (tests, one
# thread), so the launchers stay free of test parameters.
_forced: dict[str, triton.Config] = {}


@contextlib.contextmanager
def forced_config(kernel: str, config: triton.Config) -> Iterator[None]:
    """Inside the block every launch of `kernel` ("fwd", "dkdv", "dq") uses exactly `config`, launched
    directly: no autotuner, and on the CPU instead of the interpreter config. This is how the tests
    run each candidate on its own, which autotuning alone never does (it runs only the fastest)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    previous = _forced.get(kernel)
    _forced[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            del _forced[kernel]
        else:
            _forced[kernel] = previous


def fixed_config(kernel: str, t: torch.Tensor) -> dict | None:
    """The launch parameters when `kernel` runs without the autotuner (a forced config, else the
    interpreter's), as kernel keywords; None when the autotuner picks."""
    forced = _forced.get(kernel)
    if forced is not None:
        return {**forced.kwargs, "num_warps": forced.num_warps, "num_stages": forced.num_stages}
    if use_interpreter_config(t):
        return interpreter_config(kernel)
    return None


def launch(kernel_fn, kernel: str, grid: Callable[[dict], tuple[int, ...]], t: torch.Tensor,
           args: tuple, meta: dict) -> None:
    """Launch `kernel_fn` for tensors like `t`: a fixed config directly, else through the autotuner.
    `grid` maps the config's keywords (BLOCK_M, BLOCK_N) to the grid, for both routes; `meta` holds
    the constexprs, HEAD_DIM included, passed as keywords so the autotuner keys on them. EVEN_S is
    derived from S and the config (`even_s`)."""
    config = fixed_config(kernel, t)
    if config is not None:
        _with_even_s(kernel_fn)[grid(config)](*args, **meta, **config)
    else:
        autotuned(kernel_fn, kernel, meta["HEAD_DIM"], device_capability(t), t.element_size())[grid](*args, **meta)


# ---- host helpers --------------------------------------------------------------------------------

def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use tf32 dots only when PyTorch allows tf32 matmuls (as torch.matmul does); 16-bit
    inputs ignore the setting."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the kernels cannot run these inputs (the caller then runs the reference), or None."""
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (kernels cover {', '.join(str(d) for d in KERNEL_DTYPES)})"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (kernels cover {KERNEL_HEAD_DIMS})"
    return None


@functools.cache
def warn_fallback_once(reason: str) -> None:
    warnings.warn(f"aimv2_kernels: Triton attention does not support {reason}; running the PyTorch reference", RuntimeWarning, stacklevel=3)


def prefix_argument(prefix_len: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """The kernels' PREFIX: None unless causal with a prefix, else the (B,) lengths made contiguous.
    The kernels read PREFIX[b] by element index, and a caller's prefix may be any view (a slice
    `t[::2]`, a scalar expanded to (B,)): copying B integers (nothing when already contiguous) is
    simpler than threading a stride through every kernel's prefix read."""
    if not causal or prefix_len is None:
        return None
    return prefix_len.contiguous()


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels address the last dim with stride 1. Inputs are validated for it; gradients coming
    from autograd may not be (e.g. an expanded dO from `out.sum().backward()`), so those are copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


MAX_BLOCK_ROWS = 256  # no tile is taller; masked rows past S still get (unused) addresses


def long_rows(S: int, *tensors: torch.Tensor) -> bool:
    """LONG_ROWS for kernels addressing rows of these (B, H, S, D) tensors: whether row * stride can
    pass int32 for a row the kernels compute an address for (up to S + a tile)."""
    return (S + MAX_BLOCK_ROWS) * max(abs(t.stride(2)) for t in tensors) >= 2**31


def device_capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (0, 0)


def use_interpreter_config(t: torch.Tensor) -> bool:
    return interpreter_enabled() or not t.is_cuda
