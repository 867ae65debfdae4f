"""Mamba-1 / Mamba-2: parity with transformers, mamba-ssm checkpoints, refs, state save/load, backends."""

import json
import warnings

import pytest
import torch

import constant_state as cs
from constant_state.kernels.mamba import backend as mb
from constant_state.kernels.mamba import ref
from constant_state.models.mamba import Mamba2Config, MambaConfig
from constant_state.state import spec_bytes_per_sequence
from constant_state.state_io import load_state, save_state
from helpers import max_diff, run_under_interpreter

V = 96
# Mamba-2 tolerance: our chunked SSD reference and HF's torch path are the same algorithm in fp32
# but associate the sums differently (einsum order, segment sums over chunks, the decode step's
# recurrence). Measured max |diff| of logits is ~1e-6; 1e-4 keeps the Mamba-1 bar, the bar a
# mis-mapped tensor or a wrong group/norm convention (errors of order 1e-1) cannot pass.
TOL = {"mamba": 1e-4, "mamba2": 1e-4}


def _hf_config(kind: str):
    from transformers import Mamba2Config as HFMamba2Config
    from transformers import MambaConfig as HFMambaConfig

    if kind == "mamba":
        return HFMambaConfig(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                             conv_kernel=4, time_step_rank=4, use_bias=True, pad_token_id=0, bos_token_id=0,
                             eos_token_id=0)
    # n_groups > 1 and a chunk size that the test lengths are not multiples of.
    return HFMamba2Config(vocab_size=V, hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=2,
                          chunk_size=16, num_hidden_layers=2, expand=2, tie_word_embeddings=False,
                          pad_token_id=0, bos_token_id=0, eos_token_id=0)


_HF_CACHE = {}


def _hf_model(kind: str):
    """A tiny random HF model in fp32 with non-trivial norms, D, dt biases, conv biases and A."""
    if kind not in _HF_CACHE:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_hf_config(kind), dtype=torch.float32).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith(("bias", ".D", "A_log")):
                    p.add_(torch.randn_like(p) * 0.2)
        _HF_CACHE[kind] = model
    return _HF_CACHE[kind]


def _save_hf(tmp_path, kind):
    d = tmp_path / kind
    _hf_model(kind).save_pretrained(d)
    return d


def _ids(b, t, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: _save_hf(root, k) for k in ("mamba", "mamba2")}


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("t", [1, 16, 37])
def test_logits_match_hf(hf_dirs, kind, t):
    ours = cs.load(str(hf_dirs[kind]), dtype="float32")
    assert isinstance(ours.config, MambaConfig if kind == "mamba" else Mamba2Config)
    ids = _ids(2, t)
    with torch.no_grad():
        expected = _hf_model(kind)(ids).logits
    logits, state = ours(ids)
    assert logits.shape == expected.shape
    assert max_diff(logits, expected) <= TOL[kind]
    assert state.seq_lens_host == [t, t]


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_chunked_prefill_and_steps_match_hf_full_forward(hf_dirs, kind):
    """Prefill in chunks from an existing state (mamba-ssm cannot, for Mamba-1), then steps."""
    ours = cs.load(str(hf_dirs[kind]), dtype="float32")
    ids = _ids(2, 41, seed=3)
    with torch.no_grad():
        expected = _hf_model(kind)(ids).logits
    state = ours.init_state(2)
    parts = [ours(ids[:, a:b], state)[0] for a, b in ((0, 7), (7, 24), (24, 38))]
    parts += [ours(ids[:, t:t + 1], state)[0] for t in range(38, 41)]
    assert max_diff(torch.cat(parts, 1), expected) <= TOL[kind]


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_greedy_generate_matches_hf(hf_dirs, kind):
    ours = cs.load(str(hf_dirs[kind]), dtype="float32")
    ids = _ids(2, 9, seed=5)
    expected = _hf_model(kind).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                        do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours.generate(ids, max_new_tokens=16).tolist() == expected.tolist()


def _to_mamba_ssm(kind: str, tmp_path):
    """Write the HF model as mamba-ssm's MambaLMHeadModel checkpoint (config.json + pytorch_model.bin)."""
    hf = _hf_model(kind)
    c = hf.config
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf.state_dict().items()}
    sd.setdefault("lm_head.weight", sd["backbone.embedding.weight"])
    ssm = {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand}
    if kind == "mamba":
        ssm.update(dt_rank=c.time_step_rank, bias=c.use_bias)
    else:
        ssm.update(layer="Mamba2", headdim=c.head_dim, ngroups=c.n_groups, chunk_size=c.chunk_size)
    cfg = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": V - 3,
           "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": c.tie_word_embeddings}
    d = tmp_path / f"{kind}-ssm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mamba_ssm_checkpoint(tmp_path, kind):
    d = _to_mamba_ssm(kind, tmp_path)
    assert type(cs.resolve_config(str(d))).__name__ == ("MambaConfig" if kind == "mamba" else "Mamba2Config")
    ours = cs.load(str(d), dtype="float32")
    assert ours.config.vocab_size == V  # 93 padded to a multiple of 8
    ids = _ids(1, 21)
    with torch.no_grad():
        expected = _hf_model(kind)(ids).logits
    assert max_diff(ours(ids)[0], expected) <= TOL[kind]


def test_mamba_ssm_checkpoint_unsupported_fields(tmp_path):
    d = _to_mamba_ssm("mamba", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "attn_layer_idx": [1]}))
    with pytest.raises(ValueError, match="attn_layer_idx"):
        cs.load(str(d))


# -- the references against the obvious token loop -------------------------------------------------

def _loop_scan(u, delta, A, B, C, D, z, bias, h):
    ys = []
    for t in range(u.shape[-1]):
        y = ref.selective_state_update_ref(h, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t],
                                           bias, True)
        ys.append(y)
    return torch.stack(ys, -1), h


@pytest.mark.parametrize("t", [1, 5, 63, 130])
def test_selective_scan_ref_equals_token_loop(t):
    g = torch.Generator().manual_seed(t)
    b, d, n = 2, 6, 5
    u, delta, z = (torch.randn(b, d, t, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) * 4
    B, C = torch.randn(b, n, t, generator=g), torch.randn(b, n, t, generator=g)
    D, bias, h0 = torch.randn(d, generator=g), torch.randn(d, generator=g), torch.randn(b, d, n, generator=g)
    y, last = ref.selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0.clone(), chunk_size=16)
    y2, last2 = _loop_scan(u, delta, A, B, C, D, z, bias, h0.clone())
    assert max_diff(y, y2) <= 1e-5 and max_diff(last, last2) <= 1e-5


@pytest.mark.parametrize("t,chunk", [(1, 8), (7, 8), (37, 16), (64, 16)])
def test_ssd_ref_equals_token_loop(t, chunk):
    g = torch.Generator().manual_seed(t)
    b, h, p, gr, n = 2, 4, 3, 2, 5
    x = torch.randn(b, t, h, p, generator=g)
    dt = torch.randn(b, t, h, generator=g)
    A = -torch.rand(h, generator=g) * 4
    B, C = torch.randn(b, t, gr, n, generator=g), torch.randn(b, t, gr, n, generator=g)
    D, bias, h0 = torch.randn(h, generator=g), torch.randn(h, generator=g), torch.randn(b, h, p, n, generator=g)
    y, final = ref.ssd_ref(x, dt, A, B, C, chunk, D, None, bias, True, (0.0, float("inf")), h0)
    state, ys = h0.clone(), []
    for i in range(t):
        ys.append(ref.selective_state_update_ref(
            state, x[:, i], dt[:, i, :, None].expand(b, h, p), A[:, None, None].expand(h, p, n), B[:, i], C[:, i],
            D[:, None].expand(h, p), None, bias[:, None].expand(h, p), True))
    assert max_diff(y, torch.stack(ys, 1)) <= 1e-5 and max_diff(final, state) <= 1e-5


def test_causal_conv1d_ref_from_state_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(2, 5, 11, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    s1, s2 = torch.zeros(2, 5, 4), torch.zeros(2, 5, 4)
    whole = ref.causal_conv1d_ref(x, w, bias, s1)
    parts = [ref.causal_conv1d_ref(x[:, :, :6], w, bias, s2)]
    parts += [ref.causal_conv1d_update_ref(x[:, :, i], s2, w, bias)[:, :, None] for i in range(6, 11)]
    assert max_diff(torch.cat(parts, 2), whole) <= 1e-6 and torch.equal(s1, s2)
    assert torch.equal(s1, x[:, :, -4:])


# -- memory, presets, state save/load ---------------------------------------------------------------

def test_presets_and_memory():
    cfg = cs.resolve_config("mamba-2.8b")
    assert spec_bytes_per_sequence(cfg.state_specs(), 1) == 12.5 * 2 ** 20
    assert spec_bytes_per_sequence(cfg.state_specs(), 1 << 20) == 12.5 * 2 ** 20
    for name in ("mamba-130m", "mamba-370m", "mamba-790m", "mamba-1.4b", "mamba2-130m", "mamba2-370m",
                 "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b"):
        assert cs.resolve_config(name).state_specs()
    m2 = cs.resolve_config("mamba2-2.7b")
    assert (m2.num_heads, m2.head_dim, m2.state_size, m2.conv_dim) == (80, 64, 128, 5376)


def test_memory_cli(capsys):
    from constant_state.__main__ import main

    assert main(["memory", "--model", "mamba-2.8b", "--context", "32k", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["per_sequence"] == 13107200 and rows[0]["recurrent_layers"] == 64


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_state_save_load_round_trip(tmp_path, hf_dirs, kind):
    ours = cs.load(str(hf_dirs[kind]), dtype="float32")
    ids = _ids(2, 30, seed=9)
    state = ours.init_state(2)
    ours(ids[:, :20], state)
    save_state(state, tmp_path / "prompt.safetensors")
    loaded = load_state(tmp_path / "prompt.safetensors", ours)
    assert loaded.seq_lens_host == [20, 20] and loaded.nbytes() == state.nbytes()
    a, _ = ours(ids[:, 20:], state)
    b, _ = ours(ids[:, 20:], loaded)
    assert torch.equal(a, b)
    other = cs.build_model(MambaConfig(vocab_size=V, hidden_size=16, num_layers=1, dtype="float32"))
    with pytest.raises(ValueError, match="state"):
        load_state(tmp_path / "prompt.safetensors", other)


def test_state_dtype_follows_loaded_model():
    m = cs.build_model(cs.resolve_config("mamba-130m").__class__(vocab_size=V, hidden_size=16, num_layers=1),
                       dtype="bfloat16")
    st = m.init_state(1)
    assert st.layers[0]["ssm_state"].dtype == torch.bfloat16
    assert m.layers[0].mixer.A_log.dtype == torch.float32 and m.layers[0].mixer.D.dtype == torch.float32
    logits, _ = m(_ids(1, 5))
    assert logits.dtype == torch.bfloat16


# -- backends ---------------------------------------------------------------------------------------

def test_backend_forcing_and_warn_once(monkeypatch):
    monkeypatch.delenv(mb.ENV_VAR, raising=False)
    assert mb.resolve_backend("cpu") == ("ref", "ref")
    assert mb.resolve_backend("cpu", "ref") == ("ref", "ref")
    with pytest.raises(ValueError, match="needs tensors on a CUDA device"):
        mb.resolve_backend("cpu", "cuda")
    with pytest.raises(ValueError, match=mb.ENV_VAR):
        monkeypatch.setenv(mb.ENV_VAR, "fast")
        mb.resolve_backend("cpu")
    monkeypatch.setenv(mb.ENV_VAR, "ref")
    assert mb.resolve_backend("cuda") == ("ref", "ref")
    monkeypatch.delenv(mb.ENV_VAR)
    if all(mb.kernels_available().values()):
        pytest.skip("mamba-ssm and causal-conv1d import here: no fallback to warn about")
    monkeypatch.setattr(mb, "_warned", set())
    with pytest.warns(RuntimeWarning, match="fall back"):
        assert "ref" in mb.resolve_backend("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mb.resolve_backend("cuda")  # the second time is silent
    with pytest.raises(ValueError, match="forced"):
        mb.resolve_backend("cuda", "cuda")


def test_time_step_limit_applies_to_every_token():
    """A dt clamp (Mamba-2's time_step_limit) acts alike in the chunked scan and the decode step."""
    cfg = Mamba2Config(vocab_size=V, hidden_size=32, num_layers=2, state_size=8, head_dim=8, n_groups=2,
                       chunk_size=8, time_step_limit=(0.01, 0.05), dtype="float32")
    m = cs.build_model(cfg, dtype="float32")
    ids = _ids(2, 20)
    full, _ = m(ids)
    state = m.init_state(2)
    parts = [m(ids[:, :9], state)[0]] + [m(ids[:, t:t + 1], state)[0] for t in range(9, 20)]
    assert max_diff(torch.cat(parts, 1), full) <= 1e-4


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@torch.no_grad()
def test_layer_interface_matches_fused_loop(hf_dirs, kind):
    """Each block also works on its own through forward(x, layer_state, ctx), as the base loop calls it."""
    from constant_state.models.base import StatefulLM

    ours = cs.load(str(hf_dirs[kind]), dtype="float32")
    ids = _ids(2, 19, seed=2)
    fused, _ = ours(ids)
    state = ours.init_state(2)
    state.reserve(19)
    per_layer = StatefulLM.forward_reserved(ours, ids, state)
    assert max_diff(per_layer, fused) <= 1e-5


def test_set_backend_validates():
    m = cs.build_model(MambaConfig(vocab_size=V, hidden_size=16, num_layers=1, dtype="float32"))
    m.set_backend("ref")
    assert m(_ids(1, 3))[0].shape == (1, 3, V)
    with pytest.raises(ValueError):
        m.set_backend("triton")


# -- the CUDA backend's glue, on the CPU: mamba-ssm's kernels replaced by fakes with their semantics --

def _assert_aligned(**tensors):
    """The CUDA kernels load 16 bytes at a time from each tensor's base: a view starting a few
    elements into its storage faults with 'misaligned address' on the GPU."""
    for name, t in tensors.items():
        if t is not None:
            assert t.data_ptr() % 16 == 0, f"{name} starts at a misaligned address"


def _fake_kernels():
    def conv_fn(x, weight, bias=None, activation=None):  # zero-padded causal conv, any layout
        _assert_aligned(x=x)
        return ref.causal_conv1d_ref(x, weight, bias, x.new_zeros(x.shape[0], x.shape[1], weight.shape[1]),
                                     activation)

    def scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        _assert_aligned(u=u, delta=delta, B=B, C=C, z=z)
        y, last = ref.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)  # zero initial state
        return (y, last) if return_last_state else y

    def chunk_fn(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                 dt_limit=(0.0, float("inf")), return_final_states=False):
        _assert_aligned(x=x, dt=dt, B=B, C=C)
        y, final = ref.ssd_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states)
        return (y, final) if return_final_states else y

    def ssu(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        return ref.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

    def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        return ref.gated_rmsnorm_ref(x, z, weight, eps, group_size or x.shape[-1], norm_before_gate)

    def layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                      is_rms_norm=False):
        assert is_rms_norm and bias is None
        normed, res = ref.add_rmsnorm_ref(x, residual, weight, eps, residual_in_fp32)
        return (normed, res) if prenorm else normed

    return dict(causal_conv1d_fn=conv_fn, causal_conv1d_update=ref.causal_conv1d_update_ref,
                selective_scan_fn=scan_fn, mamba_chunk_scan_combined=chunk_fn, selective_state_update=ssu,
                rmsnorm_fn=rmsnorm_fn, layer_norm_fn=layer_norm_fn)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_cuda_backend_glue_with_fake_kernels(hf_dirs, kind, monkeypatch):
    """Fresh prefill, prefill from an existing state (Mamba-1: the correction for the initial state
    that selective_scan_fn lacks) and steps, through the CUDA branch of every op."""
    import constant_state.models.mamba as mm

    fake = mb.MambaOps("ref", "ref")
    fake.ssm = fake.conv = "cuda"
    fake._k = _fake_kernels()
    monkeypatch.setattr(mm, "get_ops", lambda device, backend=None: fake)
    ours = cs.load(str(hf_dirs[kind]), dtype="float32")
    ids = _ids(2, 41, seed=4)
    with torch.no_grad():
        expected = _hf_model(kind)(ids).logits
    state = ours.init_state(2)
    parts = [ours(ids[:, a:b], state)[0] for a, b in ((0, 2), (2, 24), (24, 38))]
    parts += [ours(ids[:, t:t + 1], state)[0] for t in range(38, 41)]
    assert max_diff(torch.cat(parts, 1), expected) <= TOL[kind]


def test_triton_kernels_under_interpreter():
    """tests/kernels/test_mamba_kernels.py in a subprocess with TRITON_INTERPRET=1 from the start."""
    out = run_under_interpreter("test_mamba_kernels.py")
    assert " passed" in out and "skipped" not in out, out[-2000:]
