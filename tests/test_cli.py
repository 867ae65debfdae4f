"""The constant-state command line: help, memory figures, generate, errors."""

import json
import subprocess
import sys

import pytest

from constant_state.__main__ import COMMANDS, main
from helpers import save_tiny_hf


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(capsys, name):
    with pytest.raises(SystemExit):
        main([name, "-h"])
    assert "--" in capsys.readouterr().out


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "constant_state", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "constant-state" in r.stdout


def test_memory_llama3_70b_128k_is_40_gib(capsys):
    assert main(["memory", "--model", "llama-3-70b", "--context", "128k", "--batch", "4", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["per_sequence"] == 40 * 2 ** 30
    assert row["total"] == 160 * 2 ** 30
    assert row["kv_format"] == "bf16"


def test_memory_of_a_local_config_json(tmp_path, capsys):
    d, _ = save_tiny_hf(tmp_path, "qwen2")  # 2 layers, 2 kv heads, head dim 16, fp32
    assert main(["memory", "--model", str(d / "config.json"), "--context", "100", "--kv", "fp16", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    # 7 blocks of 16 tokens x 2 layers x (K+V) x 2 heads x 16 dims x 2 bytes
    assert row["per_sequence"] == 7 * 16 * 2 * 2 * 2 * 16 * 2
    assert main(["memory", "--model", str(d), "--context", "100", "--kv", "fp16", "--json"]) == 0


def test_memory_keeps_each_formats_block_size(capsys):
    """kivi2's default block size is 32 (KVConfig), so its row is what load(kv="kivi2") allocates:
    Llama-3-8B at 32k, 88 bytes per token and head + the residual window = 720 MiB (848 at 16-token
    blocks); --kv-block-size sets every format's."""
    def rows(*extra):
        assert main(["memory", "--model", "llama-3-8b", "--context", "32k", "--kv", "bf16", "--kv", "kivi2",
                     "--json", *extra]) == 0
        return {r["kv_format"]: r["per_sequence"] for r in json.loads(capsys.readouterr().out)}

    assert rows() == {"bf16": 4 * 2 ** 30, "kivi2": 720 * 2 ** 20}
    assert rows("--kv-block-size", "64") == {"bf16": 4 * 2 ** 30, "kivi2": 656 * 2 ** 20}


def test_memory_table_default_runs(capsys):
    assert main(["memory"]) == 0
    out = capsys.readouterr().out
    assert "llama-3-70b" in out and "40.00 GiB" in out


def test_generate_preset_ids(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    ids = capsys.readouterr().out.strip().split(",")
    assert len(ids) == 5 and all(i.isdigit() for i in ids)


def test_generate_text_streams(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


@pytest.mark.parametrize("argv, needle", [
    (["memory", "--context", "12q"], "--context"),
    (["memory", "--model", "no-such-model"], "no-such-model"),
    (["memory", "--model", "tiny-llama", "--kv", "int3"], "--kv"),
    (["generate", "--model", "tiny-llama", "--prompt-ids", "1", "--top-p", "2"], "--top-p"),
    (["generate", "--model", "tiny-llama", "--prompt-ids", "9999"], "--prompt-ids"),
])
def test_errors_name_the_flag(capsys, argv, needle):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_byte_tokenizer_shows_ids_outside_bytes():
    from constant_state.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert tok.decode([72, 105, 4000, 33]) == "Hi<4000>!"
