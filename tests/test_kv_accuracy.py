"""benchmarks/kv_accuracy.py: each format's attention error against fp32 on Llama-like keys (CPU, the
references); kept working by this test, whose bounds separate the formats by their bits."""

import subprocess
import sys
from pathlib import Path


def _rows(args):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "benchmarks/kv_accuracy.py", *args], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1][:1].isdigit():
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def test_kv_accuracy_table():
    rows = _rows(["--context", "700", "--rows", "1", "--kv-heads", "1", "--formats", "bf16,int8,int4,kivi2",
                  "--block-sizes", "32,64"])
    assert set(rows) == {"fp32", "bf16", "int8", "int4", "kivi2 (bs 32)", "kivi2 (bs 64)"}
    assert abs(rows["fp32"][3] - 0.5) < 2e-3 and abs(rows["fp32"][4] - 0.5) < 2e-3  # the needles' calibration
    assert [rows[f][0] for f in ("bf16", "int8", "int4", "kivi2 (bs 32)", "kivi2 (bs 64)")] == [512, 260, 144, 88, 80]
    assert rows["bf16"][1] < 2e-3 and rows["bf16"][2] < 5e-3
    # fewer bits, larger errors: int8 < int4 < kivi2 on both kinds of query
    for col in (1, 2):
        assert rows["bf16"][col] < rows["int8"][col] < rows["int4"][col] < rows["kivi2 (bs 32)"][col]
    assert 0.01 < rows["kivi2 (bs 64)"][2] < 0.6
