"""
kernels.py: the three pieces of math every Llama layer runs, each as a public function with a
plain PyTorch reference beside it.

    attention(q, k, v, causal=True, doc_ids=None)          reference: attention_ref
    decode_attention(q, k_cache, v_cache, kv_start, kv_end) reference: decode_attention_ref
    swiglu_ffn(x, w_gate, w_up, w_down)                     reference: swiglu_ffn_ref
    rms_norm(x, weight, eps)                                reference: rms_norm_ref

model.py calls only the public functions. This file knows nothing of the model.
(The hand-written Triton kernels are dispatched from these functions; see issue 5.)
"""
import torch
import torch.nn.functional as F


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
    both stay on the device so the decode loop never waits on the host."""
    S = k_cache.shape[2]
    slots = torch.arange(S, device=q.device)
    mask = (slots[None, :] >= kv_start[:, None]) & (slots[None, :] < kv_end)  # (B, S)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[:, None, None, :],
                                          enable_gqa=q.shape[1] != k_cache.shape[1])


# ----------------------------------------------------------------------------------------------
# Public entry points.

def rms_norm(x, weight, eps):
    return rms_norm_ref(x, weight, eps)


def swiglu_ffn(x, w_gate, w_up, w_down):
    return swiglu_ffn_ref(x, w_gate, w_up, w_down)


def attention(q, k, v, causal=True, doc_ids=None):
    return attention_ref(q, k, v, causal, doc_ids)


def decode_attention(q, k_cache, v_cache, kv_start, kv_end):
    return decode_attention_ref(q, k_cache, v_cache, kv_start, kv_end)
