"""
kernels.py: the three pieces of math every Llama layer runs, each as a public function with a
plain PyTorch reference beside it, and a hand-written Triton kernel behind it (issue 5).

    attention(q, k, v, causal=True, doc_ids=None)          reference: attention_ref
    decode_attention(q, k_cache, v_cache, kv_start, kv_end) reference: decode_attention_ref
    swiglu_ffn(x, w_gate, w_up, w_down)                     reference: swiglu_ffn_ref
    rms_norm(x, weight, eps)                                reference: rms_norm_ref

model.py calls only the public functions. This file knows nothing of the model.

The Triton kernels (forward and backward, wrapped in torch.autograd.Function):
  - attention: FlashAttention-2 (Dao 2023, Alg. 1 forward, Alg. 2 backward): online softmax in
    base 2, the (T, T) attention matrix is never stored; the backward recomputes it block by block
    from the saved log-sum-exp. GQA reads KV head h // (Hq // Hkv) in place (no repeat_interleave);
    doc_ids masks packed documents, and key blocks that share no document with the query block
    are skipped. Any T, head dim 16..256 (a power of two), fp32/fp16/bf16 with fp32 accumulation.
  - decode_attention: flash-decoding (split the cache into chunks, one program per
    (sequence, KV head, chunk) serving all query heads of the group, then a small combine kernel).
    kv_start / kv_end are read from device memory: the decode loop never syncs with the host.
  - swiglu_ffn: one kernel computes x @ w_gate.T and x @ w_up.T tile by tile and applies
    silu(gate) * up in the epilogue, so gate and up never reach memory; the down projection is a
    cuBLAS matmul. The backward saves only x and recomputes gate/up in a second fused kernel
    (which also writes dgate, dup and, in place of dh, the activation h needed for dW_down).
  - rms_norm: a row-block kernel forward (saves only the fp32 1/rms per row), and a backward
    whose dweight partial sums are reduced over a few hundred programs, not atomics.

Dispatch (see `backend`): CUDA tensors run the Triton kernels, CPU tensors the reference, unless
TRITON_INTERPRET=1 was in the environment when this module was imported: then CPU tensors run
the Triton kernels too, in Triton's interpreter (numpy, slow, fp32/fp16 only: no bf16). The test
suite (tests/conftest.py) sets TRITON_INTERPRET=1 but pins CPU_BACKEND = "torch", so model and
training tests stay fast; kernel tests opt in with `with kernels.backend("triton"):` and check
`kernels.TRITON_CALLS` to prove the Triton path ran (eager launches only: code that torch.compile
traces is not counted).

Benchmarks and the compile check (no GPU needed: every kernel built for sm_90 with ptxas) are
tools/bench_kernels.py: python tools/bench_kernels.py --bench | --compile_check.
Tests: python -m pytest -q tests/test_kernels.py   (interpreter on CPU, compiled kernels on a GPU)
Reads / writes: nothing on disk (Triton's autotuner may cache in ~/.triton).
"""
import contextlib
import math
import os
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------
# References: readable PyTorch, the ground truth every kernel is tested against.

def rms_norm_ref(x, weight, eps):
    """Llama RMSNorm: normalise in fp32, cast back, then scale (the order HF uses)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def swiglu_ffn_ref(x, w_gate, w_up, w_down):
    """Llama MLP: down(silu(gate(x)) * up(x)); weights in nn.Linear (out, in) layout."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def attention_mask(T_q, T_k, device, causal=True, doc_ids=None, q_offset=0):
    """Boolean (B or 1, 1, T_q, T_k) mask, True = may attend. Query i sits at key position
    q_offset + i. With doc_ids (B, T_k) a token sees only keys of its own document."""
    qpos = torch.arange(T_q, device=device)[:, None] + q_offset
    kpos = torch.arange(T_k, device=device)[None, :]
    mask = (kpos <= qpos) if causal else torch.ones(T_q, T_k, dtype=torch.bool, device=device)
    mask = mask[None, None]
    if doc_ids is not None:
        dq = doc_ids[:, q_offset:q_offset + T_q]
        mask = mask & (dq[:, None, :, None] == doc_ids[:, None, None, :])
    return mask


def attention_ref(q, k, v, causal=True, doc_ids=None):
    """q (B, Hq, T, D), k/v (B, Hkv, T, D), Hq a multiple of Hkv. Query head h reads KV head
    h // (Hq // Hkv). doc_ids (B, T): a token attends only to earlier-or-equal tokens of its
    own document (packed sequences). Softmax scale 1/sqrt(D)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    assert Hq % Hkv == 0, f"query heads {Hq} not a multiple of kv heads {Hkv}"
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hq != Hkv)
    mask = attention_mask(T, T, q.device, causal, doc_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hq != Hkv)


def decode_attention_ref(q, k_cache, v_cache, kv_start, kv_end):
    """One new query per sequence against a static KV cache.
    q (B, Hq, 1, D); caches (B, Hkv, S, D); row b attends to cache slots [kv_start[b], kv_end).
    kv_start is a (B,) tensor (left padding of batched prompts), kv_end a 0-d tensor or int:
    both stay on the device so the decode loop never waits on the host.
    Under torch.compile it is written out (scores, mask, softmax, values): for one query per row
    the fused CPU SDPA kernel costs more in setup than the arithmetic, while inductor fuses these
    few ops into a loop or two; eagerly, SDPA is one op instead of twelve. The G = Hq // Hkv query
    heads of a group share their KV head through a view, never a copy of the cache."""
    B, Hq, _, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    slots = torch.arange(S, device=q.device)
    mask = (slots[None, :] >= kv_start[:, None]) & (slots[None, :] < kv_end)  # (B, S)
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[:, None, None, :],
                                              enable_gqa=Hq != Hkv)
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * D ** -0.5  # (B, Hkv, G, S)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    y = torch.matmul(scores.softmax(-1).to(v_cache.dtype), v_cache)           # (B, Hkv, G, D)
    return y.reshape(B, Hq, 1, D)


# ----------------------------------------------------------------------------------------------
# Dispatch: which implementation runs.

# Triton decides at decoration time (i.e. when this module is imported) whether @triton.jit
# builds compiled kernels or interpreted ones, so we read the variable once, here, like it does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# What "auto" does with CPU tensors. tests/conftest.py sets this to "torch" (see the docstring).
CPU_BACKEND = "triton" if INTERPRET else "torch"
_BACKENDS = ("auto", "triton", "torch")
_backend = "auto"
# Kernel launches per name ("attention_fwd", "swiglu_bwd", ...): lets tests prove Triton ran.
TRITON_CALLS = Counter()
# False: launch the attention and SwiGLU kernels with the fixed FIXED_BLOCKS below instead of
# autotuning them. The test suite sets it on a GPU, where autotuning (7-16 configs per kernel and
# shape class, ~1 s of compile each) would cost more than the tests themselves; the benchmark and
# training autotune. (Decode and RMSNorm are not autotuned: they size their blocks from the shape.)
AUTOTUNE = True


def _count(name):
    # Not while torch.compile traces: mutating a global there would break the graph.
    if not torch.compiler.is_compiling():
        TRITON_CALLS[name] += 1


@contextlib.contextmanager
def backend(name):
    """Force an implementation inside a `with` block: "triton", "torch" or "auto" (CUDA tensors
    -> Triton, CPU tensors -> CPU_BACKEND). Forcing "triton" on CPU tensors needs TRITON_INTERPRET=1
    in the environment before this module (and triton) were imported."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernels.backend: unknown backend {name!r}; valid: {', '.join(_BACKENDS)}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _use_triton(x):
    choice = _backend
    if choice == "auto":
        choice = "triton" if x.is_cuda else CPU_BACKEND
    if choice == "torch":
        return False
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError("kernels: Triton on CPU tensors runs only in Triton's interpreter; set "
                           "TRITON_INTERPRET=1 in the environment before importing kernels/triton, "
                           "or use kernels.backend('torch')")
    return True


def _autotune(configs, key, **kwargs):
    """triton.autotune on a GPU; under the interpreter the caller passes fixed small blocks
    (benchmarking configs there would only measure numpy)."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key, **kwargs)


def _launch(tuned, plain, grid, args, fixed_meta, **consts):
    """Launch the autotuned kernel `tuned` on a GPU, or its plain @triton.jit function `plain` with
    the `fixed_meta` blocks in the interpreter or with AUTOTUNE off. `grid` is a function of the
    meta-parameters (the block sizes). Both are passed so that torch.compile, which traces this
    call, never has to look inside the autotuner."""
    if INTERPRET or not AUTOTUNE:
        meta = dict(fixed_meta, **consts)
        plain[grid(meta)](*args, **meta)
    else:
        tuned[grid](*args, **consts)


# Fixed blocks: all of them under the interpreter; the attention and SwiGLU ones on a GPU too when
# AUTOTUNE is off. Small on purpose: with T = 129 every loop runs several iterations and the last
# block is ragged, which is where index bugs live. Tests may change them.
FIXED_BLOCKS = {
    "attn_fwd": dict(BLOCK_M=32, BLOCK_N=16),       # BLOCK_M % BLOCK_N == 0 (causal staging)
    "attn_bwd_dkdv": dict(BLOCK_M=16, BLOCK_N=32),  # BLOCK_N % BLOCK_M == 0
    "attn_bwd_dq": dict(BLOCK_M=32, BLOCK_N=16),    # BLOCK_M % BLOCK_N == 0
    "decode": dict(BLOCK_N=16, SPLIT=32),           # SPLIT % BLOCK_N == 0
    "swiglu": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2),
    "rms": dict(ROWS=4),
}


def _num_sms(device):
    # Streaming multiprocessors: sizes the grids of the split kernels (132 on an H100/H200).
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype):
    # fp32 inputs: tl.dot would use TF32 on Ampere+ (10-bit mantissa, ~1e-3 relative error);
    # keep IEEE fp32 so the fp32 path matches the reference. 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check_float(name, x):
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"kernels: {name} has dtype {x.dtype}; the Triton kernels take float32, "
                        f"float16 or bfloat16")
    if INTERPRET and x.dtype == torch.bfloat16 and not x.is_cuda:
        raise TypeError(f"kernels: {name} is bfloat16, which Triton's interpreter computes wrongly "
                        f"(numpy has no bf16); use float32/float16 on CPU, bf16 on a GPU")


# ----------------------------------------------------------------------------------------------
# Attention (training / prefill): FlashAttention-2 forward.
#
# Scores are computed in base 2: s2 = (q . k) * sm_scale * log2(e), so exp2 (one instruction) replaces
# exp; the saved statistic LSE = m + log2(l) is in the same units. The key range of a query block
# is walked in two stages: blocks that need no mask (strictly below the diagonal, fully inside T)
# and the few that do (the diagonal block, the ragged tail). Only the second stage pays for masks.

# (BLOCK_M, BLOCK_N) candidates; the forward and dQ walk keys inside a query block (BLOCK_M % BLOCK_N
# == 0), dK/dV walk queries inside a key block (BLOCK_N % BLOCK_M == 0), as in the Triton tutorial.
# 4 tiles x 2 warp counts x 2 pipeline depths = 16 configs per kernel: ~1.5 s of compile each.
_ATTN_TILES = {"fwd": [(128, 64), (128, 128), (64, 64), (128, 32)],
               "dkdv": [(32, 128), (64, 128), (32, 64), (64, 64)],
               "dq": [(128, 32), (128, 64), (64, 32), (64, 64)]}
# Autotune per power-of-two bucket of T, not per T: generation prefills prompts of every length.
_ATTN_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_DOC", "GROUP", "PREC"]


def _attn_configs(kind):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn in _ATTN_TILES[kind] for warps in (4, 8) for stages in (3, 4)]


def _prune_attn(configs, named_args, **kwargs):
    def arg(name):
        return named_args[name] if name in named_args else kwargs[name]
    keep = configs
    if arg("HEAD_DIM") >= 128:  # 128 x 128 tiles at head dim 128: more registers than 4 warps have
        keep = [c for c in keep if not (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128 and c.num_warps == 4)]
    if arg("PREC") == "ieee":   # fp32 dot products need ~2x the registers: big tiles only spill
        keep = [c for c in keep if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    if arg("HAS_DOC"):
        # The data-dependent `if run > 0` block skip stops software pipelining: 3 and 4 stages
        # compile to the same kernel (same registers and shared memory on sm_90), so try one.
        keep = [c for c in keep if c.num_stages == 3]
    return keep or configs


@triton.jit
def _key_block_mask(offs_m, offs_n, doc_q, doc_base, T,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
    """Which (query, key) pairs of a block may attend, and whether any does. Shared by the
    forward and the dQ loop, which walk the same key blocks for a query block."""
    keep = offs_n[None, :] < T                       # (1, BLOCK_N); all True outside MASKED
    if MASKED and CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    run = 1
    if HAS_DOC:
        doc_k = tl.load(doc_base + offs_n, mask=offs_n < T, other=-1)
        keep = keep & (doc_q[:, None] == doc_k[None, :])
        # A key block that shares no document with this query block adds exactly nothing:
        # skip both matmuls. With packed short documents that is most of the blocks.
        run = tl.max(keep.to(tl.int32))
    return keep, run


@triton.jit
def _load_kv_block(k_base, v_base, offs_n, stride_kt, stride_vt, T,
                   MASKED: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        kv_mask = offs_n[:, None] < T
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :])
    return k, v


@triton.jit
def _attn_fwd_loop(acc, l_i, m_i, q, doc_q, k_base, v_base, doc_base, stride_kt, stride_vt,
                   offs_m, lo, hi, T, qk_scale,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep, run = _key_block_mask(offs_m, offs_n, doc_q, doc_base, T, MASKED, CAUSAL, HAS_DOC)
        if run > 0:
            k, v = _load_kv_block(k_base, v_base, offs_n, stride_kt, stride_vt, T, MASKED, HEAD_DIM)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            if MASKED or HAS_DOC:
                s = tl.where(keep, s, float("-inf"))
            # m_i starts at -1e30 (finite), so a fully masked row gives p = exp2(-inf) = 0 and
            # alpha = exp2(0) = 1 instead of the NaN of (-inf) - (-inf).
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_body(Q, K, V, O, LSE, DOC,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_docb,
                   T, T_BUCKET, H, qk_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_DOC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first (tail balance)
        start_m = tl.num_programs(0) - 1 - start_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)                 # int64: b * stride_b passes 2^31 on big batches
    h = bh % H
    hk = (h // GROUP).to(tl.int64)             # GQA: the KV head this query head shares
    h = h.to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    doc_base = DOC + b * stride_docb

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    doc_q = tl.zeros([BLOCK_M], tl.int32)
    if HAS_DOC:
        doc_q = tl.load(doc_base + offs_m, mask=row_ok, other=-1)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        full_hi = start_m * BLOCK_M                       # keys strictly left of the diagonal
        tail_hi = tl.minimum((start_m + 1) * BLOCK_M, T)  # the diagonal block(s)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        tail_hi = T
    acc, l_i, m_i = _attn_fwd_loop(acc, l_i, m_i, q, doc_q, k_base, v_base, doc_base, stride_kt,
                                   stride_vt, offs_m, 0, full_hi, T, qk_scale, False, CAUSAL,
                                   HAS_DOC, PREC, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _attn_fwd_loop(acc, l_i, m_i, q, doc_q, k_base, v_base, doc_base, stride_kt,
                                   stride_vt, offs_m, full_hi, tail_hi, T, qk_scale, True, CAUSAL,
                                   HAS_DOC, PREC, BLOCK_N, HEAD_DIM)
    l_i = tl.where(row_ok, l_i, 1.0)   # padding rows (never stored) would divide 0 by 0
    acc = acc / l_i[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)


_attn_fwd_kernel = _autotune(_attn_configs("fwd"), key=_ATTN_KEY,
                             prune_configs_by={"early_config_prune": _prune_attn})(_attn_fwd_body)


# ----------------------------------------------------------------------------------------------
# Attention backward (FlashAttention-2 Alg. 2): delta = rowsum(dO * O); one kernel walks the query
# blocks for each key block (dK, dV: GQA sums the query heads of a group inside the program, no
# atomics), one walks the key blocks for each query block (dQ). P is recomputed from the LSE.

@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                    T, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_loop(dk, dv, k, v, doc_k, offs_n, q_base, do_base, lse_base, delta_base, doc_base,
                        stride_qt, stride_dot, lo, hi, T, qk_scale,
                        MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                        PREC: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    # Works in the transposed frame: rows are this program's keys, columns a block of queries.
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        keep = offs_m[None, :] < T                                      # (1, BLOCK_M)
        if MASKED and CAUSAL:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
        run = 1
        if HAS_DOC:
            doc_q = tl.load(doc_base + offs_m, mask=offs_m < T, other=-1)
            keep = keep & (doc_k[:, None] == doc_q[None, :])
            run = tl.max(keep.to(tl.int32))
        if run > 0:
            if MASKED:
                q_ok = offs_m < T
                q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_ok[:, None], other=0.0)
                do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_ok[:, None], other=0.0)
                lse = tl.load(lse_base + offs_m, mask=q_ok, other=0.0)
                delta = tl.load(delta_base + offs_m, mask=q_ok, other=0.0)
            else:
                q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :])
                do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :])
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)
            s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale    # (BLOCK_N, BLOCK_M)
            p_t = tl.exp2(s_t - lse[None, :])
            if MASKED or HAS_DOC:
                p_t = tl.where(keep, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_body(Q, K, V, DO, LSE, DELTA, DOC, DK, DV,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                        stride_docb, T, T_BUCKET, HKV, sm_scale, qk_scale,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_DOC: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < T
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=key_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=key_ok, other=0.0)
    doc_base = DOC + b * stride_docb
    doc_k = tl.zeros([BLOCK_N], tl.int32)
    if HAS_DOC:
        doc_k = tl.load(doc_base + offs_n, mask=offs_n < T, other=-2)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Query ranges for this key block (BLOCK_N % BLOCK_M == 0 keeps them block-aligned):
    # causal: the diagonal blocks [start_n, start_n + BLOCK_N) masked, then the rest unmasked up to
    # the last full query block, then the ragged tail masked again.
    T_full = (T // BLOCK_M) * BLOCK_M
    if CAUSAL:
        diag_hi = tl.minimum(start_n + BLOCK_N, T)
        mid_lo = start_n + BLOCK_N
    else:
        diag_hi = 0
        mid_lo = 0
    tail_lo = tl.maximum(T_full, mid_lo)
    for g in range(GROUP):  # every query head reading this KV head adds to its dK, dV
        h = hk * GROUP + g
        bh = b * (HKV * GROUP) + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * T
        delta_base = DELTA + bh * T
        if CAUSAL:
            dk, dv = _attn_bwd_dkdv_loop(dk, dv, k, v, doc_k, offs_n, q_base, do_base, lse_base,
                                         delta_base, doc_base, stride_qt, stride_dot, start_n,
                                         diag_hi, T, qk_scale, True, CAUSAL, HAS_DOC, PREC,
                                         BLOCK_M, HEAD_DIM)
        dk, dv = _attn_bwd_dkdv_loop(dk, dv, k, v, doc_k, offs_n, q_base, do_base, lse_base,
                                     delta_base, doc_base, stride_qt, stride_dot, mid_lo, T_full,
                                     T, qk_scale, False, CAUSAL, HAS_DOC, PREC, BLOCK_M, HEAD_DIM)
        dk, dv = _attn_bwd_dkdv_loop(dk, dv, k, v, doc_k, offs_n, q_base, do_base, lse_base,
                                     delta_base, doc_base, stride_qt, stride_dot, tail_lo, T,
                                     T, qk_scale, True, CAUSAL, HAS_DOC, PREC, BLOCK_M, HEAD_DIM)
    dk = dk * sm_scale  # s = sm_scale * q.k: the chain rule's factor, applied once at the end
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _attn_bwd_dq_loop(dq, q, do, lse, delta, doc_q, offs_m, k_base, v_base, doc_base, stride_kt, stride_vt,
                      lo, hi, T, qk_scale,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                      PREC: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep, run = _key_block_mask(offs_m, offs_n, doc_q, doc_base, T, MASKED, CAUSAL, HAS_DOC)
        if run > 0:
            k, v = _load_kv_block(k_base, v_base, offs_n, stride_kt, stride_vt, T, MASKED, HEAD_DIM)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            if MASKED or HAS_DOC:
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq_body(Q, K, V, DO, LSE, DELTA, DOC, DQ,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                      stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                      stride_dqb, stride_dqh, stride_dqt, stride_docb, T, T_BUCKET, H, sm_scale, qk_scale,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_DOC: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - start_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    doc_base = DOC + b * stride_docb
    doc_q = tl.zeros([BLOCK_M], tl.int32)
    if HAS_DOC:
        doc_q = tl.load(doc_base + offs_m, mask=row_ok, other=-1)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        full_hi = start_m * BLOCK_M
        tail_hi = tl.minimum((start_m + 1) * BLOCK_M, T)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        tail_hi = T
    dq = _attn_bwd_dq_loop(dq, q, do, lse, delta, doc_q, offs_m, k_base, v_base, doc_base, stride_kt,
                           stride_vt, 0, full_hi, T, qk_scale, False, CAUSAL, HAS_DOC, PREC,
                           BLOCK_N, HEAD_DIM)
    dq = _attn_bwd_dq_loop(dq, q, do, lse, delta, doc_q, offs_m, k_base, v_base, doc_base, stride_kt,
                           stride_vt, full_hi, tail_hi, T, qk_scale, True, CAUSAL, HAS_DOC, PREC,
                           BLOCK_N, HEAD_DIM)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


_attn_bwd_dkdv_kernel = _autotune(_attn_configs("dkdv"), key=_ATTN_KEY,
                                  prune_configs_by={"early_config_prune": _prune_attn})(_attn_bwd_dkdv_body)
_attn_bwd_dq_kernel = _autotune(_attn_configs("dq"), key=_ATTN_KEY,
                                prune_configs_by={"early_config_prune": _prune_attn})(_attn_bwd_dq_body)


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_attention_inputs(q, k, v, doc_ids):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-d (B, H, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"(B={B}, Hkv, T={T}, D={D}) for q {tuple(q.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"attention: query heads {Hq} not a multiple of kv heads {k.shape[1]}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"attention: the Triton kernel takes head dim 16..256, a power of two; got "
                         f"{D} (use kernels.backend('torch'))")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check_float("attention q", q)
    if doc_ids is not None and tuple(doc_ids.shape) != (B, T):
        raise ValueError(f"attention: doc_ids must be (B={B}, T={T}); got {tuple(doc_ids.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        # Offsets inside one head are int32 (cheaper address math); heads/batches use int64.
        if T * x.stride(2) >= 2 ** 31:
            raise ValueError(f"attention: {name} has T * stride(2) = {T * x.stride(2)} >= 2^31; "
                             f"make it contiguous (B, H, T, D)")


def _t_bucket(T):
    return min(triton.next_power_of_2(T), 16384)


def _doc_arg(doc_ids, q):
    if doc_ids is None:  # a dummy pointer: HAS_DOC=False never reads it
        return torch.zeros(1, 1, dtype=torch.int32, device=q.device), False
    return doc_ids.to(device=q.device, dtype=torch.int32).contiguous(), True


def _attention_fwd(q, k, v, causal, doc_ids):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    doc, has_doc = _doc_arg(doc_ids, q)
    sm_scale = 1.0 / math.sqrt(D)
    args = (q, k, v, o, lse, doc, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            doc.stride(0), T, _t_bucket(T), Hq, sm_scale * 1.4426950408889634)   # log2(e)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)
    _launch(_attn_fwd_kernel, _attn_fwd_body, grid, args, FIXED_BLOCKS["attn_fwd"], GROUP=Hq // Hkv,
            HEAD_DIM=D, CAUSAL=bool(causal), HAS_DOC=has_doc, PREC=_dot_precision(q.dtype))
    _count("attention_fwd")
    return o, lse


def _attention_bwd(do, q, k, v, o, lse, causal, doc_ids):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    do = _last_dim_contiguous(do)
    doc, has_doc = _doc_arg(doc_ids, q)
    delta = torch.empty_like(lse)
    dm = 64 if not INTERPRET else 16
    _attn_bwd_delta[(triton.cdiv(T, dm), B * Hq)](o, do, delta, *o.stride()[:3], *do.stride()[:3], T, Hq,
                                                  HEAD_DIM=D, BLOCK_M=dm)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    sm_scale = 1.0 / math.sqrt(D)
    consts = dict(GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=bool(causal), HAS_DOC=has_doc,
                  PREC=_dot_precision(q.dtype))
    args = (q, k, v, do, lse, delta, doc, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], doc.stride(0), T, _t_bucket(T), Hkv, sm_scale,
            sm_scale * 1.4426950408889634)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)
    _launch(_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_body, grid, args, FIXED_BLOCKS["attn_bwd_dkdv"], **consts)
    args = (q, k, v, do, lse, delta, doc, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *do.stride()[:3], *dq.stride()[:3], doc.stride(0), T, _t_bucket(T), Hq, sm_scale,
            sm_scale * 1.4426950408889634)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)
    _launch(_attn_bwd_dq_kernel, _attn_bwd_dq_body, grid, args, FIXED_BLOCKS["attn_bwd_dq"], **consts)
    _count("attention_bwd")
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, doc_ids):
        o, lse = _attention_fwd(q, k, v, causal, doc_ids)
        ctx.save_for_backward(q, k, v, o, lse, doc_ids)  # O(T) extra: the LSE, not the (T, T) matrix
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc_ids = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, ctx.causal, doc_ids)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------
# Decode attention (flash-decoding): one query per sequence, the cache split into chunks.

@triton.jit
def _decode_split_kernel(Q, K, V, KV_START, KV_END, M_OUT, L_OUT, ACC_OUT,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                         stride_vb, stride_vh, stride_vt, HKV, S, qk_scale,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    # The GROUP query heads that share this KV head are the rows of one small matrix, so the
    # cache chunk is read once for all of them (padded to 16 rows: tl.dot's minimum).
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    q = tl.load(Q + b * stride_qb + (hk * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    # Read from device memory: no host sync on the cache bounds.
    start = tl.load(KV_START + b)
    end = tl.minimum(tl.load(KV_END), S)
    lo = tl.maximum(split * SPLIT, (start // BLOCK_N) * BLOCK_N)
    hi = tl.minimum((split + 1) * SPLIT, end)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([GROUP_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = (offs_n >= start) & (offs_n < hi)
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    row = (b * HKV + hk) * GROUP + offs_g                       # flat (b, query head) index
    tl.store(M_OUT + row * NUM_SPLITS + split, m_i, mask=g_ok)
    tl.store(L_OUT + row * NUM_SPLITS + split, l_i, mask=g_ok)
    tl.store(ACC_OUT + (row * NUM_SPLITS + split)[:, None] * HEAD_DIM + offs_d[None, :], acc,
             mask=g_ok[:, None])


@triton.jit
def _decode_combine_kernel(M_IN, L_IN, ACC_IN, O, NUM_SPLITS, HEAD_DIM: tl.constexpr,
                           SPLITS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    m = tl.load(M_IN + row * NUM_SPLITS + offs_s, mask=s_ok, other=-1.0e30)
    l = tl.load(L_IN + row * NUM_SPLITS + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(ACC_IN + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))     # rescale every chunk to the global max (empty chunks -> 0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(O + row * HEAD_DIM + offs_d, out.to(O.dtype.element_ty))


def _decode_attention(q, k_cache, v_cache, kv_start, kv_end):
    B, Hq, one, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    if one != 1 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: need q (B, Hq, 1, D) and caches (B, Hkv, S, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if Hq % Hkv or D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"decode_attention: Hq={Hq} must be a multiple of Hkv={Hkv}, head dim {D} a "
                         f"power of two in 16..256")
    _check_float("decode_attention q", q)
    q, k_cache, v_cache = (_last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    kv_start = kv_start.to(device=q.device, dtype=torch.int64).contiguous()
    if torch.is_tensor(kv_end):
        kv_end = kv_end.to(device=q.device, dtype=torch.int64).reshape(1)
    else:  # a Python int: one small host->device copy, no sync
        kv_end = torch.full((1,), int(kv_end), device=q.device, dtype=torch.int64)
    group = Hq // Hkv
    if INTERPRET:
        blocks = FIXED_BLOCKS["decode"]
        block_n, split = blocks["BLOCK_N"], blocks["SPLIT"]
        num_warps = 4
    else:
        # Enough (sequence, KV head, chunk) programs to fill the GPU (~2 per SM), chunks of at
        # least 256 slots so each program streams a useful amount of cache.
        block_n, num_warps = 64, 4
        sms = _num_sms(q.device)
        want = max(1, triton.cdiv(2 * sms, B * Hkv))
        split = max(256, triton.cdiv(triton.cdiv(S, want), block_n) * block_n)
    num_splits = triton.cdiv(S, split)
    rows = B * Hq
    m_part = torch.empty(rows, num_splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(rows, num_splits, D, device=q.device, dtype=torch.float32)
    _decode_split_kernel[(B * Hkv, num_splits)](
        q, k_cache, v_cache, kv_start, kv_end, m_part, l_part, acc_part,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], Hkv, S,
        1.4426950408889634 / math.sqrt(D), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=D, NUM_SPLITS=num_splits, PREC=_dot_precision(q.dtype), BLOCK_N=block_n, SPLIT=split,
        **({} if INTERPRET else dict(num_warps=num_warps)))
    o = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    _decode_combine_kernel[(rows,)](m_part, l_part, acc_part, o, num_splits, HEAD_DIM=D,
                                    SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)))
    _count("decode_attention")
    return o


# ----------------------------------------------------------------------------------------------
# SwiGLU FFN: gate and up projections in one kernel with the silu(g) * u epilogue.

def _swiglu_configs():
    cfgs = []
    for bm, bn, bk, warps, stages in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                      (128, 128, 32, 8, 4), (64, 64, 64, 4, 4), (128, 64, 32, 4, 4),
                                      (64, 64, 32, 4, 5)]:
        # Two fp32 accumulators (gate, up) per tile: 128 x 128 at 8 warps is already 128 registers
        # per thread of accumulators, so no 128 x 256 tiles here (a plain matmul's favourite).
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


@triton.jit
def _swiglu_body(X, WG, WU, H, DH, DG, DU, M, N, K, M_BUCKET,
                 stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hn,
                 BACKWARD: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # Tile order grouped along M ("super-grouping"): GROUP_M row tiles share the same weight
    # column tiles while they are still in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)   # M * K can pass 2^31
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wg_ptrs = WG + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N) = W^T
    wu_ptrs = WU + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        gate = tl.dot(x, wg, gate, input_precision=PREC)
        up = tl.dot(x, wu, up, input_precision=PREC)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = silu * up
    out_off = offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn
    out_ok = m_ok[:, None] & n_ok[None, :]
    if BACKWARD:
        # d/dg silu(g) = sig * (1 + g * (1 - sig)). DH holds dL/dh on entry and h on exit: this
        # tile is read and then overwritten by this program only, so the in-place write is safe.
        dh = tl.load(DH + out_off, mask=out_ok, other=0.0).to(tl.float32)
        tl.store(DH + out_off, h.to(DH.dtype.element_ty), mask=out_ok)
        tl.store(DU + out_off, (dh * silu).to(DU.dtype.element_ty), mask=out_ok)
        tl.store(DG + out_off, (dh * up * sig * (1.0 + gate * (1.0 - sig))).to(DG.dtype.element_ty),
                 mask=out_ok)
    else:
        tl.store(H + out_off, h.to(H.dtype.element_ty), mask=out_ok)


# Autotune per power-of-two bucket of the token count M (M_BUCKET, unused by the kernel), not per M:
# generation prefills batches of every length and would otherwise re-tune at each new one.
_swiglu_fwd_kernel = _autotune(_swiglu_configs(), key=["M_BUCKET", "N", "K", "PREC"])(_swiglu_body)
# restore_value: the autotuner runs each config on the same buffers; DH is overwritten in place.
_swiglu_bwd_kernel = _autotune(_swiglu_configs(), key=["M_BUCKET", "N", "K", "PREC"],
                               restore_value=["DH"])(_swiglu_body)


def _swiglu_gate_up(x2, w_gate, w_up, dh=None):
    """Forward: h = silu(x2 @ w_gate.T) * (x2 @ w_up.T), shape (M, N). Backward (dh given):
    returns (h, dgate, dup), h written into dh's storage."""
    M, K = x2.shape
    N = w_gate.shape[0]
    backward = dh is not None
    if backward:
        h, dg, du = dh, torch.empty_like(dh), torch.empty_like(dh)
    else:
        h = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
        dg = du = h    # unused pointers when BACKWARD=False
    args = (x2, w_gate, w_up, h, h, dg, du, M, N, K, triton.next_power_of_2(M), x2.stride(0), x2.stride(1),
            w_gate.stride(0), w_gate.stride(1), h.stride(0), h.stride(1))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _launch(_swiglu_bwd_kernel if backward else _swiglu_fwd_kernel, _swiglu_body, grid, args,
            FIXED_BLOCKS["swiglu"], BACKWARD=backward, PREC=_dot_precision(x2.dtype))
    return (h, dg, du) if backward else h


class _SwiGLUFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        x2 = x.reshape(-1, x.shape[-1])
        h = _swiglu_gate_up(x2, w_gate, w_up)
        y = h @ w_down.t()
        # Saved: x and the weights only. gate, up and h (3 x M x intermediate: ~8x the size of
        # x in a Llama) are recomputed in the backward.
        ctx.save_for_backward(x, w_gate, w_up, w_down)
        _count("swiglu_fwd")
        return y.reshape(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w_gate, w_up, w_down = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        dh = dy2 @ w_down                       # (M, N); becomes h inside the kernel
        h, dg, du = _swiglu_gate_up(x2, w_gate, w_up, dh)
        dx = dg @ w_gate
        dx.addmm_(du, w_up)
        dw_down = dy2.t() @ h if ctx.needs_input_grad[3] else None
        dw_gate = dg.t() @ x2 if ctx.needs_input_grad[1] else None
        dw_up = du.t() @ x2 if ctx.needs_input_grad[2] else None
        _count("swiglu_bwd")
        return dx.reshape(x.shape), dw_gate, dw_up, dw_down


# ----------------------------------------------------------------------------------------------
# RMSNorm.

@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, M, N, eps, stride_x, stride_y,
                    ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    # Same rounding order as the reference: normalise, cast to x's dtype, then scale by w.
    xhat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (xhat * w[None, :]).to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _rms_bwd_kernel(X, W, DY, RSTD, DX, DW_PART, M, N, stride_x, stride_dy, stride_dx,
                    ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Each program walks row blocks pid, pid + P, pid + 2P, ... and keeps its dW partial sum in
    # registers; the P partial rows are summed afterwards (no atomics, deterministic).
    pid = tl.program_id(0)
    num_p = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    for row0 in range(pid * ROWS, M, num_p * ROWS):
        rows = (row0 + tl.arange(0, ROWS)).to(tl.int64)
        ok = (rows[:, None] < M) & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
        xhat = x * rstd[:, None]
        dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), 0)
        # y = w * x * rstd(x):  dx = rstd * (dy*w - xhat * mean(dy*w * xhat))
        dyw = dy * w[None, :]
        dx = rstd[:, None] * (dyw - xhat * (tl.sum(dyw * xhat, 1) / N)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
    tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw, mask=col_ok)


def _rms_meta(N):
    block_n = triton.next_power_of_2(N)
    if INTERPRET:
        return block_n, FIXED_BLOCKS["rms"]["ROWS"], {}
    # Keep ~4k elements per program: one row of a 4096-wide model, 16 rows of a 256-wide one.
    rows = max(1, min(16, 4096 // block_n))
    return block_n, rows, dict(num_warps=min(16, max(4, block_n // 1024)))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        N = x.shape[-1]
        if weight.shape != (N,):
            raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be ({N},) for x {tuple(x.shape)}")
        _check_float("rms_norm x", x)
        _check_float("rms_norm weight", weight)
        if N > 65536:
            raise ValueError(f"rms_norm: width {N} > 65536 does not fit one Triton block")
        x2 = x.reshape(-1, N)
        x2 = _last_dim_contiguous(x2)
        M = x2.shape[0]
        y = torch.empty(M, N, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        block_n, rows, launch = _rms_meta(N)
        _rms_fwd_kernel[(triton.cdiv(M, rows),)](x2, weight, y, rstd, M, N, eps, x2.stride(0), y.stride(0),
                                                 ROWS=rows, BLOCK_N=block_n, **launch)
        # Save x itself, not the view x2: torch.compile refuses saved intermediates that alias inputs.
        ctx.save_for_backward(x, weight, rstd)
        _count("rms_norm_fwd")
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        N = x.shape[-1]
        x2 = _last_dim_contiguous(x.reshape(-1, N))
        M = x2.shape[0]
        dy2 = _last_dim_contiguous(dy.reshape(-1, N))
        dx = torch.empty_like(x2)
        block_n, rows, launch = _rms_meta(N)
        if INTERPRET:
            programs = min(triton.cdiv(M, rows), 4)
        else:  # a few programs per SM: enough to stream, few enough that the dW partials are tiny
            programs = min(triton.cdiv(M, rows), 4 * _num_sms(x2.device))
        dw_part = torch.empty(programs, N, device=x2.device, dtype=torch.float32)
        _rms_bwd_kernel[(programs,)](x2, weight, dy2, rstd, dx, dw_part, M, N, x2.stride(0), dy2.stride(0),
                                     dx.stride(0), ROWS=rows, BLOCK_N=block_n, **launch)
        _count("rms_norm_bwd")
        return dx.reshape(x.shape), dw_part.sum(0).to(weight.dtype), None


# ----------------------------------------------------------------------------------------------
# Public entry points.

def _autocast(*tensors):
    """Under torch.autocast (bf16 training with fp32 weights, runtime.autocast) cast matmul inputs
    to the autocast dtype, as autocast does for F.linear and SDPA; the casts are differentiable, so
    fp32 parameters still receive fp32 gradients."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def rms_norm(x, weight, eps):
    if not _use_triton(x):
        return rms_norm_ref(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


def swiglu_ffn_packed(x, w_gate_up, w_down):
    """swiglu_ffn with gate and up stacked in one (2I, H) matrix (rows [0, I) gate, [I, 2I) up):
    one matmul for both on the reference path (decode on a CPU, where each op costs more than its
    arithmetic); the Triton kernel already computes both in one launch, so it takes the two halves."""
    I = w_gate_up.shape[0] // 2
    if not _use_triton(x):
        gate, up = F.linear(x, w_gate_up).split(I, dim=-1)
        return F.linear(F.silu(gate) * up, w_down)
    return swiglu_ffn(x, w_gate_up[:I], w_gate_up[I:], w_down)


def swiglu_ffn(x, w_gate, w_up, w_down):
    if not _use_triton(x):
        return swiglu_ffn_ref(x, w_gate, w_up, w_down)
    x, w_gate, w_up, w_down = _autocast(x, w_gate, w_up, w_down)
    H = x.shape[-1]
    if w_gate.shape != w_up.shape or w_gate.shape[1] != H or w_down.shape != (H, w_gate.shape[0]):
        raise ValueError(f"swiglu_ffn: need w_gate, w_up (I, {H}) and w_down ({H}, I); got "
                         f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        _check_float(f"swiglu_ffn {name}", t)
    if not (x.dtype == w_gate.dtype == w_up.dtype == w_down.dtype):
        raise TypeError(f"swiglu_ffn: x and weights must share a dtype (cast under autocast first); got "
                        f"{x.dtype}, {w_gate.dtype}, {w_up.dtype}, {w_down.dtype}")
    if w_gate.stride() != w_up.stride():  # the kernel walks both with one set of strides
        w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    return _SwiGLUFFN.apply(x, w_gate, w_up, w_down)


def _kernel_head_dim(D):
    return 16 <= D <= 256 and D & (D - 1) == 0


def _reference_for_head_dim(q):
    """Under "auto", a head dim the kernels do not take (e.g. 8 in a tiny model, or 96) runs the
    reference instead of failing, with one warning; a forced "triton" backend still raises."""
    if _backend == "auto" and not _kernel_head_dim(q.shape[-1]):
        if q.shape[-1] not in _WARNED_HEAD_DIMS:
            _WARNED_HEAD_DIMS.add(q.shape[-1])
            warnings.warn(f"kernels: head dim {q.shape[-1]} is not a power of two in 16..256; attention "
                          f"runs the PyTorch reference")
        return True
    return False


_WARNED_HEAD_DIMS = set()


def attention(q, k, v, causal=True, doc_ids=None):
    if not _use_triton(q) or _reference_for_head_dim(q):
        return attention_ref(q, k, v, causal, doc_ids)
    q, k, v = _autocast(q, k, v)
    _check_attention_inputs(q, k, v, doc_ids)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _FlashAttention.apply(q, k, v, causal, doc_ids)


def decode_attention(q, k_cache, v_cache, kv_start, kv_end):
    if not _use_triton(q) or _reference_for_head_dim(q):
        return decode_attention_ref(q, k_cache, v_cache, kv_start, kv_end)
    q, k_cache, v_cache = _autocast(q, k_cache, v_cache)
    return _decode_attention(q, k_cache, v_cache, kv_start, kv_end)


if __name__ == "__main__":   # the benchmark and compile check moved: say where
    import sys
    print("error: kernels.py has no command line; run python tools/bench_kernels.py --bench (GPU) or "
          "--compile_check (no GPU needed)", file=sys.stderr)
    sys.exit(2)
