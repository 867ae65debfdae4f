"""CUDA decode attention over quantized paged blocks (fp8, int8, int4, kivi2): a warp per split of the context.

The Triton decode kernels stream at most about 3 TB/s on 8-bit codes and 2 TB/s on int4 on the H200
(docs/benchmarks.md): their tile loop synchronises the warps of a program at every tile and stages
the tiles through shared memory. ``csrc/paged_decode.cu`` gives each warp its own tokens, softmax
and output partial, reads the codes from global memory straight into the tensor-core operand
registers, and needs no shared memory or barrier in its loop (layouts at the top of the file; the
opt-in staged variant, :data:`STAGED`, goes through a per-lane shared-memory ring instead).

The source is compiled at first use by ``nvcc`` for the device's architecture (about 25 s) into
``$CONSTANT_STATE_CACHE`` (default ``~/.cache/constant_state``), written atomically and keyed by a
hash of the source, the architecture and nvcc's version, and called through ``ctypes`` on torch's
current CUDA stream (CUDA-graph capturable). Without nvcc, or below compute capability 8.9 (the
fp8 conversion instruction), :func:`available` is False and the Triton kernel serves.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .ref import is_head_major, is_token_contiguous

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cu"
EMULATION = SOURCE.with_name("warp_emulation.h")  # CPU twin of its warp primitives (CS_EMULATE)
KINDS = {"fp8": 1, "int8": 2, "int4": 3, "kivi2": 4}
INT4_GROUPS = (32, 64)
KIVI2_GROUPS = (32, 64, 128)  # 8+ bytes per group: a thread's key bytes and a value byte block stay in one
BLOCK_SIZES = {"int4": (16, 32, 64), "kivi2": (32, 64)}  # compiled block sizes of the packed formats
HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # query heads per KV head: the 8 columns of the tensor-core tile
TILE = 16  # tokens per warp step (kivi2: STEPS)
STEPS = {"kivi2": 32}


def _env_int(name: str, default: str, allowed) -> int:
    value = os.environ.get(name, default)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return int(value)


# 1: fp8 / int8 / int4 tiles are staged through shared memory by cp.async, STAGES - 1 tiles ahead of the
# one in registers (more bytes in flight per warp than the registers' one tile ahead; kivi2 ignores it).
# Measured slower than the direct kernel on the H200 (docs/benchmarks.md, seventh session), so off.
# Environment: CONSTANT_STATE_DECODE_STAGED (0/1) and CONSTANT_STATE_DECODE_STAGES (compiled in, >= 2).
STAGED = _env_int("CONSTANT_STATE_DECODE_STAGED", "0", ("0", "1"))
STAGES = _env_int("CONSTANT_STATE_DECODE_STAGES", "4", tuple(str(n) for n in range(2, 9)))
# 1: with at most PAIR_MAX_G query heads per KV head, the formats of PAIRED_KINDS run the paired loop:
# two 16-token tiles per step share one score fragment (tile A's tokens in its columns 0-3, tile B's in
# 4-7), so the scores, softmax and P' of 32 tokens cost what one tile's did (paged_decode.cu,
# PairFeed). Environment: CONSTANT_STATE_DECODE_PAIRED (0/1).
PAIRED = _env_int("CONSTANT_STATE_DECODE_PAIRED", "1", ("0", "1"))
# Formats with a paired loop, and its groups (None: all). H200, batch 32 / 32k: int4 with groups of 32
# spills in its register loop (423 against 387 us), so it keeps the one-tile loop there; fp8 / int8 (memory-bound) measured
# 531 / 524 us paired against 516 / 524, so they have none (docs/benchmarks.md, fourteenth session).
PAIRED_KINDS = {"int4": (64,), "kivi2": None}
# Groups whose paired loop runs only fed by bulk copies (decode4_bulk_kernel; the register loop spills
# with them): where the cache is not in chunks they keep the one-tile loop (bulk_for). int4 with groups
# of 32 in 16-token chunks, H200, batch 32 / 32k: 380 -> 323 us (docs/benchmarks.md, twentieth session).
BULK_PAIRED_GROUPS = {"int4": (32,)}
PAIR_MAX_G = 4
# 1: where the paired loop serves blocks of BULK_BLOCK_SIZES tokens stored in chunks (``ref.head_chunks``,
# as cache/quant.py stores int4 (groups of 32 or 64) in 16-token blocks and kivi2 in 32- and 64-token blocks), its
# operands come by bulk copies of whole chunks into a shared-memory ring (paged_decode.cu,
# decode4_bulk_kernel, decode2_bulk_kernel) instead of loads into registers: 16 warps per SM instead of
# 12. H200, batch 32 / 32k: int4 328 -> 310 to 312 us, kivi2 332 -> 248 (docs/benchmarks.md, sixteenth
# and seventeenth sessions).
# Environment: CONSTANT_STATE_DECODE_BULK (0/1).
BULK = _env_int("CONSTANT_STATE_DECODE_BULK", "1", ("0", "1"))
BULK_BLOCK_SIZES = {"int4": (16,), "kivi2": (32, 64)}
# Per-split cost besides its tiles for decode.wave_splits, in 16-token tiles: a warp's prologue (queries,
# the first tiles' latency), its partial, its share of the merge. 8 (not Triton's 1) keeps one wave
# where a near-tie of the tile counts offered several. H200 (docs/benchmarks.md, eleventh session),
# batch 32 / 32k: 37 splits in 6 waves -> 6 in one, fp8 534 -> 513 us, int8 546 -> 542, int4 391 ->
# 377; batch 8 / 128k, 74 -> 24 splits: int4 413 -> 373, int8 533 -> 525.
SPLIT_OVERHEAD_TILES = 8
# Extra -D macros of the build behind :func:`_library`: the source's diagnostic builds (CS_TIMELINE,
# benchmarks/warp_timeline.py; CS_COMPUTE_ONLY and CS_LOADS_ONLY, ab_quant_decode.py's ``nomem`` and
# ``loads``). Empty for real use.
DEFINES: tuple[str, ...] = ()
WARPS = 4  # warps (work items) per block: the kernels' __launch_bounds__(128, 3) in paged_decode.cu


class _Params(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "out", "part", "ml", "k", "v", "ks", "vs", "kz", "vz",
                                                 "bt", "seq", "rk", "rv")]
                + [(n, ctypes.c_int32) for n in ("k_sb", "k_st", "k_sh", "v_sb", "v_st", "v_sh",
                                                  "ks_sb", "ks_st", "ks_sh", "vs_sb", "vs_st", "vs_sh", "v_sc")]
                + [(n, ctypes.c_int32) for n in ("hq", "hkv", "g", "m", "bs", "bs_shift", "window", "sinks",
                                                  "has_window", "splits", "chunk", "q_bf16", "r", "items", "staged",
                                                  "paired")]
                + [("scale_log2", ctypes.c_float)])


def _nvcc() -> str | None:
    """nvcc of ``$CUDA_HOME`` (or ``$CUDA_PATH``), else on ``PATH``, else ``/usr/local/cuda``."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").exists():
        found = "/usr/local/cuda/bin/nvcc"
    return found


def cache_dir() -> Path:
    return Path(os.environ.get("CONSTANT_STATE_CACHE", Path.home() / ".cache" / "constant_state"))


def _cached_build(name: str, key_parts: list[bytes], cmd: list[str], what: str) -> Path:
    """Runs ``cmd + [output]`` unless ``cache_dir()/name_<hash>.so`` exists; written atomically."""
    sources = b"".join(f.read_bytes() for f in (SOURCE, EMULATION))
    key = hashlib.sha256(sources + b"".join(key_parts)).hexdigest()[:16]
    out = cache_dir() / f"{name}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        res = subprocess.run(cmd + [str(lib)], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{what} failed on {SOURCE.name}:\n{res.stderr[-4000:]}")
        os.replace(lib, out)  # atomic: concurrent builders leave one complete file
    return out


def build(arch: str, nvcc: str | None = None, defines: tuple[str, ...] = ()) -> Path:
    """Compile the kernel for ``arch`` (e.g. ``"90"``) and return the shared library's path (cached);
    ``defines``: extra macros (``"NAME"`` or ``"NAME=VALUE"``, :data:`DEFINES`)."""
    nvcc = nvcc or _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME): the CUDA decode kernel cannot be built")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo", f"-DCS_STAGES={STAGES}",
           *(f"-D{d}" for d in defines), f"-gencode=arch=compute_{arch},code=sm_{arch}", str(SOURCE), "-o"]
    return _cached_build(f"paged_decode_sm{arch}", [arch.encode(), version.encode(), b"%d" % STAGES,
                                                    " ".join(defines).encode()], cmd, "nvcc")


def cuda_include() -> Path | None:
    """A CUDA include directory with ``cuda_fp16.h`` (for the emulated build), or None."""
    nvcc = _nvcc()
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), nvcc and str(Path(nvcc).parent.parent),
             "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


def build_emulated(cxx: str | None = None) -> Path:
    """The same kernels compiled by the host C++ compiler against ``csrc/warp_emulation.h`` (each lane
    a thread, the PTX emulated): a CPU library with the same entry points, for tests (slow)."""
    cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    include = cuda_include()
    if cxx is None or include is None:
        raise RuntimeError("the emulated CUDA decode kernel needs a C++20 compiler (g++) and the CUDA headers "
                           "(cuda_fp16.h; set CUDA_HOME)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    cmd = [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-DCS_EMULATE", f"-DCS_STAGES={STAGES}",
           "-x", "c++", f"-I{include}", str(SOURCE), "-o"]
    return _cached_build("paged_decode_emulated", [version.encode(), str(include).encode(), b"%d" % STAGES], cmd,
                         cxx)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.cs_decode.argtypes = [ctypes.POINTER(_Params)] + [ctypes.c_int] * 6 + [ctypes.c_void_p]
    lib.cs_decode_occupancy.argtypes = [ctypes.c_int] * 8 + [ctypes.POINTER(ctypes.c_int)]
    if lib.cs_decode_params_size() != ctypes.sizeof(_Params):
        raise RuntimeError(f"{SOURCE.name} and cuda_decode._Params disagree on the parameter layout")
    return lib


@functools.lru_cache(maxsize=None)
def _library(arch: str) -> ctypes.CDLL:
    return _load(build(arch, defines=DEFINES))


@functools.lru_cache(maxsize=None)
def emulated_library() -> ctypes.CDLL:
    """The CPU build of :func:`build_emulated`, loaded."""
    return _load(build_emulated())


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


_BUILD_ERRORS: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def available(device_index: int) -> bool:
    """Whether the kernel can run on this CUDA device (compute capability >= 8.9, nvcc, a clean build).
    A failed build is recorded in ``_BUILD_ERRORS`` and warned about once; the Triton kernel serves."""
    device = torch.device("cuda", device_index)
    if torch.cuda.get_device_capability(device) < (8, 9) or _nvcc() is None:
        return False
    try:
        _library(_arch(device))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        from ...cache.quant import warn_once

        _BUILD_ERRORS[_arch(device)] = str(e)
        warn_once(f"CUDA decode kernel unavailable, using Triton: {str(e).splitlines()[0]}")
        return False
    return True


def layout_error(kind: str, group: int, tensors, res_k: torch.Tensor | None = None,
                 res_v: torch.Tensor | None = None) -> str | None:
    """Why the cache tensors ``(k, v, ks, vs, kz, vz)`` are not in the storage layout the kernel is
    compiled for, or None. Inside a block the kernel's strides are constants: codes and per-token
    scales head-major (``ref.head_major``: a head's tokens one contiguous run), int4 / kivi2 value
    codes token-contiguous (``ref.token_contiguous``), 16-byte aligned (vector loads); the blocks'
    and heads' strides are free (< 2^31 bytes per block). cache/quant.py stores exactly this."""
    k, v, ks, vs, kz, vz = tensors
    bs = k.shape[1]
    if kind not in KINDS:
        return f"format {kind!r} (the kernel serves {', '.join(KINDS)})"
    if not is_head_major(k):
        return "key codes are not head-major (ref.head_major)"
    if kind in ("int4", "kivi2"):
        if not is_token_contiguous(v):
            return "value codes are not token-contiguous (ref.token_contiguous)"
        groups = INT4_GROUPS if kind == "int4" else KIVI2_GROUPS
        if group not in groups or bs not in BLOCK_SIZES[kind]:
            return f"{kind}: group {group} / block size {bs} not compiled (groups {groups}, blocks {BLOCK_SIZES[kind]})"
    elif v.stride() != k.stride():
        return "value codes are not in the keys' layout"
    scales = (vs, vz) if kind == "kivi2" else (ks, vs, kz, vz) if kind == "int4" else (ks, vs)
    if not all(x.dim() == 4 and is_head_major(x) for x in scales):
        return "per-token scales / zero points are not head-major (ref.head_major)"
    if kind == "kivi2" and not all(x is not None and x.dtype == torch.float16 and x.is_contiguous()
                                   and x.shape[2:] == k.shape[2:3] + (k.shape[3] * 4,) for x in (res_k, res_v)):
        return "kivi2: residual windows must be contiguous fp16 [B, R, Hkv, D]"
    used = [k, v, *scales] + ([ks] if kind == "kivi2" else [])
    if any(x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16 for x in used):
        return "cache tensors must be 16-byte aligned, blocks a multiple of 16 bytes"
    if max(k.stride(0), v.stride(0)) >= 2 ** 31:
        return "blocks of >= 2^31 bytes"
    return None


def supports(kind: str, group: int, q: torch.Tensor, tensors, hkv: int,
             res_k: torch.Tensor | None = None, res_v: torch.Tensor | None = None) -> bool:
    """Shapes and dtypes this kernel serves (else the Triton kernel does): one query token in bf16 or
    fp16, head dim 64 or 128, at most 8 query heads per KV head, blocks of a power of two >= 16 tokens
    (int4: 16, 32 or 64 tokens; kivi2: 32 or 64, ``BLOCK_SIZES``), and the cache tensors ``tensors`` in
    the storage layout (:func:`layout_error`; int4 groups of 32 or 64 dims, kivi2 32 to 128)."""
    b, t, hq, d = q.shape
    bs = tensors[0].shape[1]
    return (q.is_cuda and t == 1 and q.dtype in (torch.float16, torch.bfloat16)
            and d in HEAD_DIMS and hq // hkv <= MAX_GROUP and bs % TILE == 0 and bs & (bs - 1) == 0
            and (kind != "kivi2" or res_k is not None and res_k.shape[0] == b)
            and layout_error(kind, group, tensors, res_k, res_v) is None and available(q.device.index or 0))


@functools.lru_cache(maxsize=64)
def warp_slots(kind: str, d: int, group: int, device_index: int, staged: int = 0, bs: int = 16,
               paired: int = 0) -> int:
    """Warps resident on the whole GPU at once (CUDA occupancy calculator x SMs x warps per block)."""
    lib = _library(_arch(torch.device("cuda", device_index)))
    blocks = ctypes.c_int(0)
    err = lib.cs_decode_occupancy(KINDS[kind], d, group, bs, staged, paired, WARPS, device_index,
                                  ctypes.byref(blocks))
    if err:
        raise RuntimeError(f"cudaOccupancyMaxActiveBlocksPerMultiprocessor failed ({err})")
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    return max(1, blocks.value) * WARPS * sms


def staged_for(kind: str, ks: torch.Tensor, vs: torch.Tensor, staged: int | None = None) -> int:
    """1 where the staged variant serves: ``staged`` (default :data:`STAGED`) on, fp8 / int8 / int4, and
    even block strides of the scales (a 2-byte scale's word is found with block id 0, paged_decode.cu)."""
    on = STAGED if staged is None else staged
    return int(bool(on) and kind != "kivi2" and ks.stride(0) % 2 == 0 and vs.stride(0) % 2 == 0)


def paired_for(kind: str, group: int, g: int, staged: int, paired: int | None = None) -> int:
    """1 where the paired loop serves: ``paired`` (default :data:`PAIRED`) on, a format (and group) of
    :data:`PAIRED_KINDS`, the direct kernel, and at most PAIR_MAX_G query heads per KV head (two tiles
    share the 8 columns of one score fragment)."""
    on = PAIRED if paired is None else paired
    groups = PAIRED_KINDS.get(kind, ())
    served = kind in PAIRED_KINDS and (groups is None or group in groups
                                       or group in BULK_PAIRED_GROUPS.get(kind, ()))
    return int(bool(on) and served and not staged and g <= PAIR_MAX_G)


def chunk_error(kind: str, tensors) -> str | None:
    """Why ``(k, v, ks, vs, kz, vz)`` of int4 or kivi2 do not lie in the chunks of ``ref.head_chunks`` in the
    order ``ref.CHUNK_PARTS`` (key codes, value codes, key scales, key zero points, value scales, value zero
    points; kivi2's key scales and zero points per channel, ``[N, H, D]``) that the kernels fed by bulk
    copies read (decode4_bulk_kernel, decode2_bulk_kernel), or None."""
    k, v, ks, vs, kz, vz = tensors
    n, bs, h, width = k.shape
    key_scales = 2 * ks.shape[-1] * (1 if kind == "kivi2" else bs)
    sizes = (bs * width, bs * width, key_scales, key_scales, 2 * bs * vs.shape[3], 2 * bs * vs.shape[3])
    chunk = sum(sizes)

    def heads_apart(x, dim):  # a head's chunk follows the previous head's (any stride for a single head)
        return h == 1 or x.stride(dim) * x.element_size() == chunk

    if k.stride(0) != h * chunk or k.stride(1) != width or k.stride(3) != 1 or not heads_apart(k, 2):
        return f"key codes are not in chunks of {chunk} bytes"
    off = 0
    for name, x, size in zip(("value codes", "key scales", "key zero points", "value scales", "value zero points"),
                             (v, ks, kz, vs, vz), sizes):
        off += size
        head_dim = 1 if x.dim() == 3 else 2  # kivi2's key scales [N, H, D]
        if x.data_ptr() - k.data_ptr() != off or x.stride(0) * x.element_size() != h * chunk \
                or not heads_apart(x, head_dim):
            return f"{name} are not part {off} of the key codes' chunks"
    return None


def bulk_for(kind: str, group: int, paired: int, tensors, bulk: int | None = None) -> int:
    """2 (``DecodeParams::paired``) where the paired loop is fed by bulk copies: ``bulk`` (default
    :data:`BULK`) on, the paired loop serving (``paired``, :func:`paired_for`), the format's block size
    (:data:`BULK_BLOCK_SIZES`: int4 16, kivi2 32 or 64 tokens) and the cache in chunks (:func:`chunk_error`);
    else ``paired``, or 0 (the one-tile loop) for a ``group`` of :data:`BULK_PAIRED_GROUPS`."""
    on = BULK if bulk is None else bulk
    serves = (on and paired and tensors[0].shape[1] in BULK_BLOCK_SIZES.get(kind, ())
              and chunk_error(kind, tensors) is None)
    if serves:
        return 2
    if paired and group in BULK_PAIRED_GROUPS.get(kind, ()):
        return 0
    return paired


def _params(q, kind, group, tensors, block_tables, seq_lens, scale, sliding_window, sinks, num_splits, slots,
            res_k=None, res_v=None, staged=0, paired=0):
    """(parameter block, out, part, ml, splits) of one launch; ``slots`` = resident warps (for the split
    count); ``staged`` / ``paired``: the launch's :func:`staged_for` / :func:`paired_for`."""
    from .decode import _split_buffers, _split_chunks, wave_splits

    k, v, ks, vs, kz, vz = tensors
    b, _, hq, d = q.shape
    n, bs, hkv = k.shape[:3]
    m = block_tables.shape[1]
    step = 2 * TILE if paired else STEPS.get(kind, TILE)
    if paired == 2:
        step = max(step, bs)  # the loops fed by bulk copies take whole blocks (kivi2: 64-token ones)
    n_tiles = -(-(m * bs) // step)
    if num_splits is None:
        num_splits = wave_splits(b * hkv, n_tiles, slots(), SPLIT_OVERHEAD_TILES * TILE / step)
    chunk, num_splits = _split_chunks(n_tiles, step, m * bs, num_splits)
    out = torch.empty_like(q)
    part, ml = _split_buffers(out, b * hq, num_splits)
    kstr = (ks.stride(0), 0, ks.stride(1)) if kind == "kivi2" else ks.stride()[:3]  # kivi2: per channel [N, H, D]
    res = (res_k.data_ptr(), res_v.data_ptr(), res_k.shape[1]) if kind == "kivi2" else (None, None, 1)
    p = _Params(q.data_ptr(), out.data_ptr(), part.data_ptr(), ml.data_ptr(), k.data_ptr(), v.data_ptr(),
                ks.data_ptr(), vs.data_ptr(), kz.data_ptr(), vz.data_ptr(), block_tables.data_ptr(),
                seq_lens.data_ptr(), res[0], res[1], k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                v.stride(1), v.stride(2), *kstr, vs.stride(0), vs.stride(1), vs.stride(2), v.stride(3),
                hq, hkv, hq // hkv, m, bs, bs.bit_length() - 1, sliding_window or 0, sinks, sliding_window is not None,
                num_splits, chunk, q.dtype == torch.bfloat16, res[2], b * hkv * num_splits, staged, paired,
                scale * 1.4426950408889634)
    return p, out, part, ml, num_splits


def decode(q, kind, group, tensors, block_tables, seq_lens, scale, sliding_window, sinks, num_splits,
           res_k=None, res_v=None):
    """Launch for :func:`.decode.paged_attention` (arguments validated there): ``q [B, 1, Hq, D]``;
    ``tensors`` = key / value codes, scales and zero points (8-bit formats: the scales again); kivi2
    also its residual windows ``res_k, res_v``."""
    from .decode import _merge_splits

    d, dev = q.shape[-1], q.device.index or 0
    st = staged_for(kind, tensors[2], tensors[3])
    pa = bulk_for(kind, group, paired_for(kind, group, q.shape[2] // tensors[0].shape[2], st), tensors)
    slots = lambda: warp_slots(kind, d, group, dev, st, tensors[0].shape[1], pa)  # noqa: E731
    p, out, part, ml, splits = _params(q, kind, group, tensors, block_tables, seq_lens, scale, sliding_window,
                                       sinks, num_splits, slots, res_k, res_v, st, pa)
    err = _library(_arch(q.device)).cs_decode(ctypes.byref(p), KINDS[kind], d, group, q.shape[0], WARPS, dev,
                                             torch.cuda.current_stream(q.device).cuda_stream)
    if err:
        raise RuntimeError(f"paged decode launch failed: CUDA error {err}")
    _merge_splits(part, ml, out, q.shape[0] * q.shape[2], splits)
    return out


def decode_emulated(q, kind, group, tensors, block_tables, seq_lens, scale, sliding_window=None, sinks=0,
                    num_splits=None, res_k=None, res_v=None, staged=None, paired=None, bulk=None):
    """:func:`decode` on CPU tensors through :func:`emulated_library` (the kernels' source, each lane a
    thread), split partials merged by :func:`.ref.merge_splits_ref`. Arguments as :func:`decode` takes
    them from ``decode.paged_attention`` (contiguous ``q``, int32 tables and lengths); ``staged``,
    ``paired`` and ``bulk`` as :func:`staged_for`, :func:`paired_for` and :func:`bulk_for` take them."""
    from .ref import merge_splits_ref

    why = layout_error(kind, group, tensors, res_k, res_v)
    if why is not None:
        raise ValueError(f"emulated decode: {why}")
    d = q.shape[-1]
    st = staged_for(kind, tensors[2], tensors[3], staged)
    pa = bulk_for(kind, group, paired_for(kind, group, q.shape[2] // tensors[0].shape[2], st, paired), tensors, bulk)
    p, out, part, ml, splits = _params(q, kind, group, tensors, block_tables, seq_lens, scale, sliding_window,
                                       sinks, num_splits, lambda: 4 * WARPS * 3, res_k, res_v,  # 4 emulated SMs
                                       st, pa)
    err = emulated_library().cs_decode(ctypes.byref(p), KINDS[kind], d, group, q.shape[0], WARPS, 0, None)
    if err:
        raise RuntimeError("emulated decode: lanes of a warp diverged at a collective" if err == -1
                           else f"emulated decode failed ({err})")
    if splits > 1:
        out.copy_(merge_splits_ref(part, ml, splits).view_as(out))
    return out
