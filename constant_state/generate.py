"""The generate loop, the same for every model family: prefill, then one-token decode steps.

On CUDA the decode step runs as a captured CUDA graph (static state addresses make this
possible); sampling and stop-token checks run outside the graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .state import ModelState

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How the next token is chosen."""

    temperature: float = 0.0
    """0 means greedy (--temperature)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all (--top-k)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set with this much probability (--top-p)."""
    seed: int | None = None
    """Seed of the sampling generator (--seed)."""

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature (--temperature) must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k (--top-k) must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p (--top-p) must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[B]`` from ``logits [B, V]``."""
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already cover top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _prompts(input_ids, attention_mask) -> list[list[int]]:
    """Prompts as lists of ids: from a list of lists, or a [B, T] tensor (left padding removed)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        rows = input_ids.tolist()
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, attention_mask.tolist())]
    else:
        rows = [list(map(int, r)) for r in input_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    return rows


class _GraphedStep:
    """One decode step captured as a CUDA graph over a fixed state.

    With greedy decoding the argmax is captured too, so a step is one graph replay.
    """

    def __init__(self, model, state: ModelState, batch_size: int, greedy: bool):
        self.model, self.state, self.greedy = model, state, greedy
        self.ids = torch.zeros((batch_size, 1), dtype=torch.long, device=state.device)
        snap = state.snapshot()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside the graph (lazy inits, workspaces)
            self._step()
        torch.cuda.current_stream().wait_stream(s)
        state.restore(snap)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()

    def _step(self) -> torch.Tensor:
        logits = self.model.forward_reserved(self.ids, self.state, last_only=True)[:, -1]  # [B, V]
        return logits.argmax(-1) if self.greedy else logits

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Next tokens [B] (greedy) or logits [B, V]."""
        self.ids.copy_(ids)
        self.graph.replay()
        return self.out


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] | int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
    on_tokens: Callable[[int, torch.Tensor], None] | None = None,
    cuda_graph: bool | None = None,
    prefix_caching: bool = False,
    kv=None,
    return_state: bool = False,
):
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    ``input_ids`` is a ``[B, T]`` LongTensor (with ``attention_mask`` for left-padded prompts)
    or a list of token-id lists of different lengths; each prompt is prefilled on its own row of
    the state, so no padding enters any state. Returns ``[B, T + n]`` token ids, prompts
    left-padded with ``pad_token_id`` to the longest; rows that hit a stop token are padded
    after it. ``on_tokens(step, tokens[B])`` streams each step's tokens. On CUDA the decode step
    runs as a CUDA graph unless ``cuda_graph=False``.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens (--max-new-tokens) must be a positive integer, got {max_new_tokens!r}")
    cfg = SamplingConfig(temperature, top_k, top_p, seed)
    prompts = _prompts(input_ids, attention_mask)
    stops = {stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens or ())
    device = model.device
    b = len(prompts)
    lens = [len(p) for p in prompts]
    state = model.init_state(b, max_context=max(lens) + max_new_tokens, kv=kv)
    gen = None
    if not cfg.greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.seed())

    # Prefill: rows of equal length together, each group on a view of its rows.
    last = torch.empty((b, model.config.vocab_size), dtype=torch.float32, device=device)
    start = 0
    while start < b:
        end = start + 1
        while not prefix_caching and end < b and lens[end] == lens[start]:
            end += 1
        view = state.narrow(start, end - start)
        skip = state.share_prefix(start, prompts[start]) if prefix_caching else 0
        ids = torch.tensor([p[skip:] for p in prompts[start:end]], dtype=torch.long, device=device)
        logits, _ = model(ids, view, last_only=True)
        last[start:end] = logits[:, -1].float()
        if prefix_caching:
            state.register_prefix(start, prompts[start])
        start = end

    width = max(lens)
    new_tokens = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    stop_t = torch.tensor(sorted(stops), dtype=torch.long, device=device) if stops else None
    use_graph = (device.type == "cuda") if cuda_graph is None else cuda_graph
    if use_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a model on a CUDA device")
    step_fn = None
    n = 0
    tokens = sample(last, cfg, gen)
    # No host sync per step unless stop tokens or a callback need the values.
    while True:
        if stop_t is not None:
            tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        new_tokens[:, n] = tokens
        n += 1
        if on_tokens is not None:
            on_tokens(n - 1, tokens)
        if stop_t is not None:
            finished |= torch.isin(tokens, stop_t)
            if bool(finished.all()):
                break
        if n == max_new_tokens:
            break
        state.reserve(1)
        ids = tokens[:, None]
        if use_graph:
            if step_fn is None:
                step_fn = _GraphedStep(model, state, b, cfg.greedy)
            out = step_fn(ids)
            tokens = out if cfg.greedy else sample(out, cfg, gen)
        else:
            logits = model.forward_reserved(ids, state, last_only=True)
            tokens = sample(logits[:, -1], cfg, gen)
    out = torch.full((b, width + n), pad_token_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, width - len(p):width] = torch.tensor(p)
    out[:, width:] = new_tokens[:, :n].cpu()
    if return_state:
        return out, state
    state.release()
    return out
