"""One quantized decode launch per format at one shape, for Nsight Compute (present on the H200 machine).
It launches the decode kernel three times (compile, then two measured calls); profile the last one:

    ncu --kernel-name regex:_quant_decode --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section Occupancy --section SchedulerStats python benchmarks/profile_decode.py int4

Variants as in ab_quant_decode.py (``int4:64,2,5``, ``fp8:s3``); the CUDA kernel (``int4:cuda``) is
``--kernel-name regex:decode[248]_kernel``.
"""

from __future__ import annotations

import argparse

import ab_quant_decode
import torch
from bench_kv_decode import D, HQ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variant")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=32768)
    a = p.parse_args()
    q = torch.randn(a.batch, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    seq = torch.full((a.batch,), a.context, dtype=torch.int32, device="cuda")
    # three plain launches instead of the CUDA-graph timing (us and tb_s below are not timings)
    ab_quant_decode.bench_graph = lambda fn: (fn(), fn(), fn(), torch.cuda.synchronize(), 1.0)[-1]
    ab_quant_decode.run_variant(a.variant, a.batch, a.context, q, seq)


if __name__ == "__main__":
    main()
