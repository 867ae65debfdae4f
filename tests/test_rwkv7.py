"""RWKV-7: logits parity with the rwkv package's RWKV_x070 on a random .pth, references, loaders, generate.

The Triton kernels run on the CPU under Triton's interpreter in a subprocess
(tests/kernels/test_rwkv7_kernels.py): TRITON_INTERPRET must be set before triton is imported.
"""

import os

import pytest
import torch

import constant_state as cs
from constant_state.kernels import rwkv7 as k7
from constant_state.kernels.rwkv7.ref import rwkv7_chunk_ref, rwkv7_ref
from constant_state.models.rwkv7 import RWKV7, RWKV7Config, convert_blinkdl, convert_fla, config_from_blinkdl
from helpers import max_diff, run_under_interpreter
from models_under_test import TINY_RWKV7
from rwkv7_helpers import blinkdl_state_dict, blinkdl_to_fla, save_blinkdl

IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]
PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    return save_blinkdl(tmp_path_factory.mktemp("rwkv7"))


@pytest.fixture(scope="module")
def rwkv_pkg(pth):
    """The rwkv package's RWKV_x070 on the same checkpoint (strategy cpu fp32)."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    # Importing rwkv.model switches on TF32 and cudnn.benchmark process-wide: restore them afterwards.
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    rwkv_model = pytest.importorskip("rwkv.model")
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = flags
    if not hasattr(rwkv_model, "RWKV_x070"):
        pytest.fail("rwkv.model was imported before RWKV_V7_ON=1 was set; run this file in its own process")
    return rwkv_model.RWKV_x070(str(pth)[: -len(".pth")], "cpu fp32")


@pytest.fixture(scope="module")
def ours(pth):
    return cs.load(str(pth), dtype="float32")


@torch.no_grad()
def test_logits_match_rwkv_package_sequence_mode(ours, rwkv_pkg):
    ref, ref_state = rwkv_pkg.forward(IDS, None, full_output=True)  # [T, V]
    logits, state = ours(torch.tensor([IDS]))
    assert max_diff(logits[0], ref) <= PARITY_TOL
    # States agree too: the rwkv package keeps the wkv state as [H, V, K].
    for i, layer in enumerate(state.layers):
        assert max_diff(layer["att_shift"][0], ref_state[3 * i]) <= PARITY_TOL
        assert max_diff(layer["wkv"][0], ref_state[3 * i + 1].transpose(-1, -2)) <= PARITY_TOL
        assert max_diff(layer["ffn_shift"][0], ref_state[3 * i + 2]) <= PARITY_TOL


@torch.no_grad()
def test_logits_match_rwkv_package_one_token_mode(ours, rwkv_pkg):
    state, ref_state = ours.init_state(1), None
    for t in IDS:
        ref, ref_state = rwkv_pkg.forward([t], ref_state)
        logits, _ = ours(torch.tensor([[t]]), state)
        assert max_diff(logits[0, 0], ref) <= PARITY_TOL


def test_pth_config_inferred_from_tensors(ours):
    cfg = ours.config
    shape = (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.head_size, cfg.intermediate_size)
    assert shape == (97, 128, 2, 64, 512)
    assert (cfg.decay_lora, cfg.a_lora, cfg.v_lora, cfg.gate_lora) == (32, 32, 32, 32)
    assert cfg.model_type == "blinkdl" and ours.dtype == torch.float32


def test_pth_directory_detected(pth, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.pth").symlink_to(pth)
    model = cs.load(str(d), dtype="float32")
    assert isinstance(model, RWKV7) and model.config.num_layers == 2


def test_fla_names_convert_to_the_same_weights():
    sd = blinkdl_state_dict(seed=1)
    cfg = config_from_blinkdl(sd)
    ref = convert_blinkdl(sd, cfg)
    got = convert_fla(blinkdl_to_fla(sd), cfg)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_fla_config_json():
    hf = {"model_type": "rwkv7", "hidden_size": 768, "num_hidden_layers": 12, "head_dim": 64, "vocab_size": 65536,
          "decay_low_rank_dim": 64, "a_low_rank_dim": 64, "v_low_rank_dim": 32, "gate_low_rank_dim": 128,
          "intermediate_size": None, "hidden_ratio": 4, "norm_eps": 1e-5, "torch_dtype": "bfloat16"}
    cfg = RWKV7Config.from_hf(hf)
    ref = cs.resolve_config("rwkv7-0.1b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.decay_lora, cfg.a_lora, cfg.v_lora) == \
        (ref.hidden_size, ref.num_layers, ref.decay_lora, ref.a_lora, ref.v_lora)
    assert (cfg.intermediate_size, cfg.num_heads, cfg.gate_lora, cfg.dtype) == (3072, 12, 128, "bfloat16")
    with pytest.raises(ValueError, match="hidden_size"):
        RWKV7Config.from_hf({k: v for k, v in hf.items() if k != "hidden_size"})


def test_presets_have_the_real_shapes():
    c = cs.resolve_config("rwkv7-0.1b")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size, c.vocab_size) == (12, 768, 12, 3072, 65536)
    assert cs.resolve_config("rwkv7-2.9b").gate_lora == 320
    # Parameter count of the 0.1B shape: about 191M with its 65536-token vocabulary (embeddings 2 x 50M).
    with torch.device("meta"):
        n = RWKV7(c).num_parameters()
    assert 180e6 < n < 200e6


def test_state_specs_exact_bytes():
    cfg = RWKV7Config(hidden_size=128, num_layers=3, head_size=64, vocab_size=50, dtype="bfloat16")
    specs = cfg.state_specs()
    assert len(specs) == 3
    assert all(s.fixed_bytes == 2 * 128 * 2 + 2 * 64 * 64 * 4 for s in specs)
    assert [t.name for t in specs[0].tensors] == ["att_shift", "ffn_shift", "wkv"]
    assert specs[0].tensors[2].dtype == torch.float32


@pytest.mark.parametrize("t", [1, 7, 33, 70])
def test_chunked_reference_matches_loop(t):
    g = torch.Generator().manual_seed(t)
    b, h, d = 2, 2, 16
    r, k, v = (torch.randn(b, t, h, d, generator=g) for _ in range(3))
    w = -torch.rand(b, t, h, d, generator=g) * 3  # beyond the model's range: the chunked ref is exact for any w
    kk = torch.nn.functional.normalize(torch.randn(b, t, h, d, generator=g), dim=-1)
    a = -kk
    bb = kk * torch.rand(b, t, h, d, generator=g)
    s0 = torch.randn(b, h, d, d, generator=g)
    o1, s1 = rwkv7_ref(r, w, k, v, a, bb, s0)
    o2, s2 = rwkv7_chunk_ref(r, w, k, v, a, bb, s0, chunk_size=16)
    assert max_diff(o1, o2) <= 1e-4 and max_diff(s1, s2) <= 1e-4


@torch.no_grad()
def test_model_chunked_cpu_path_matches_loop(monkeypatch):
    model = cs.build_model(TINY_RWKV7, dtype="float32")
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(0))
    loop, _ = model(ids)
    monkeypatch.setattr(k7, "CHUNK_MIN_T", 2)
    chunked, _ = model(ids)
    assert max_diff(loop, chunked) <= 1e-4


def test_triton_kernels_under_interpreter():
    """tests/kernels/test_rwkv7_kernels.py in a subprocess with TRITON_INTERPRET=1 from the start."""
    out = run_under_interpreter("test_rwkv7_kernels.py")
    assert " passed" in out and "skipped" not in out, out[-2000:]


@torch.no_grad()
def test_greedy_generate_matches_argmax_of_full_forwards(ours):
    prompt = IDS[:5]
    out = cs.generate(ours, [prompt], max_new_tokens=6)
    seq = list(prompt)
    for _ in range(6):
        logits, _ = ours(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert out[0].tolist() == seq


@torch.no_grad()
def test_generate_batched_prompts_of_different_lengths(ours):
    prompts = [IDS[:4], IDS[:7], IDS[2:6]]
    out = cs.generate(ours, prompts, max_new_tokens=3)
    for i, p in enumerate(prompts):
        single = cs.generate(ours, [p], max_new_tokens=3)
        assert out[i, -3:].tolist() == single[0, -3:].tolist()


@torch.no_grad()
def test_v_first_is_not_in_the_state(ours):
    state = ours.init_state(1)
    ours(torch.tensor([IDS[:3]]), state)
    assert all(set(layer.tensors) == {"att_shift", "ffn_shift", "wkv"} for layer in state.layers)


def test_save_and_reload_own_format(ours, tmp_path):
    cs.save_checkpoint(ours, tmp_path / "ck")
    again = cs.load(str(tmp_path / "ck"), dtype="float32")
    ids = torch.tensor([IDS])
    with torch.no_grad():
        assert max_diff(ours(ids)[0], again(ids)[0]) == 0.0


def test_kernel_backend_validation():
    with pytest.raises(ValueError, match="kernel"):
        RWKV7Config(hidden_size=128, head_size=64, kernel="cuda")
    with pytest.raises(ValueError, match="multiple of head_size"):
        RWKV7Config(hidden_size=100, head_size=64)
    x = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match="backend"):
        k7.wkv7(x, x, x, x, x, x, torch.zeros(1, 1, 4, 4), backend="cuda")


def test_memory_of_a_pth_reads_its_shapes(pth):
    cfg = cs.resolve_config(str(pth))
    assert (cfg.hidden_size, cfg.num_layers, cfg.dtype) == (128, 2, "float32")
    assert sum(s.fixed_bytes for s in cfg.state_specs()) == 2 * (2 * 128 * 4 + 2 * 64 * 64 * 4)


@pytest.mark.parametrize("kernel", ["chunk-bf16", "chunk-fp32", "chunk_inverse", "chunk_inverse_blocked",
                                    "chunk_inverse_blocked32", "fused_recurrent", "fused_timemix", "prep", "out"])
def test_triton_kernels_compile_for_sm90(kernel):
    """Ahead-of-time compile for an H100/H200 (sm_90) target, no GPU needed: catches what the
    interpreter does not (types, layouts, tl.dot constraints)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from constant_state.kernels.rwkv7 import chunk, fused_layer, fused_recurrent

    def ptrs(fn, dtype, **special):
        skip = set(special.get("_consts", ()))
        return {n: special.get(n, f"*{dtype}") if n not in skip else "constexpr" for n in fn.arg_names}

    if kernel.startswith("chunk"):
        dt, prec = ("bf16", "tf32") if kernel == "chunk-bf16" else ("fp32", "ieee")
        consts = dict(K=64, V=64, BK=64, PRECISION=prec, BT=16, BV=64)
        fn = chunk._chunk_rwkv7_kernel
        sig = ptrs(fn, dt, w="*fp32", s="*fp32", inv="*fp32", T="i32", H="i32", _consts=consts)
        opts = dict(num_warps=4, num_stages=2)  # chunk.default_config at 32 x 12 heads
    elif kernel == "chunk_inverse":
        consts = dict(K=64, BK=64, BT=16, PRECISION="tf32")
        fn = chunk._chunk_inverse_kernel
        sig, opts = ptrs(fn, "bf16", w="*fp32", inv="*fp32", T="i32", H="i32", _consts=consts), dict(num_warps=4)
    elif kernel.startswith("chunk_inverse_blocked"):
        bt = 32 if kernel.endswith("32") else 16
        consts = dict(K=64, BK=64, BT=bt, LOG2BT=bt.bit_length() - 1, PRECISION="tf32")
        fn = chunk._chunk_inverse_blocked_kernel
        sig = ptrs(fn, "bf16", inv="*fp32", T="i32", H="i32", NC="i32", _consts=consts)
        opts = dict(num_warps=chunk.inverse_launch(torch.device("cpu"), 1, bt)[1], num_stages=1)
    elif kernel == "fused_recurrent":
        consts = dict(H=12, K=64, V=64, BK=64, BV=16)
        fn = fused_recurrent._fused_recurrent_rwkv7_kernel
        sig, opts = ptrs(fn, "bf16", s="*fp32", T="i32", _consts=consts), dict(num_warps=2)
    elif kernel == "fused_timemix":
        consts = dict(H=12, N=64, BN=64, HAS_V_LO=True, DECAY=0.606531)
        fn = fused_layer._fused_timemix_kernel
        sig, opts = ptrs(fn, "bf16", s="*fp32", T="i32", eps="fp32", _consts=consts), dict(num_warps=4)
    elif kernel == "prep":
        consts = dict(C=768, N=64, BN=64, BR=32, HAS_V_LO=True, DECAY=0.606531)
        fn = fused_layer._prep_kernel
        sig, opts = ptrs(fn, "bf16", log_w="*fp32", rows="i64", _consts=consts), dict(num_warps=4)
    else:
        consts = dict(C=768, N=64, BN=64, BR=32)
        fn = fused_layer._out_kernel
        sig, opts = ptrs(fn, "bf16", rows="i64", eps="fp32", _consts=consts), dict(num_warps=4)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                              options=opts)
    assert compiled.asm.get("cubin")
