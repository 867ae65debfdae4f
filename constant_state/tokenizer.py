"""Fallback tokenizer for checkpoints without one: UTF-8 bytes as token ids."""

from __future__ import annotations


class ByteTokenizer:
    """Token id = byte value. Used for presets and tokenizer-less checkpoints with vocab >= 256."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Bytes as UTF-8 text; ids outside 0..255 (a random model's larger vocabulary) as ``<id>``."""
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            out.append(f"<{i}>")
            run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


def tokenizer_for(model):
    """The model's own tokenizer, or the byte fallback (None if the vocabulary is too small)."""
    if getattr(model, "tokenizer", None) is not None:
        return model.tokenizer
    if model.config.vocab_size >= 256:
        return ByteTokenizer()
    return None
