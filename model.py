"""
model.py: the Llama-Nemotron decoder, a Llama whose layers may differ (paper sec. 2, "Puzzle").

Llama-Nemotron's Super and Ultra models are Llama decoders produced by Puzzle NAS: every layer has
its own `block_configs[i] = {"attention": ..., "ffn": ...}` (the DeciLM / `nemotron-nas` format).
    attention: GQA with its own number of KV heads | a single linear layer | nothing (no_op)
    ffn:       SwiGLU of any width              | a single linear layer | nothing (no_op)
A plain Llama is the case where all layers are alike. LN-Super (49.9B) keeps attention in only 49
of its 80 layers, so its KV cache is 49/80 of a Llama-70B's at the same width.

This file holds the whole model: config, modules, KV cache and batched generation. Reading and
writing checkpoint folders (native, Hugging Face `LlamaForCausalLM` and DeciLM) is checkpoint.py's.
It knows nothing of training or data. The math of attention, SwiGLU and RMSNorm lives in kernels.py.

    python model.py PATH     # PATH: a config.json or a checkpoint folder -> per-layer table
"""
import contextlib
import math
import secrets
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError, user_errors
from kernels import attention, decode_attention, rms_norm, swiglu_ffn, swiglu_ffn_packed


class CheckpointError(UserError):
    """A checkpoint folder or config.json that cannot be loaded: the message names the file."""


class NonFiniteError(UserError):
    """Weights or logits that hold NaN or inf, named where they are met."""

# ------------------------------------------------------------------------------------------------
# Configuration

ATTENTION_KINDS = ("gqa", "linear", "no_op")
FFN_KINDS = ("swiglu", "linear", "no_op")


def ffn_mult_to_intermediate_size(ffn_mult, hidden_size):
    """DeciLM's exact rounding: 2/3 of ffn_mult * hidden (the SwiGLU convention), rounded up to a
    multiple of 256. LN-Super's ffn_mult 2.625 at hidden 8192 gives 14336, Llama-70B's width."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


@dataclass
class BlockConfig:
    """One layer. `n_heads_in_group` = query heads per KV head (kv heads = heads // group).
    The FFN width is `intermediate_size` if given, else derived from `ffn_mult`."""
    attention: str = "gqa"
    n_heads_in_group: int | None = 1
    ffn: str = "swiglu"
    ffn_mult: float | None = None
    intermediate_size: int | None = None


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    num_attention_heads: int = 4
    head_dim: int | None = None          # default hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512
    block_configs: list = field(default_factory=list)  # one BlockConfig per layer

    def __post_init__(self):
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b)
                              for b in self.block_configs]
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    @property
    def num_hidden_layers(self):
        return len(self.block_configs)

    @classmethod
    def llama(cls, num_layers, num_key_value_heads=None, intermediate_size=None, **kw):
        """A plain Llama: every layer GQA + SwiGLU of the same size."""
        heads = kw.get("num_attention_heads", cls.num_attention_heads)
        kv = num_key_value_heads or heads
        if heads % kv:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        hidden = kw.get("hidden_size", cls.hidden_size)
        width = intermediate_size or ffn_mult_to_intermediate_size(4.0, hidden)
        blocks = [BlockConfig("gqa", heads // kv, "swiglu", None, width) for _ in range(num_layers)]
        return cls(block_configs=blocks, **kw)

    def kv_heads(self, i):
        b = self.block_configs[i]
        return self.num_attention_heads // b.n_heads_in_group if b.attention == "gqa" else 0

    def ffn_width(self, i):
        b = self.block_configs[i]
        if b.ffn != "swiglu":
            return 0
        return b.intermediate_size or ffn_mult_to_intermediate_size(b.ffn_mult, self.hidden_size)

    def validate(self):
        for k in ("hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0:
                raise ValueError(f"{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be positive and even (RoPE rotates pairs), got {self.head_dim}")
        if not self.block_configs:
            raise ValueError("block_configs is empty: a model needs at least one layer")
        for i, b in enumerate(self.block_configs):
            if b.attention not in ATTENTION_KINDS:
                raise ValueError(f"block_configs[{i}].attention: unknown kind {b.attention!r}, "
                                 f"expected one of {ATTENTION_KINDS}")
            if b.ffn not in FFN_KINDS:
                raise ValueError(f"block_configs[{i}].ffn: unknown kind {b.ffn!r}, expected one of {FFN_KINDS}")
            if b.attention == "gqa":
                g = b.n_heads_in_group
                if not g or self.num_attention_heads % g:
                    raise ValueError(f"block_configs[{i}].n_heads_in_group={g} must divide "
                                     f"num_attention_heads={self.num_attention_heads}")
            if b.ffn == "swiglu" and not (b.intermediate_size or b.ffn_mult):
                raise ValueError(f"block_configs[{i}]: a swiglu FFN needs ffn_mult or intermediate_size")
            if b.ffn == "swiglu" and b.intermediate_size is not None and (
                    not isinstance(b.intermediate_size, int) or isinstance(b.intermediate_size, bool)
                    or b.intermediate_size <= 0):
                raise ValueError(f"block_configs[{i}].intermediate_size must be a positive integer, got "
                                 f"{b.intermediate_size!r}")
            if b.ffn == "swiglu" and b.ffn_mult is not None and not (
                    isinstance(b.ffn_mult, (int, float)) and not isinstance(b.ffn_mult, bool) and b.ffn_mult > 0):
                raise ValueError(f"block_configs[{i}].ffn_mult must be a positive number, got {b.ffn_mult!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (llama3 or default)")
            need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in need if kind == "llama3" and k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling: llama3 scaling needs {missing}")

    def to_dict(self):
        d = asdict(self)
        d["model_type"] = "nano-nemotron"
        return d


# ------------------------------------------------------------------------------------------------
# Modules

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg):
    """Inverse frequencies theta^(-2i/D), with Llama 3's frequency-dependent scaling: long
    wavelengths (> original_context / low_freq_factor) are slowed by `factor`, short ones
    (< original_context / high_freq_factor) kept, the band between blended linearly."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    sc = cfg.rope_scaling
    if not sc or sc.get("rope_type", sc.get("type")) in (None, "default"):
        return inv_freq
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    L = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > L / low, inv_freq / factor, inv_freq)
    s = (L / wavelen - low) / (high - low)
    blended = (1 - s) * scaled / factor + s * scaled
    in_band = (wavelen >= L / high) & (wavelen <= L / low)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(inv_freq, positions, dtype):
    """positions (B, T) -> cos, sin (B, 1, T, D) in fp32 math, cast like HF Llama does."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Llama's rotate-half convention: the two halves of each head are the (re, im) pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class GQAttention(nn.Module):
    """Grouped-query attention: `n_kv` KV heads shared by groups of query heads."""

    def __init__(self, cfg, n_kv):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, n_kv, cfg.head_dim
        H, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(H, n_kv * D, bias=False)
        self.v_proj = nn.Linear(H, n_kv * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=False)

    def forward(self, x, rope, doc_ids=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = attention(q, k, v, causal=True, doc_ids=doc_ids)
        else:  # the prompt pass of generation: also fills the cache
            y = cache.prefill(q, k, v, doc_ids)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def decode(self, x, cos, sin, cache, slot, w_qkv):
        """One new token per row, x (B, H), against the static cache (see Transformer.decode_step).
        w_qkv: q_proj, k_proj and v_proj stacked (Transformer.decode_weights): one matmul, not three."""
        B, D = x.shape[0], self.head_dim
        qkv = F.linear(x, w_qkv).view(B, self.n_heads + 2 * self.n_kv, 1, D)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(cache.decode(q, k, v, slot).reshape(B, -1))


class LinearAttention(nn.Module):
    """Puzzle's `replace_with_linear` attention: one hidden x hidden matrix, no token mixing."""

    def __init__(self, cfg):
        super().__init__()
        self.linear_attn = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, rope=None, doc_ids=None, cache=None):
        return self.linear_attn(x)


class SwiGLU(nn.Module):
    def __init__(self, cfg, width):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x):
        return swiglu_ffn(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class LinearFFN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.linear_mlp = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class DecoderLayer(nn.Module):
    """h = h + attn(norm(h)); h = h + ffn(norm(h)). A no_op sub-block has no norm and no
    parameters at all (and so no tensors in the checkpoint): it is the identity."""

    def __init__(self, cfg, i):
        super().__init__()
        b = cfg.block_configs[i]
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        if b.attention != "no_op":
            self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.self_attn = GQAttention(cfg, cfg.kv_heads(i)) if b.attention == "gqa" else LinearAttention(cfg)
        if b.ffn != "no_op":
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp = SwiGLU(cfg, cfg.ffn_width(i)) if b.ffn == "swiglu" else LinearFFN(cfg)

    def attention_block(self, h, rope, doc_ids=None, cache=None):
        if self.self_attn is None:
            return h
        return h + self.self_attn(self.input_layernorm(h), rope, doc_ids, cache)

    def ffn_block(self, h):
        if self.mlp is None:
            return h
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, h, rope, doc_ids=None, cache=None):
        return self.ffn_block(self.attention_block(h, rope, doc_ids, cache))

    def decode(self, h, cos, sin, cache, slot, w):
        """One token per row, h (B, H): the same layer with the KV cache's decode path and the
        stacked matrices of Transformer.decode_weights (w: {"qkv", "gate_up"} where they apply)."""
        if self.self_attn is not None:
            x = self.input_layernorm(h)
            h = h + (self.self_attn.decode(x, cos, sin, cache, slot, w["qkv"]) if cache is not None
                     else self.self_attn(x))
        if "gate_up" in w:
            return h + swiglu_ffn_packed(self.post_attention_layernorm(h), w["gate_up"], self.mlp.down_proj.weight)
        return self.ffn_block(h)


class LlamaBody(nn.Module):
    """Named `model` inside Transformer so parameter names equal Hugging Face's tensor names."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.apply(self._init_weights)
        # Residual-stream writers get a smaller init (GPT-2): 2 of them per layer add up in h.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "linear_attn.weight", "linear_mlp.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.num_hidden_layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def reset_rope(self):
        """Recompute the (non-persistent) RoPE buffer, e.g. after building on the meta device."""
        self.inv_freq = rope_inv_freq(self.config).to(self.model.embed_tokens.weight.device)

    def forward(self, idx, doc_ids=None, positions=None, return_hidden=False, head=True):
        """idx (B, T) token ids -> logits (B, T, V) [, per-layer outputs: list of L (B, T, H)].
        doc_ids (B, T): packed documents never attend across each other; positions (B, T) are
        RoPE positions (default 0..T-1; packing can restart them at every document).
        head=False returns the final normed hidden state instead of logits, so a loss can apply
        lm_head chunk by chunk and never hold B x T x V at once (a 128k vocabulary)."""
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        h = self.model.embed_tokens(idx)
        rope = rope_cos_sin(self.inv_freq, positions, h.dtype)
        hidden = []
        for layer in self.model.layers:
            h = layer(h, rope, doc_ids)
            if return_hidden:
                hidden.append(h)
        out = self.model.norm(h)
        if head:
            out = self.lm_head(out)
        return (out, hidden) if return_hidden else out

    # -------------------------------------------------------------------------------------------
    # Generation (gpt-fast style): a static KV cache, allocated once and written by index, and a
    # decode loop without host synchronisation (but an "all rows done?" check every 16 steps).
    # Decoding a small model is per-op overhead, not arithmetic: an eager step of the nano parent
    # is ~800 small ops (~1.7 ms on a CPU core) for tens of microseconds of arithmetic. So the
    # whole step (embedding, layers, head, sampling, stop checks, cache and position bookkeeping)
    # is one function of preallocated tensors, and compile=True turns it into one graph with
    # torch.compile: inductor's C++ loops on a CPU, CUDA graphs on a GPU. The prompt pass
    # (prefill) runs once per call, eagerly, since its length varies.

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_ids=(), seed=None, pad_id=0, vocab_limit=None, check_done_every=16,
                 compile=False, stream=None):
        """Batched sampling for prompts of different lengths (list of lists of token ids).
        Prompts are left-padded so every row writes the same cache slot at each step; row b's
        pad slots are masked out (kv_start[b]) and its RoPE positions start at 0 on its first
        real token. Each row samples independently: every step draws fresh noise for every row
        from one seeded generator (see sample_next). A row stops after emitting one of
        `stop_ids` (the stop token is kept as the row's last token).
        vocab_limit: only ids below it are sampled (a model whose embedding is padded beyond
        its tokenizer). compile=True runs the decode step as one torch.compile graph (the first
        call for a new batch size / cache length / sampling setting compiles it); its greedy
        tokens equal the eager path's. stream: called with the (B,) tensor of new tokens after
        every step (a host sync per token: for interactive chat and serve.py); it may return row
        indices to finish now (a client gone, a stop string met, a row's own token budget spent):
        those rows keep the tokens they have and emit pad_id from then on, and the call ends
        when every row is done. seed: an int (one generator for the batch, as always) or a list
        of one seed per row, each row drawing its noise from its own generator, so that a row
        samples the same tokens in any batch as alone with that seed (serve.py batches requests
        that each bring their own seed). Logits that are not finite raise NonFiniteError.
        Returns a list of generated token lists (prompts not included)."""
        cfg, dev = self.config, self.inv_freq.device
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        B, L = len(prompts), max(len(p) for p in prompts)
        need = L + max_new_tokens - 1  # the last sampled token is never fed back: it needs no slot
        if need > cfg.max_position_embeddings:
            raise ValueError(f"generate: a prompt of {L} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"the model's context of {cfg.max_position_embeddings}")
        # A compiled step is specialised to its shapes: round the cache up to a multiple of 64 so
        # that calls with other prompt lengths reuse the graph (decode attention reads the whole
        # cache, so a coarser rounding would cost time at every step).
        S = min(cfg.max_position_embeddings, -(-need // 64) * 64) if compile else need
        if isinstance(seed, (list, tuple)):
            if len(seed) != B:
                raise ValueError(f"generate: {len(seed)} seeds for {B} prompts")
            gen = [torch.Generator(device=dev).manual_seed(s if s is not None else secrets.randbits(63))
                   for s in seed]
        else:
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        pad = torch.tensor([L - len(p) for p in prompts], device=dev)
        idx = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=dev)
        caches = KVCache.for_model(self, B, S, pad)
        slots = torch.arange(L, device=dev)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)
        doc_ids = (slots[None, :] >= pad[:, None]).long()  # pad tokens = document 0, prompt = 1
        logits = self._forward_cached(idx, positions, caches, doc_ids)  # prefill: slots [0, L)
        st = DecodeState(B, max_new_tokens, logits.shape[-1], positions[:, -1], L - 1, stop_ids,
                         pad_id, vocab_limit, sample=temperature > 0, device=dev)
        sampling = (temperature, top_k, top_p)
        st.draw_noise(gen)
        st.emit(logits, *sampling)  # the first new token comes from the prompt's last position
        step = self.compiled_decode_step() if compile else self.decode_step
        weights = self.decode_weights()
        with _decode_threads(B, dev):
            for t in range(1, max_new_tokens):
                if stream is not None:
                    finish = stream(st.tok)
                    if finish:
                        st.finish(finish)
                    if bool(st.done.all()):
                        break
                if t % check_done_every == 0 and bool(st.done.all()):  # the only host sync
                    break
                st.draw_noise(gen)
                # From the second step on the compiled step sees the very tensors it was (compiled
                # or) looked up for, so its guards (~100 us of checks per call on a CPU) need to run
                # only where they tell cached graphs apart.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=compile and t > 1):
                    step(caches, st, weights, *sampling)
        if stream is not None and not bool(st.done.all()):
            stream(st.tok)
        if bool(st.nonfinite.any()):
            rows = st.nonfinite.nonzero().flatten().tolist()
            raise NonFiniteError(f"generate: the model's logits are not finite (NaN or inf) for rows {rows[:8]} "
                                 f"of {B}: its weights or activations overflowed")
        out, lengths = st.out.tolist(), st.lengths.tolist()
        return [row[:n] for row, n in zip(out, lengths)]

    def _forward_cached(self, idx, positions, caches, doc_ids=None):
        """The prompt pass: run the layers, filling the KV cache; logits of the last position (B, V)."""
        h = self.model.embed_tokens(idx)
        rope = rope_cos_sin(self.inv_freq, positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, rope, doc_ids, caches.get(i))
        return self.lm_head(self.model.norm(h[:, -1]))

    def decode_step(self, caches, st, weights, temperature, top_k, top_p):
        """One token per row: feed st.tok at position st.pos + 1 (cache slot st.slot + 1), sample
        the next token into st. Tensors in, tensors mutated in place: no Python value depends on
        the data, so torch.compile can turn the whole step into one graph."""
        st.pos.add_(1)
        st.slot.add_(1)
        h = self.model.embed_tokens(st.tok)  # (B, H): one token per row, no time axis
        cos, sin = rope_cos_sin(self.inv_freq, st.pos[:, None], h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer.decode(h, cos, sin, caches.get(i), st.slot, weights[i])
        st.emit(self.lm_head(self.model.norm(h)), temperature, top_k, top_p)

    @torch.no_grad()
    def decode_weights(self):
        """Per layer, the matrices that one decode step multiplies by the same input, stacked:
        q/k/v -> "qkv" and gate/up -> "gate_up" (the layout of gpt-fast's wqkv and vLLM's merged
        projections), so a layer costs 4 matmuls instead of 7: decoding a small batch is per-op
        overhead. Copies, rebuilt at every generate call (so training between calls is seen); at
        nano scale that is ~5 MB and ~1 ms. A model of billions of parameters would store its
        weights stacked instead of copying them."""
        out = []
        for layer in self.model.layers:
            w, a, f = {}, layer.self_attn, layer.mlp
            if isinstance(a, GQAttention):
                w["qkv"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            if isinstance(f, SwiGLU):
                w["gate_up"] = torch.cat([f.gate_proj.weight, f.up_proj.weight])
            out.append(w)
        return out

    def compiled_decode_step(self):
        """decode_step as one torch.compile graph (fullgraph: a graph break is an error), built
        once per model and specialised to the shapes and sampling settings of a call (a new batch
        size, cache length or temperature compiles again; weights are graph inputs, so training
        the model between calls needs no recompile). On a GPU mode="reduce-overhead" replays it
        as a CUDA graph (the tensors it writes are marked static, see _mark_static); on a CPU,
        inductor's C++ wrapper calls the kernels without going through Python."""
        if getattr(self, "_compiled_decode", None) is None:
            if self.inv_freq.is_cuda:
                kw = dict(mode="reduce-overhead")
            else:
                kw = dict(options={"cpp_wrapper": True})
            self._compiled_decode = torch.compile(self.decode_step, fullgraph=True, dynamic=False, **kw)
        return self._compiled_decode


@contextlib.contextmanager
def _decode_threads(batch_size, device):
    """One CPU thread for the decode steps of a batch of a few rows. Each op of such a step is too
    small to split, and OpenMP's fork/join around every kernel costs more than it saves: the nano
    parent decodes one row in ~570 us per token on one thread against ~740 us on two (compiled,
    2-core CPU). Inductor bakes the thread count into the kernels it compiles, so the choice
    depends on the batch size alone, like the compiled graph itself."""
    if device.type != "cpu" or batch_size > 4 or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no top-k), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits, temperature, top_k, top_p, generator=None, noise=None):
    """logits (B, V) -> (B,) token ids. temperature 0 is greedy; top-k then top-p (nucleus)
    filtering; then one draw per row by the exponential race: argmax_v p_v / E_v with E_v ~ Exp(1)
    i.i.d. picks v with probability p_v (the Gumbel-max trick in another dress). The noise E
    (B, V) is passed in (drawn from a seeded generator outside the step, so a compiled step has
    no random op inside) or drawn here from `generator`. No host sync."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:  # exactly k survive, ties broken by index
        keep = torch.topk(logits, top_k, dim=-1).indices
        logits = torch.full_like(logits, float("-inf")).scatter(-1, keep, logits.gather(-1, keep))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens strictly more likely already cover top_p of the mass,
        # so the most likely token always survives.
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


class DecodeState:
    """The decode loop's tensors, allocated once per generate call and updated in place:
    tok (B,) the last sampled token, pos (B,) its RoPE position, slot () its cache slot,
    t () how many tokens are out, out (B, N), done (B,), lengths (B,), nonfinite (B,) (a row met
    NaN/inf logits), noise (B, V) for sampling, the stop ids and an additive vocabulary mask
    (-inf at ids >= vocab_limit)."""

    def __init__(self, B, N, V, pos, slot, stop_ids, pad_id, vocab_limit, sample, device):
        self.tok = torch.zeros(B, dtype=torch.long, device=device)
        self.pos = pos.clone()
        self.slot = torch.tensor(slot, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.out = torch.full((B, N), pad_id, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.lengths = torch.full((B,), N, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros(B, dtype=torch.bool, device=device)
        self.noise = torch.ones(B, V, device=device) if sample else None
        self.stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
        self.vocab_mask = torch.zeros(V, device=device)
        if vocab_limit is not None and vocab_limit < V:
            self.vocab_mask[vocab_limit:] = float("-inf")
        self.pad_id = pad_id
        _mark_static(self.tok, self.pos, self.slot, self.t, self.out, self.done, self.lengths,
                     self.nonfinite, self.noise, self.stop, self.vocab_mask)

    def draw_noise(self, generator):
        """One (V,) draw per row: from the one generator for the whole (B, V) block, or row b's
        from generator[b] (the same numbers a batch of one seeded alike draws)."""
        if self.noise is None:
            return
        if isinstance(generator, list):
            for row, g in zip(self.noise, generator):
                row.exponential_(generator=g)
        else:
            self.noise.exponential_(generator=generator)

    def finish(self, rows):
        """Mark rows done from outside the step (generate's stream callback): each keeps the
        t tokens it has. In place, so a compiled step keeps seeing the same tensors."""
        idx = torch.tensor(sorted(set(int(r) for r in rows)), dtype=torch.long, device=self.done.device)
        self.lengths[idx] = torch.where(self.done[idx], self.lengths[idx], self.t)
        self.done[idx] = True

    def emit(self, logits, temperature, top_k, top_p):
        """Sample every row's next token from logits (B, V) and record it: finished rows emit
        pad_id, a row that emits a stop id is done, its length fixed."""
        self.nonfinite.logical_or_(~torch.isfinite(logits).all(-1) & ~self.done)
        tok = sample_next(logits.float() + self.vocab_mask, temperature, top_k, top_p, noise=self.noise)
        tok = torch.where(self.done, self.pad_id, tok)
        self.out.index_copy_(1, self.t.view(1), tok[:, None])
        hit = torch.isin(tok, self.stop) & ~self.done
        self.lengths.copy_(torch.where(hit, self.t + 1, self.lengths))
        self.done.logical_or_(hit)
        self.tok.copy_(tok)
        self.t.add_(1)


def _mark_static(*tensors):
    """Tell torch.compile these tensors keep their address across calls (CUDA graphs may then
    read and write them in place). A no-op for eager code."""
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_static_address(t)


class KVCache:
    """Static per-layer cache (B, n_kv, S, D), allocated once, only for real attention layers
    (no_op and linear layers mix no tokens, so they need none). Row b's slots before kv_start[b]
    are its left padding, never attended to."""

    def __init__(self, B, n_kv, S, D, kv_start, dtype, device):
        self.k = torch.zeros(B, n_kv, S, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.kv_start = kv_start
        _mark_static(self.k, self.v, self.kv_start)

    @staticmethod
    def for_model(model, B, S, kv_start):
        cfg, w = model.config, model.model.embed_tokens.weight
        return {i: KVCache(B, cfg.kv_heads(i), S, cfg.head_dim, kv_start, w.dtype, w.device)
                for i in range(cfg.num_hidden_layers) if cfg.block_configs[i].attention == "gqa"}

    def prefill(self, q, k, v, doc_ids):
        """The prompt attends to itself; its K/V go to slots [0, T)."""
        T = k.shape[2]
        self.k[:, :, :T], self.v[:, :, :T] = k, v
        return attention(q, k, v, causal=True, doc_ids=doc_ids)

    def decode(self, q, k, v, slot):
        """One new token per row: store its K/V at `slot` (a 0-d device tensor), attend to
        slots [kv_start, slot]."""
        self.k.index_copy_(2, slot.view(1), k)
        self.v.index_copy_(2, slot.view(1), v)
        return decode_attention(q, self.k, self.v, self.kv_start, slot + 1)


# ------------------------------------------------------------------------------------------------
# Sizing

def count_params(cfg):
    """Parameter count from the config alone (tied embeddings counted once)."""
    H = cfg.hidden_size
    n = cfg.vocab_size * H * (1 if cfg.tie_word_embeddings else 2) + H  # embed, lm_head, final norm
    for i, b in enumerate(cfg.block_configs):
        n += layer_params(cfg, i)
    return n


def layer_params(cfg, i):
    H, D, Hq = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    b, n = cfg.block_configs[i], 0
    if b.attention == "gqa":
        n += H + H * Hq * D * 2 + H * cfg.kv_heads(i) * D * 2
    elif b.attention == "linear":
        n += H + H * H
    if b.ffn == "swiglu":
        n += H + 3 * H * cfg.ffn_width(i)
    elif b.ffn == "linear":
        n += H + H * H
    return n


def kv_bytes_per_token(cfg, bytes_per_element=2):
    """K and V of every real attention layer for one token (bf16 = 2 bytes per element)."""
    return sum(2 * cfg.kv_heads(i) * cfg.head_dim * bytes_per_element
               for i in range(cfg.num_hidden_layers))


def describe(cfg):
    """The per-layer table `python model.py PATH` prints."""
    rows = [f"{'layer':>5}  {'attention':<10} {'kv_heads':>8}  {'ffn':<7} {'width':>7}  {'params':>14}"]
    for i, b in enumerate(cfg.block_configs):
        rows.append(f"{i:>5}  {b.attention:<10} {cfg.kv_heads(i):>8}  {b.ffn:<7} "
                    f"{cfg.ffn_width(i):>7}  {layer_params(cfg, i):>14,}")
    n_attn = sum(b.attention == "gqa" for b in cfg.block_configs)
    rows += [f"params: {count_params(cfg)}", f"attention_layers: {n_attn}",
             f"kv_bytes_per_token: {kv_bytes_per_token(cfg)}"]
    return "\n".join(rows)


if __name__ == "__main__":
    USAGE = "usage: python model.py PATH   (a config.json or a checkpoint folder)"
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__.strip() + "\n\n" + USAGE)
        sys.exit(0)
    with user_errors():   # the one error path: a bad PATH is one `error:` line, exit status 2
        if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
            raise UserError(USAGE)
        from checkpoint import load_config   # checkpoint.py imports this file
        print(describe(load_config(sys.argv[1])))
