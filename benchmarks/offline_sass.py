"""Compile the quantized decode kernel for the H200 (sm_90) on a machine without a GPU and count the
instructions of its main loop: a cheap first look before spending device time.

Triton compiles to PTX and cubin for any target without a driver; ``nvdisasm`` and ``ptxas`` ship
with Triton's NVIDIA backend. The loop is found as the body of the backward branch with the most
instructions. Per-token figures are warp instructions per token and KV head (loop body x warps /
BLOCK_N). Note: the GPU machine runs an older Triton (3.6) than CI (3.9) and their code differs (fp8 loop: 1220
instructions with 3.6, 866 with 3.9): compile with the GPU's version, e.g. ``pip install --target
/tmp/t36 triton==3.6.0`` and ``PYTHONPATH=/tmp/t36``.

    python benchmarks/offline_sass.py --kind fp8 --config 128,4,3,168
    python benchmarks/offline_sass.py --kind int4 --config 64,2,3 --show LDS

``--cuda`` does the same for the CUDA decode kernel (csrc/paged_decode.cu, compiled by nvcc): its
loops with their instruction counts (the main loop walks 16-token tiles, kivi2's 32-token steps; one
warp per split, so per-token figures are loop body / tokens per iteration).

    python benchmarks/offline_sass.py --cuda --kind int4 [--staged | --paired | --bulk]
    python benchmarks/offline_sass.py --cuda --kind kivi2 --bulk --block-size 64
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from constant_state.kernels.paged_attention import decode_quant

FORMATS = {  # kind id, values per byte, group (D = 128), block size, code type
    "fp8": (1, 1, 128, 16, "*u8"), "int8": (2, 1, 128, 16, "*i8"), "int4": (3, 2, 64, 16, "*u8"),
    "int4-g32": (3, 2, 32, 16, "*u8"), "kivi2": (4, 4, 64, 32, "*u8"),
}


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_decode(fmt: str, block_n: int, num_warps: int, num_stages: int, maxnreg: int | None, g: int = 4):
    kind, p, group, bs, cty = FORMATS[fmt]
    d = 128
    gq = triton.next_power_of_2(g)
    if kind == 4:
        ngp = max(d // group, triton.cdiv(16, gq))
    else:
        ngp = d // group
        gq = max(gq, triton.cdiv(16, ngp))
    sig = dict(q_ptr="*bf16", o_ptr="*bf16", part_ptr="*fp32", ml_ptr="*fp32", k_ptr=cty, v_ptr=cty,
               ks_ptr="*fp16", vs_ptr="*fp16", kz_ptr="*fp16", vz_ptr="*fp16", rk_ptr="*fp16", rv_ptr="*fp16",
               bt_ptr="*i32", seq_ptr="*i32")
    for name in ("HQ", "HKV", "M", "R"):
        sig[name] = "i32"
    sig["scale_log2"] = "fp32"
    for name in ("stride_cb stride_ct stride_ch stride_wb stride_wh stride_kb stride_kt stride_kh "
                 "stride_vb stride_vt stride_vh WINDOW SINKS G CHUNK SPLITS").split():
        sig[name] = "i32"
    const = dict(KIND=kind, P=p, D=d, GROUP=group, BS=bs, GQ=gq, NGP=ngp, BLOCK_N=block_n,
                 KB=max(1, block_n // bs) if kind == 4 else 1, SPLIT=True, HAS_WINDOW=False, DOT_F32=False)
    # value codes: token-contiguous (int4, kivi2) or token-major (fp8, int8), as cache/quant.py stores them
    const["VT"] = kind >= 3
    name = fmt.split("-")[0]
    const.update(KOFF=decode_quant._offset(name, group, False, decode_quant.OFFSET_KEYS),
                 VOFF=decode_quant._offset(name, group, False, decode_quant.OFFSET_VALUES))
    sig.update({k: "constexpr" for k in const})
    names = list(sig)
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n.startswith("stride_") or n == "M"]
    src = ASTSource(fn=decode_quant._quant_decode_kernel, signature=sig, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def loop_body(sass: str) -> list[str]:
    found = loops(sass)
    return found[0] if found else []


# CUDA kernel per format at head dim 128: (mangled name prefix, tokens per step, HMMA per step). A loop
# unrolled by two (tile_loop's PINGPONG) has twice the HMMA and covers twice the tokens.
CUDA_KERNELS = {"fp8": ("decode8_kernelILi128ELi1E", 16, 16), "int8": ("decode8_kernelILi128ELi2E", 16, 16),
                "int4": ("decode4_kernelILi128ELi32E", 16, 16), "int4-g32": ("decode4_kernelILi128ELi16E", 16, 16),
                "kivi2": ("decode2_kernelILi128ELi16E", 32, 40)}


def loops(sass: str, innermost: bool = False) -> list[list[str]]:
    """Bodies of the backward branches of one function's SASS, largest first (``innermost``: only those
    that enclose no other)."""
    labels, instrs = {}, []
    for line in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(.*?);", line)
        if m:
            instrs.append(m.group(1))
    spans = []
    for i, text in enumerate(instrs):
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
        target = re.search(r"(\.L_x_\d+)", text)
        if op == "BRA" and target and labels.get(target.group(1), 1 << 60) < i:
            spans.append((labels[target.group(1)], i + 1))
    if innermost:  # drop spans that enclose another (an outer loop, or a branch around several loops)
        spans = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return sorted((instrs[a:b] for a, b in spans), key=len, reverse=True)


# The paired loops (two 16-token tiles share a score fragment, G <= 4): (mangled name prefix, tokens, HMMA per step).
CUDA_PAIRED = {"int4": ("decode4_pair_kernelILi128ELi32E", 32, 32), "kivi2": ("decode2_kernelILi128ELi16E", 32, 40)}
CUDA_BULK = {"int4": ("decode4_bulk_kernelILi128ELi32E", 32, 32), "kivi2": ("decode2_bulk_kernelILi128ELi16E", 32, 40)}
# kivi2's bulk loop per block size (a template parameter): (tokens, HMMA) of an iteration's block constant and
# steps (one constant per block: 8 + 32 per 32-token block, 8 + 64 per 64-token one)
CUDA_BULK_KIVI2 = {32: (32, 40), 64: (64, 72)}


def cuda_main(kind: str, staged: bool, top: int, paired: bool = False, bulk: bool = False,
              block_size: int = 32) -> None:
    from constant_state.kernels.paged_attention import cuda_decode

    nvcc = cuda_decode._nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found (set CUDA_HOME)")
    cubin = "/tmp/offline_sass_cuda.cubin"
    res = subprocess.run([nvcc, "-O3", "-std=c++17", "-cubin", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v",
                          f"-DCS_STAGES={cuda_decode.STAGES}", "-o", cubin, str(cuda_decode.SOURCE)],
                         capture_output=True, text=True, check=True)
    if paired and kind not in CUDA_PAIRED:
        raise SystemExit(f"--paired: {kind} has no paired loop (paired: {', '.join(CUDA_PAIRED)})")
    if bulk and kind not in CUDA_BULK:
        raise SystemExit(f"--bulk: {kind} has no loop fed by bulk copies (bulk: {', '.join(CUDA_BULK)})")
    name, step_tokens, step_mma = CUDA_BULK[kind] if bulk else CUDA_PAIRED[kind] if paired else CUDA_KERNELS[kind]
    # the bulk loops' template parameters are D and GP (kivi2's also the block size)
    if kind == "kivi2" and bulk:
        name += f"Li{block_size}E"
        step_tokens, step_mma = CUDA_BULK_KIVI2[block_size]
    if kind != "kivi2" and not paired and not bulk:  # kivi2 and the paired loops have no staged variant
        name += "Lb1E" if staged else "Lb0E"
    if kind in ("int4", "int4-g32", "kivi2") and not bulk:  # packed formats: the block size is a template parameter
        name += f"Li{FORMATS[kind][3]}E"
    if kind == "kivi2" and not bulk:  # its PAIRED template parameter
        name += "Lb1E" if paired else "Lb0E"
    info = res.stderr.split(name, 1)[1].split("Compiling entry", 1)[0]
    regs = " ".join(l.split("info    :")[-1].strip() for l in info.splitlines() if "registers" in l or "spill" in l)
    sass = subprocess.run([_bin("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    func = sass.split(f"{name}EEv12DecodeParams:", 1)[1].split("//---------------------", 1)[0]
    print(f"{kind} (CUDA, {name}): {regs}")
    for body in loops(func, innermost=True):
        if len(body) < 40:
            continue
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
        mma = sum(v for k, v in ops.items() if k.startswith("HMMA"))
        if mma % step_mma == 0 and mma:  # a main loop: its tokens per iteration from its products
            tokens = step_tokens * mma // step_mma
            print(f"main loop: {len(body)} instructions ({mma} HMMA) per warp per {tokens} tokens = "
                  f"{len(body) / tokens:.1f} warp instructions per token and KV head")
        else:
            print(f"loop: {len(body)} instructions ({mma} HMMA)")
        print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(top)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=list(FORMATS), default="fp8")
    ap.add_argument("--config", default=None, help="BLOCK_N,warps,stages[,maxnreg] (default: decode_quant.TILE_CONFIGS)")
    ap.add_argument("--top", type=int, default=24, help="opcodes listed in the histogram")
    ap.add_argument("--show", default=None, help="print the loop's instructions whose opcode starts with this")
    ap.add_argument("--cuda", action="store_true", help="the CUDA decode kernel (nvcc) instead of the Triton one")
    ap.add_argument("--staged", action="store_true",
                    help="--cuda: the variant that stages tiles through shared memory (cp.async)")
    ap.add_argument("--paired", action="store_true",
                    help="--cuda: the paired loop (two tiles share a score fragment, G <= 4; int4, kivi2)")
    ap.add_argument("--bulk", action="store_true",
                    help="--cuda: the paired loop fed by bulk copies of chunks (int4, kivi2)")
    ap.add_argument("--block-size", type=int, choices=sorted(CUDA_BULK_KIVI2), default=32,
                    help="--cuda --bulk --kind kivi2: the kernel for this block size")
    a = ap.parse_args()
    if a.cuda:
        cuda_main(a.kind, a.staged, a.top, a.paired, a.bulk, a.block_size)
        return
    cfg = [int(x) for x in a.config.split(",")] if a.config else list(decode_quant.TILE_CONFIGS[a.kind.split("-")[0]])
    block_n, warps, stages, *cap = cfg
    c = compile_decode(a.kind, block_n, warps, stages, cap[0] if cap else None)
    cubin = "/tmp/offline_sass.cubin"
    with open(cubin, "wb") as f:
        f.write(c.asm["cubin"])
    sass = subprocess.run([_bin("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    ptx = "/tmp/offline_sass.ptx"
    with open(ptx, "w") as f:
        f.write(c.asm["ptx"])
    ptxas = _bin("ptxas-blackwell") if os.path.exists(_bin("ptxas-blackwell")) else _bin("ptxas")
    info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull], capture_output=True, text=True)
    regs = " ".join(l.split("info    :")[-1].strip() for l in info.stderr.splitlines() if "registers" in l or "spill" in l)
    body = loop_body(sass)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
    print(f"{a.kind} config {tuple(cfg)}: {regs or info.stderr.strip()[:200]}")
    print(f"main loop: {len(body)} instructions per warp per {block_n}-token tile = "
          f"{len(body) * warps / block_n:.1f} warp instructions per token and KV head")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(a.top)))
    if a.show:
        for t in body:
            if re.sub(r"^@!?U?P\w+\s+", "", t).startswith(a.show):
                print("   ", t)


if __name__ == "__main__":
    main()
