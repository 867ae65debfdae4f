"""Quantized KV formats: memory formulas exact to the byte, config and CLI selection, the generate
loop on every format (references on the CPU), and the Triton kernels under the interpreter."""

import pytest
import torch
from helpers import run_under_interpreter

import constant_state as cs
from constant_state.__main__ import main
from constant_state.cache.formats import format_names, get_format
from constant_state.kernels.paged_attention.decode import paged_attention
from constant_state.kernels.paged_attention.ref import dequantize_ref, is_head_major, is_token_contiguous
from constant_state.cache.quant import kivi_name
from constant_state.eval.memory import resolve_kv_formats
from models_under_test import TINY_LLAMA

QUANT = ["fp8", "int8", "int4", "int4-g32", "kivi2"]


def _model(kv):
    m = cs.build_model(TINY_LLAMA, dtype="float32", seed=0)
    m.kv_config = cs.KVConfig.coerce(kv)
    return m


@pytest.mark.parametrize("fmt", QUANT)
@pytest.mark.parametrize("bs, h, d", [(16, 8, 128), (4, 2, 64), (8, 3, 32)])
def test_page_bytes_equal_allocated_bytes(fmt, bs, h, d):
    f = get_format(fmt if fmt != "kivi2" else kivi_name(32, 16))
    st = f.make_storage(5, bs, h, d, "cpu")
    allocated = sum(t.numel() * t.element_size() for t in st.tensors())
    assert allocated == 5 * f.page_bytes(bs, h, d)
    rows = f.row_tensors(3, h, d, "cpu")
    assert sum(t.numel() * t.element_size() for t in rows.values()) == 3 * f.extra_bytes_per_sequence(h, d)


@pytest.mark.parametrize("fmt", QUANT)
def test_storage_is_head_major(fmt):
    """Codes and per-token scales are stored ``[N, Hkv, BS, ...]`` (a head's tokens of a block in one
    run); int4 / kivi2 values token-contiguous, kivi2 key scales per channel ``[N, Hkv, D]`` (dims
    contiguous; in 32-token blocks, chunks: ``ref.head_chunks``)."""
    c = get_format(fmt).make_storage(3, 16 if fmt != "kivi2" else 32, 2, 64, "cpu").cache
    assert is_head_major(c.k) and is_head_major(c.v_scale)
    assert is_token_contiguous(c.v) if fmt in ("int4", "int4-g32", "kivi2") else is_head_major(c.v)
    assert c.k_scale.stride(2) == 1 and c.k_scale.dim() == 3 if fmt == "kivi2" else is_head_major(c.k_scale)
    # Any other strided layout is refused by name.
    c.k = c.k.transpose(0, 1).contiguous().transpose(0, 1)  # stored [BS, N, Hkv, D]
    q = torch.zeros(1, 1, 2, 64)
    with pytest.raises(ValueError, match="contiguous or .quantized. head-major"):
        paged_attention(q, c, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0,
                        **({"res_k": torch.zeros(1, 16, 2, 64), "res_v": torch.zeros(1, 16, 2, 64)}
                           if fmt == "kivi2" else {}))


def test_memory_formulas():
    # Llama-3-8B layer: 8 KV heads x 128 dims, 16-token blocks.
    assert get_format("fp8").page_bytes(16, 8, 128) == 2 * 16 * 8 * (128 + 2)
    assert get_format("int8").page_bytes(16, 8, 128) == 2 * 16 * 8 * (128 + 2)
    assert get_format("int4").page_bytes(16, 8, 128) == 2 * 16 * 8 * (64 + 2 * 2 * 2)
    assert get_format("int4-g32").page_bytes(16, 8, 128) == 2 * 16 * 8 * (64 + 4 * 2 * 2)
    assert get_format("int4-g64").name == "int4"
    # kivi2, 16-token blocks, value groups of 64, residual window 128 (fp16 K and V per sequence).
    assert get_format("kivi2").page_bytes(16, 8, 128) == 2 * 16 * 8 * 32 + 2 * 2 * 8 * 128 + 2 * 2 * 16 * 8 * 2
    assert get_format("kivi2").extra_bytes_per_sequence(8, 128) == 2 * 128 * 8 * 128 * 2


def test_memory_targets_llama3_8b_32k_in_100gib():
    """The issue's capacity targets, from the formulas (the GPU benchmark checks them by allocating)."""
    from constant_state.models.config import PRESETS
    from constant_state.state import spec_bytes_per_sequence

    cfg = PRESETS["llama-3-8b"]
    fit = lambda kv: int(100 * 2 ** 30 // spec_bytes_per_sequence(cfg.state_specs(cs.KVConfig(**kv)), 32768))  # noqa
    assert fit({"format": "bf16"}) == 25
    assert fit({"format": "fp8"}) >= 48 and fit({"format": "int8"}) >= 48
    assert fit({"format": "int4"}) >= 75 and fit({"format": "int4", "group_size": 32}) >= 75
    assert fit({"format": "kivi2", "block_size": 32}) >= 125


def test_config_selection_and_validation():
    assert cs.KVConfig(format="int4", group_size=32).format_for(0, "bf16") == "int4-g32"
    with pytest.raises(ValueError, match="--kv-group-size"):
        cs.KVConfig(format="int4", group_size=48)
    with pytest.raises(ValueError, match="--kv"):
        get_format("int3")
    with pytest.raises(ValueError, match="--kv-residual"):
        cs.KVConfig(format="kivi2", residual_window=20, block_size=16)
    assert cs.KVConfig(format="kivi2", residual_window=64, group_size=32).format_for(0, "bf16") == "kivi2-g32-r64"
    m = cs.load("tiny-llama", kv="int8")
    assert {s.kv_format for s in m.state_specs()} == {"int8"}
    m = cs.load("tiny-llama", kv={"format": "int4", "group_size": 32})
    assert {s.kv_format for s in m.state_specs()} == {"int4-g32"}


def test_memory_cli_reports_every_format(capsys):
    assert main(["memory", "--model", "llama-3-8b", "--context", "32k", "--kv", "all"]) == 0
    out = capsys.readouterr().out
    for fmt in ["bf16", "fp16", "fp32", "fp8", "int8", "int4", "int4-g32", "kivi2"]:
        assert f" {fmt} " in out, fmt
    assert set(resolve_kv_formats(["all"])) <= set(format_names())


def test_generate_cli_with_quantized_kv(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                 "--kv", "int4", "--ids"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 4


@torch.no_grad()
@pytest.mark.parametrize("fmt", QUANT)
def test_generate_loop_close_to_full_precision(fmt):
    kv = {"format": fmt, "block_size": 4, **({"residual_window": 8} if fmt == "kivi2" else {})}
    ids = torch.randint(0, TINY_LLAMA.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    out = _model(kv).generate(ids, max_new_tokens=6)
    assert out.shape == (2, 27)
    # Logits with the quantized cache stay near full precision (loose: quantization error).
    full, _ = _model("fp32")(ids)
    quant, _ = _model(kv)(ids)
    tol = {"fp8": 0.05, "int8": 0.01, "int4": 0.1, "int4-g32": 0.1, "kivi2": 0.3}[fmt]
    assert (full - quant).abs().max().item() <= tol


@torch.no_grad()
def test_quantized_once_at_write():
    """Codes written by a step are never rewritten by later steps (no re-quantization of history)."""
    m = _model("int4")
    state = m.init_state(1, max_context=12)
    m(torch.arange(5)[None], state)
    st = state.kv_pool.storages[0]
    before = [t.clone() for t in st.tensors()]
    used = torch.tensor(state.seqs[0].blocks)
    m(torch.arange(5, 12)[None], state)
    k0, _ = dequantize_ref(st.cache)
    for a, b in zip(before, st.tensors()):
        a, b = a[used].flatten(1)[:, :1], b[used].flatten(1)[:, :1]  # first token of each block
        assert torch.equal(a, b)
    assert torch.isfinite(k0).all()


def test_backend_can_be_forced():
    st = get_format("int8").make_storage(2, 4, 1, 32, "cpu")
    st.backend = "ref"
    q = torch.randn(1, 1, 2, 32)
    st.write(torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32), torch.tensor([[0]]))
    out = st.attend(q, torch.tensor([[0]]), torch.tensor([1]), 0.2)
    assert out.shape == q.shape
    st.backend = "nope"
    with pytest.raises(ValueError, match="backend"):
        st.attend(q, torch.tensor([[0]]), torch.tensor([1]), 0.2)


def test_kernels_under_triton_interpreter():
    """tests/kernels/test_paged_attention_kernels.py in a fresh process with TRITON_INTERPRET=1
    (the interpreter must be chosen before triton is imported)."""
    assert " passed" in run_under_interpreter("test_paged_attention_kernels.py", "-x")


def test_kv_flags_in_help_and_memory_with_eviction(capsys):
    from constant_state.__main__ import build_parser

    helptext = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for flag in ("--kv-group-size", "--kv-residual", "--kv-eviction", "--kv-sinks", "--kv-window", "--kv-budget"):
        assert flag in helptext
    assert main(["memory", "--model", "llama-3-8b", "--context", "128k", "--kv", "bf16", "--kv-eviction",
                 "streaming", "--json"]) == 0
    import json
    row = json.loads(capsys.readouterr().out)[0]
    assert row["per_sequence"] == 32 * 8 * 128 * 2 * 2 * (16 + 1024 + 16)  # sink block + window + open block
    assert main(["memory", "--kv", "kivi2", "--kv-residual", "20"]) == 2


def test_default_block_size_is_32_for_kivi2_only():
    assert cs.KVConfig(format="kivi2").block_size == 32
    assert cs.KVConfig(format="int4").block_size == 16
    assert cs.KVConfig(format="bf16", layer_formats={3: "kivi2"}).block_size == 32
    assert cs.KVConfig(format="kivi2", block_size=16).block_size == 16
