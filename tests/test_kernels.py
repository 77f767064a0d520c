"""
Tests for kernels.py: every Triton kernel (forward and backward) against its PyTorch reference.

On a CPU-only machine tests/conftest.py sets TRITON_INTERPRET=1, so the kernels run in Triton's
interpreter here; on a GPU the same tests run the compiled kernels. Shapes are odd on purpose
(T in {1, 17, 67, 129} against 16/32-wide blocks: ragged tails, several loop iterations), the
reference runs in float64, and the mutation tests below plant bugs in a copy of kernels.py to show
these tolerances catch them.

    python -m pytest -q tests/test_kernels.py        (~1-2 min on 2 CPU cores)
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import kernels
from configurator import ConfigError, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "tools", "bench_kernels.py"))
bench_kernels = importlib.util.module_from_spec(_spec)   # tools/ is not a package: loaded by path
_spec.loader.exec_module(bench_kernels)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEV == "cpu" and not kernels.INTERPRET,
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 before import (tests/conftest.py sets it)")

FP32_TOL = dict(atol=2e-5, rtol=2e-5)    # observed errors vs float64: ~1e-6
FP16_TOL = dict(atol=1e-2, rtol=1e-2)    # fp16 inputs / P cast to fp16 before P @ V: ~1e-3
# bf16 (GPU only) keeps 8 mantissa bits to fp16's 11, and the backward's delta = rowsum(dO * O)
# starts from the bf16 O: emulated in float64, dK errors reach ~2e-2 element-wise at T = 1000. So
# bf16 is held to its scale: max error <= BF16_REL * max |reference|, as in the FFN checks.
BF16_REL = 2e-2


def _doc_ids(kind, B, T, gen):
    if kind is None:
        return None
    if kind == "packed":   # contiguous documents of random lengths, as the data loader packs them
        starts = torch.rand(B, T, generator=gen) < 0.08
        return torch.cumsum(starts.long(), dim=1)
    if kind == "scattered":  # the same id may reappear later: the mask is by equality, not by span
        return torch.randint(0, 3, (B, T), generator=gen)
    raise ValueError(kind)


def _calls(mod, name):
    return mod.TRITON_CALLS[name]


# ----------------------------------------------------------------------------------------------
# Check functions, shared by the plain tests and by the mutation tests.

def check_attention(mod, B, Hq, Hkv, T, D, causal, doc, dtype=torch.float32, layout="bhtd", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make(H):
        if layout == "bthd":  # (B, T, H, D) transposed to (B, H, T, D): how a model often holds it
            return torch.randn(B, T, H, D, generator=gen).transpose(1, 2)
        return torch.randn(B, H, T, D, generator=gen)

    # The float64 reference starts from the inputs as the kernel sees them (rounded to `dtype`), so
    # the tolerance measures the kernel's own error, not the inputs' rounding.
    q64, k64, v64 = (make(H).to(dtype).double() for H in (Hq, Hkv, Hkv))
    do64 = torch.randn(B, Hq, T, D, generator=gen).to(dtype).double()
    doc_ids = _doc_ids(doc, B, T, gen)
    q, k, v = (t.to(DEV, dtype).requires_grad_() for t in (q64, k64, v64))
    fwd0, bwd0 = _calls(mod, "attention_fwd"), _calls(mod, "attention_bwd")
    with mod.backend("triton"):
        o = mod.attention(q, k, v, causal=causal, doc_ids=None if doc_ids is None else doc_ids.to(DEV))
        grads = torch.autograd.grad(o, (q, k, v), do64.to(DEV, dtype))
    assert (_calls(mod, "attention_fwd"), _calls(mod, "attention_bwd")) == (fwd0 + 1, bwd0 + 1), \
        "the Triton path did not run"
    q64, k64, v64 = (t.requires_grad_() for t in (q64, k64, v64))
    ref = kernels.attention_ref(q64, k64, v64, causal, doc_ids)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do64)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (o, *grads), (ref, *ref_grads)):
        assert got.dtype == dtype and got.shape == want.shape, name
        if dtype == torch.bfloat16:   # see BF16_REL
            err = (got.double().cpu() - want).abs().max().item()
            assert err <= BF16_REL * want.abs().max().item(), f"{name}: max error {err}"
        else:
            tol = FP32_TOL if dtype == torch.float32 else FP16_TOL
            torch.testing.assert_close(got.double().cpu(), want, **tol, msg=lambda m: f"{name}: {m}")


def check_decode(mod, B, Hq, Hkv, S, D, end_as_int=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=gen).double()
    kc, vc = torch.randn(2, B, Hkv, S, D, generator=gen).double()
    kv_end = max(1, S - 3)
    kv_start = torch.randint(0, kv_end, (B,), generator=gen)
    calls = _calls(mod, "decode_attention")
    with mod.backend("triton"):
        o = mod.decode_attention(q.float().to(DEV), kc.float().to(DEV), vc.float().to(DEV), kv_start.to(DEV),
                                 kv_end if end_as_int else torch.tensor(kv_end, device=DEV))
    assert _calls(mod, "decode_attention") == calls + 1, "the Triton path did not run"
    ref = kernels.decode_attention_ref(q, kc, vc, kv_start, torch.tensor(kv_end))
    torch.testing.assert_close(o.double().cpu(), ref, **FP32_TOL)


def check_swiglu(mod, lead, H, inter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, H, generator=gen).double()
    ws = [torch.randn(inter, H, generator=gen).double() / H ** 0.5,
          torch.randn(inter, H, generator=gen).double() / H ** 0.5,
          torch.randn(H, inter, generator=gen).double() / inter ** 0.5]
    dy = torch.randn(*lead, H, generator=gen).double()
    args = [t.float().to(DEV).requires_grad_() for t in (x, *ws)]
    calls = (_calls(mod, "swiglu_fwd"), _calls(mod, "swiglu_bwd"))
    with mod.backend("triton"):
        y = mod.swiglu_ffn(*args)
        grads = torch.autograd.grad(y, args, dy.float().to(DEV))
    assert (_calls(mod, "swiglu_fwd"), _calls(mod, "swiglu_bwd")) == (calls[0] + 1, calls[1] + 1)
    ref_args = [t.requires_grad_() for t in (x, *ws)]
    ref = kernels.swiglu_ffn_ref(*ref_args)
    ref_grads = torch.autograd.grad(ref, ref_args, dy)
    for name, got, want in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), (y, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got.double().cpu(), want, atol=5e-5, rtol=5e-5, msg=lambda m: f"{name}: {m}")


def check_rms(mod, lead, N, eps=1e-5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, N, generator=gen) * 3).double()
    w = (1 + 0.1 * torch.randn(N, generator=gen)).double()
    dy = torch.randn(*lead, N, generator=gen).double()
    args = [t.float().to(DEV).requires_grad_() for t in (x, w)]
    calls = (_calls(mod, "rms_norm_fwd"), _calls(mod, "rms_norm_bwd"))
    with mod.backend("triton"):
        y = mod.rms_norm(*args, eps)
        grads = torch.autograd.grad(y, args, dy.float().to(DEV))
    assert (_calls(mod, "rms_norm_fwd"), _calls(mod, "rms_norm_bwd")) == (calls[0] + 1, calls[1] + 1)
    ref_args = [t.requires_grad_() for t in (x, w)]
    ref = kernels.rms_norm_ref(*ref_args, eps)
    ref_grads = torch.autograd.grad(ref, ref_args, dy)
    for name, got, want in zip(("y", "dx", "dw"), (y, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got.double().cpu(), want, **FP32_TOL, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# Attention: outputs and dq, dk, dv on odd shapes, GQA groups 1/2/4, with and without documents.

ATTN_CASES = [  # (B, Hq, Hkv, T, D, causal, doc_ids)
    (1, 4, 1, 1, 32, True, None),
    (2, 4, 2, 17, 32, True, None),
    (3, 4, 4, 67, 32, True, "packed"),
    (1, 4, 2, 129, 32, True, "packed"),
    (2, 4, 1, 129, 64, True, None),
    (2, 4, 2, 67, 32, False, None),
    (1, 4, 4, 129, 32, False, "packed"),
    (3, 4, 1, 17, 64, False, "scattered"),
    (2, 4, 2, 67, 64, True, "scattered"),
    (1, 4, 2, 1, 32, False, "packed"),
]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,causal,doc", ATTN_CASES)
def test_attention_matches_reference(B, Hq, Hkv, T, D, causal, doc):
    check_attention(kernels, B, Hq, Hkv, T, D, causal, doc)


def test_attention_strided_input_layout():
    # q/k/v as transposed (B, T, H, D) views: the kernel follows strides instead of copying.
    check_attention(kernels, 2, 4, 2, 67, 32, True, "packed", layout="bthd")


@pytest.mark.parametrize("blocks", [dict(fwd=(16, 16), dkdv=(16, 16), dq=(16, 16)),
                                    dict(fwd=(64, 32), dkdv=(32, 64), dq=(64, 64))])
def test_attention_other_block_sizes(monkeypatch, blocks):
    # Square tiles, and tiles larger than T = 17 / spanning the ragged tail of T = 67.
    for name, (bm, bn) in blocks.items():
        key = {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq"}[name]
        monkeypatch.setitem(kernels.FIXED_BLOCKS, key, dict(BLOCK_M=bm, BLOCK_N=bn))
    check_attention(kernels, 2, 4, 2, 67, 32, True, "packed")
    check_attention(kernels, 1, 4, 4, 17, 32, False, None)


def test_attention_fp16():
    # 16-bit inputs, fp32 accumulation (bf16 cannot run in the interpreter; see test below).
    check_attention(kernels, 2, 4, 2, 67, 64, True, "packed", dtype=torch.float16)


@pytest.mark.skipif(DEV == "cpu", reason="bf16 needs a GPU (the interpreter has no bf16)")
def test_attention_bf16_gpu():
    check_attention(kernels, 2, 4, 2, 129, 128, True, "packed", dtype=torch.bfloat16)


def test_attention_autotune_pruning():
    # The pruned lists the GPU autotuner tries: never empty, no 4-stage configs with doc_ids (they
    # compile to the 3-stage kernel), small tiles only for fp32, no 128 x 128 x 4-warp at D = 128.
    for kind in ("fwd", "dkdv", "dq"):
        configs = kernels._attn_configs(kind)
        for D in (32, 64, 128):
            for prec in ("tf32", "ieee"):
                for has_doc in (False, True):
                    kept = kernels._prune_attn(configs, {"HEAD_DIM": D}, PREC=prec, HAS_DOC=has_doc)
                    tiles = [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in kept]
                    assert kept and all(c in configs for c in kept)
                    assert not has_doc or {c.num_stages for c in kept} == {3}
                    assert prec == "tf32" or max(tiles) <= 64 * 64
                    assert not (D == 128 and any(t >= 128 * 128 and c.num_warps == 4 for t, c in zip(tiles, kept)))
                    if prec == "tf32" and not has_doc and D < 128:
                        assert kept == configs


@pytest.mark.skipif(DEV == "cpu", reason="autotuning needs a GPU")
def test_autotuned_kernels_on_gpu(monkeypatch):
    # The rest of the suite runs fixed blocks on a GPU (tests/conftest.py); here the autotuner
    # picks among its real tiles, on the shapes of `python tools/bench_kernels.py --bench` (whose compiles
    # this warms), and every kernel is checked against the reference.
    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    check_attention(kernels, 1, 16, 16, 1024, 128, True, None, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1000, 1024, generator=gen).to(DEV, torch.bfloat16).requires_grad_()
    ws = [(torch.randn(*s, generator=gen) * s[1] ** -0.5).to(DEV, torch.bfloat16).requires_grad_()
          for s in ((2816, 1024), (2816, 1024), (1024, 2816))]
    dy = torch.randn(2, 1000, 1024, generator=gen).to(DEV, torch.bfloat16)
    for fast, ref, args in ((kernels.swiglu_ffn, kernels.swiglu_ffn_ref, [x, *ws]),
                            (lambda x, w: kernels.rms_norm(x, w, 1e-5), lambda x, w: kernels.rms_norm_ref(x, w, 1e-5),
                             [x, ws[0][0].detach().clone().requires_grad_()])):
        with kernels.backend("triton"):
            got = fast(*args)
            got_grads = torch.autograd.grad(got, args, dy)
        args64 = [a.detach().double().requires_grad_() for a in args]
        want = ref(*args64)
        want_grads = torch.autograd.grad(want, args64, dy.double())
        for g, w in zip((got, *got_grads), (want, *want_grads)):   # bf16 outputs: relative to the scale
            assert (g.double() - w).abs().max() <= 2e-2 * w.abs().max(), (g.double() - w).abs().max()


# torch.compile over the Triton path, traced on CPU: dynamo only traces user Triton kernels when it
# believes a GPU is there, so this script (run in its own process, compiled kernels, no
# interpreter) tells it so, runs the model on meta tensors, and replaces the kernel launches by
# no-ops. It leans on torch internals (torch 2.13); where they moved, the test skips, and the GPU
# test below is the real check. It caught three bugs no CPU test could: a saved view of an input
# (dynamo refuses it), a global counter bumped inside the autograd Functions, and a look inside
# the autotuner (each a graph break at every kernel).
COMPILE_TRACE_SCRIPT = """
import sys
import torch, torch.utils._triton
torch.utils._triton.has_triton = lambda: True    # "a GPU is there": trace Triton kernels
try:
    import torch._higher_order_ops.triton_kernel_wrap as tkw
    key = torch._C.DispatchKey.CompositeExplicitAutograd
    tkw.triton_kernel_wrapper_mutation.py_kernels.pop(key)
    tkw.triton_kernel_wrapper_mutation._dispatch_cache.clear()
    from torch._dynamo.utils import counters
    from torch._dynamo.backends.common import aot_autograd
except (ImportError, AttributeError, KeyError) as e:
    print("torch internals moved:", repr(e))
    sys.exit(77)
tkw.triton_kernel_wrapper_mutation.py_impl(key)(lambda **kwargs: None)  # launch nothing on meta
launches = {}

def count_launches(name):   # an aot_eager that counts the Triton launches in each traced graph
    def compiler(gm, example_inputs):
        launches[name] = sum("triton_kernel_wrapper" in str(n.target) for n in gm.graph.nodes)
        return gm
    return compiler

import kernels
kernels.AUTOTUNE = sys.argv[1] == "autotune"
kernels._use_triton = lambda x: True
kernels._autocast = lambda *t: t                 # autocast has no meta device
kernels._num_sms = lambda device: 132            # no GPU to ask
from model import ModelConfig, Transformer
cfg = ModelConfig.llama(vocab_size=96, hidden_size=128, num_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=352, max_position_embeddings=128)
with torch.device("meta"):
    model = Transformer(cfg)
    idx = torch.zeros(2, 64, dtype=torch.long)
    doc_ids = torch.zeros(2, 64, dtype=torch.long)
backend = aot_autograd(fw_compiler=count_launches("forward"), bw_compiler=count_launches("backward"))
torch.compile(model, backend=backend)(idx, doc_ids, None, head=False).float().sum().backward()
assert model.model.layers[0].mlp.gate_proj.weight.grad is not None
print("graph breaks:", sum(counters["graph_break"].values()), dict(counters["graph_break"]))
print("graphs:", counters["stats"]["unique_graphs"])
print("kernel launches traced:", launches)
"""


@pytest.mark.parametrize("mode", ["autotune", "fixed"])
def test_torch_compile_traces_the_triton_path_in_one_graph(mode):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE_TRACE_SCRIPT, mode], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode == 77:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "graph breaks: 0 {}" in lines and "graphs: 1" in lines, out.stdout
    # 2 layers x (2 RMSNorms, attention, SwiGLU) + the final norm: 9 kernels forward; backward
    # 9 more, with attention's 3 (delta, dK/dV, dQ).
    assert lines[-1] == "kernel launches traced: {'forward': 9, 'backward': 13}", out.stdout


@pytest.mark.skipif(DEV == "cpu", reason="torch.compile traces Triton kernels only on a GPU")
def test_torch_compile_traces_the_kernels_without_graph_breaks():
    from torch._dynamo.utils import counters
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.llama(vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=88, max_position_embeddings=64)
    model = Transformer(cfg).to(DEV)
    idx = torch.randint(0, 64, (2, 33), device=DEV)
    doc_ids = torch.cat([torch.zeros(2, 20), torch.ones(2, 13)], 1).long().to(DEV)

    def loss_and_grads(m):
        loss = m(idx, doc_ids=doc_ids).float().square().mean()
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))]

    torch._dynamo.reset()
    counters.clear()
    with kernels.backend("triton"):
        eager = loss_and_grads(model)
        calls = dict(kernels.TRITON_CALLS)
        compiled = loss_and_grads(torch.compile(model))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert dict(kernels.TRITON_CALLS) == calls   # counting is skipped inside compiled graphs
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Decode, SwiGLU, RMSNorm.

@pytest.mark.parametrize("B,Hq,Hkv,S,D,end_as_int", [(3, 4, 2, 67, 32, False), (1, 4, 1, 129, 64, True),
                                                      (2, 4, 4, 17, 32, False), (2, 4, 1, 1, 32, True)])
def test_decode_attention_matches_reference(B, Hq, Hkv, S, D, end_as_int):
    check_decode(kernels, B, Hq, Hkv, S, D, end_as_int)


def test_decode_equals_last_row_of_causal_attention():
    # Generation consistency: decoding position T-1 against the cache of a prefill gives the same
    # vector as the last row of full causal attention.
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, 37, 32, generator=gen).to(DEV) for i in range(3))
    with kernels.backend("triton"):
        full = kernels.attention(q, k, v, causal=True)
        last = kernels.decode_attention(q[:, :, -1:], k, v, torch.zeros(2, dtype=torch.long, device=DEV), 37)
    torch.testing.assert_close(last, full[:, :, -1:], **FP32_TOL)


@pytest.mark.parametrize("lead,H,inter", [((3, 17), 48, 136), ((1, 1), 40, 72), ((2, 67), 96, 200)])
def test_swiglu_ffn_matches_reference(lead, H, inter):
    check_swiglu(kernels, lead, H, inter)


def test_swiglu_ffn_packed_equals_swiglu_ffn():
    """Gate and up stacked in one matrix (the decode step's layout): same output on both paths."""
    x = torch.randn(3, 5, 48, device=DEV)
    wg, wu, wd = torch.randn(40, 48, device=DEV), torch.randn(40, 48, device=DEV), torch.randn(48, 40, device=DEV)
    ref = kernels.swiglu_ffn_ref(x, wg, wu, wd)
    for name in ("torch", "triton"):
        with kernels.backend(name):
            torch.testing.assert_close(kernels.swiglu_ffn_packed(x, torch.cat([wg, wu]), wd), ref, rtol=1e-4, atol=1e-4)
    swapped = kernels.swiglu_ffn_packed(x, torch.cat([wu, wg]), wd)   # the halves' order matters
    assert (swapped - ref).abs().max() > 1e-2


def test_swiglu_ffn_saves_no_intermediate_activations():
    # Memory-lean backward: autograd keeps x and the weights, nothing of size tokens x intermediate
    # (the eager reference keeps gate, up, silu(gate) and h: 4 such tensors).
    x = torch.randn(2, 17, 48, device=DEV, requires_grad=True)
    ws = [torch.randn(*s, device=DEV, requires_grad=True) for s in ((136, 48), (136, 48), (48, 136))]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        with kernels.backend("triton"):
            kernels.swiglu_ffn(x, *ws)
        n_triton = len(saved)
        big_triton = [s for s in saved if 136 in s and s != (136, 48) and s != (48, 136)]
        kernels.swiglu_ffn_ref(x, *ws)
    big_ref = [s for s in saved[n_triton:] if 136 in s and s != (136, 48) and s != (48, 136)]
    assert big_triton == [], big_triton
    assert len(big_ref) >= 3    # the check would see activations if they were saved


@pytest.mark.parametrize("lead,N", [((3, 17), 48), ((1, 1), 40), ((2, 67), 200), ((5,), 1000)])
def test_rms_norm_matches_reference(lead, N):
    check_rms(kernels, lead, N)


def test_rms_norm_fp16_input_fp32_weight():
    # Same dtype promotion as the reference: fp16 activations times an fp32 weight give fp32.
    x = torch.randn(3, 17, 48, device=DEV).half()
    w = torch.rand(48, device=DEV) + 0.5
    with kernels.backend("triton"):
        y = kernels.rms_norm(x, w, 1e-6)
    ref = kernels.rms_norm_ref(x, w, 1e-6)
    assert y.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-3)


def test_autocast_mixed_dtypes_match_reference():
    # runtime.autocast trains 16-bit activations with fp32 weights: the public functions cast like
    # autocast does (q from RoPE may be fp32 while v is 16-bit), and fp32 parameters get fp32 grads.
    dt = torch.float16 if DEV == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 17, 48, generator=gen)
    ws = [torch.randn(*s, generator=gen) * 0.1 for s in ((72, 48), (72, 48), (48, 72))]
    q, k, v = torch.randn(1, 4, 17, 32, generator=gen), torch.randn(1, 2, 17, 32, generator=gen), \
        torch.randn(1, 2, 17, 32, generator=gen)
    results = {}
    for name in ("triton", "torch"):
        leaves = [t.to(DEV).requires_grad_() for t in (x, *ws, q, k, v)]
        with torch.autocast(DEV, dtype=dt), kernels.backend(name):
            y = kernels.swiglu_ffn(*leaves[:4])
            a = kernels.attention(leaves[4], leaves[5], leaves[6].to(dt))
        assert y.dtype == a.dtype == dt
        (y.float().square().sum() + a.float().square().sum()).backward()
        assert all(t.grad.dtype == torch.float32 for t in leaves)
        results[name] = [y, a] + [t.grad for t in leaves]
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# Planted bugs: each mutant of kernels.py must fail the same check the real kernels pass.

def _function_span(src, name):
    start = src.index(f"def {name}(")
    end = src.find("\n@triton.jit", start)
    end = src.find("\ndef ", start + 1) if end == -1 else min(end, src.find("\ndef ", start + 1))
    return start, end


MUTANTS = [  # (function, original text, planted bug, check that must catch it)
    ("_key_block_mask", "offs_n[None, :] <= offs_m[:, None]", "offs_n[None, :] < offs_m[:, None]",
     lambda m: check_attention(m, 1, 4, 2, 17, 32, True, None)),
    ("_attn_fwd_body", "hk = (h // GROUP)", "hk = (h % GROUP)",
     lambda m: check_attention(m, 1, 4, 2, 17, 32, True, None)),
    ("_attn_fwd_body", "full_hi = (T // BLOCK_N) * BLOCK_N", "full_hi = tl.cdiv(T, BLOCK_N) * BLOCK_N",
     lambda m: check_attention(m, 1, 4, 4, 17, 32, False, None)),
    ("_attn_bwd_dkdv_loop", "ds_t = p_t * (dp_t - delta[None, :])", "ds_t = p_t * dp_t",
     lambda m: check_attention(m, 1, 4, 4, 17, 32, True, None)),
    ("_attn_bwd_dkdv_body", "for g in range(GROUP):", "for g in range(1):",
     lambda m: check_attention(m, 1, 4, 2, 17, 32, True, None)),
    ("_key_block_mask", "run = tl.max(keep.to(tl.int32))", "run = tl.min(keep.to(tl.int32))",
     lambda m: check_attention(m, 1, 4, 4, 67, 32, True, "packed")),
    ("_decode_split_kernel", "ok = (offs_n >= start) & (offs_n < hi)", "ok = offs_n < hi",
     lambda m: check_decode(m, 3, 4, 2, 67, 32)),
    ("_decode_combine_kernel", "w = tl.exp2(m - tl.max(m, 0))", "w = tl.exp2(m - m)",
     lambda m: check_decode(m, 3, 4, 2, 67, 32)),
    ("_swiglu_body", "(1.0 + gate * (1.0 - sig))", "(1.0 + gate * sig)",
     lambda m: check_swiglu(m, (3, 17), 48, 136)),
    ("_rms_bwd_kernel", "(tl.sum(dyw * xhat, 1) / N)", "(tl.sum(dyw * xhat, 1) / BLOCK_N)",
     lambda m: check_rms(m, (3, 17), 48)),    # only wrong when the width is not a power of two
]


@pytest.mark.skipif(DEV != "cpu", reason="mutants are loaded through the interpreter")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # mutants may divide by zero: that is the point
@pytest.mark.parametrize("i", range(len(MUTANTS)), ids=[f"{m[0]}:{m[2]}" for m in MUTANTS])
def test_planted_bug_is_caught(tmp_path, i):
    func, old, new, check = MUTANTS[i]
    src = open(os.path.join(ROOT, "kernels.py")).read()
    start, end = _function_span(src, func)
    body = src[start:end]
    assert body.count(old) == 1, f"mutation anchor {old!r} not found once in {func}: update MUTANTS"
    path = tmp_path / f"kernels_mutant_{i}.py"
    path.write_text(src[:start] + body.replace(old, new) + src[end:])
    spec = importlib.util.spec_from_file_location(f"kernels_mutant_{i}", path)
    mutant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutant)
    with pytest.raises(AssertionError):
        check(mutant)


# ----------------------------------------------------------------------------------------------
# Dispatch, input checks, command line.

def test_cpu_default_is_the_reference_and_backend_forces_triton():
    if DEV != "cpu":
        pytest.skip("CPU dispatch")
    x = torch.randn(2, 5, 32)
    before = dict(kernels.TRITON_CALLS)
    q = torch.randn(1, 4, 5, 32)
    kernels.rms_norm(x, torch.ones(32), 1e-5)
    kernels.swiglu_ffn(x, torch.randn(40, 32), torch.randn(40, 32), torch.randn(32, 40))
    kernels.attention(q, q, q)
    kernels.decode_attention(q[:, :, :1], q, q, torch.zeros(1, dtype=torch.long), 5)
    with kernels.backend("torch"):
        kernels.rms_norm(x, torch.ones(32), 1e-5)
    assert dict(kernels.TRITON_CALLS) == before, "model/training tests would run the slow interpreter"
    with kernels.backend("triton"):
        kernels.rms_norm(x, torch.ones(32), 1e-5)
    assert kernels.TRITON_CALLS["rms_norm_fwd"] == before.get("rms_norm_fwd", 0) + 1
    with pytest.raises(ValueError, match="unknown backend"):
        with kernels.backend("cuda"):
            pass


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 4, 5, 32, device=DEV)
    with kernels.backend("triton"):
        with pytest.raises(ValueError, match="head dim"):
            kernels.attention(torch.randn(1, 4, 5, 48, device=DEV), *torch.randn(2, 1, 4, 5, 48, device=DEV))
        with pytest.raises(ValueError, match="multiple of kv heads"):
            kernels.attention(q, torch.randn(1, 3, 5, 32, device=DEV), torch.randn(1, 3, 5, 32, device=DEV))
        with pytest.raises(ValueError, match="doc_ids"):
            kernels.attention(q, q, q, doc_ids=torch.zeros(1, 4, dtype=torch.long, device=DEV))
        with pytest.raises(ValueError, match="weight"):
            kernels.rms_norm(torch.randn(2, 8, device=DEV), torch.ones(9, device=DEV), 1e-5)
        with pytest.raises(ValueError, match="w_gate"):
            kernels.swiglu_ffn(torch.randn(2, 8, device=DEV), torch.randn(4, 8, device=DEV),
                               torch.randn(4, 8, device=DEV), torch.randn(4, 8, device=DEV))
        if DEV == "cpu":
            with pytest.raises(TypeError, match="bfloat16"):
                kernels.rms_norm(torch.randn(2, 8).bfloat16(), torch.ones(8).bfloat16(), 1e-5)


def test_command_line():
    parse = lambda *a: parse_config(bench_kernels.BenchConfig, bench_kernels.cli_args(list(a)))
    with pytest.raises(ConfigError, match="unknown key 'sequence'.*valid keys: .*bench"):
        parse("--sequence=4")
    with pytest.raises(ConfigError, match="nothing to do"):
        parse()
    with pytest.raises(ConfigError, match="tokens='lots' is not a valid int"):
        parse("--bench", "--tokens=lots")
    with pytest.raises(ConfigError, match="--seqlens='1,x'"):
        parse("--bench", "--seqlens=1,x")
    assert parse("--bench").bench and parse("--compile_check=True").compile_check
    if DEV == "cpu":
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            bench_kernels.main(parse("--bench"))


@pytest.mark.skipif(DEV == "cuda", reason="with a GPU, run the real thing: python tools/bench_kernels.py --bench")
def test_bench_dry_run_on_cpu(monkeypatch, capsys):
    # `python tools/bench_kernels.py --bench` only runs on a GPU, where a session has minutes, not hours: run the
    # whole function here on tiny shapes, with the CUDA timers and memory counters stubbed, so a typo
    # or a wrong table cannot waste that time.
    import triton.testing

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        assert return_mode == "median" and grad_to_none, "the table says median; grads must be reset"
        for p in grad_to_none:
            p.grad = None
        launches = sum(kernels.TRITON_CALLS.values())
        fn()
        if getattr(fn, "__name__", "") == "run_eager":      # the eager attention "runs out of memory"
            raise torch.OutOfMemoryError("fake")
        return 2.0 if sum(kernels.TRITON_CALLS.values()) > launches else 1.0   # Triton 2 ms, others 1

    for name, value in [("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 0),
                        ("max_memory_allocated", 3 * 2 ** 20), ("empty_cache", None), ("get_device_name", "CPU")]:
        monkeypatch.setattr(torch.cuda, name, lambda *a, v=value: v)
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    cfg = parse_config(bench_kernels.BenchConfig, ["--bench=True", "--seqlens=17,33", "--head_dims=32", "--tokens=34", "--model_dim=64",
                               "--hidden_sizes=48", "--batch=1", "--dtype=float32"])
    before = {n: kernels.TRITON_CALLS[n] for n in ("attention_bwd", "swiglu_bwd", "rms_norm_bwd")}
    bench_kernels.bench(cfg, device="cpu")
    out = capsys.readouterr().out
    assert all(kernels.TRITON_CALLS[n] > before[n] for n in before), "the Triton side must run the kernels"
    tables = [block.splitlines() for block in out.split("\n\n")[1:]]
    assert [t[0].split()[0] for t in tables] == ["attention", "swiglu_ffn", "rms_norm"], out
    for t, columns in zip(tables, (12, 9, 9)):
        rows = [r.split() for r in t[2:]]
        assert [r[0] for r in rows] == ["17", "33"] and {len(r) for r in rows} == {columns}, out  # a row per T
    attn = [r.split() for r in tables[0][2:]]
    assert attn[0][:4] == ["17", "32", "2", "2"] and attn[1][:4] == ["33", "32", "1", "2"], out  # B = tokens // T
    assert attn[0][4:7] == ["2.00", "1.00", "OOM"] and attn[0][7:9] == ["2.00", "OOM"], out
    assert attn[0][9:] == ["3", "3", "OOM"], out
    for t in tables[1:]:   # time and memory columns of the FFN / RMSNorm tables
        assert [r.split()[3:] for r in t[2:]] == [["2.00", "1.00", "2.00", "3", "3", "1.00"]] * 2, out


def test_kernels_compile_for_h100():
    # No GPU needed: ptxas builds each kernel for sm_90; a typo in a compiled-only code path (the
    # interpreter is lenient about types) or a tile too big for shared memory shows up here.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_kernels.py"), "--compile_check"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if "regs" in line and "spilled" in line]
    names = {parts[0] for parts in lines}
    assert names == {spec[0] for spec in bench_kernels._compile_specs()}, out.stdout
    for parts in lines:
        shared = int(parts[6])
        assert 0 <= shared <= 227 * 1024, parts   # H100/H200: at most 227 KiB per block


# ----------------------------------------------------------------------------------------------
# model.py on the Triton kernels: a short training run matches the reference run step by step.

def test_model_training_matches_reference_step_by_step():
    import copy
    import torch.nn.functional as F
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.llama(vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=88, max_position_embeddings=64)
    reference = Transformer(cfg).to(DEV)
    fast = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 34), generator=gen).to(DEV)] * 4   # memorise one batch
    doc_ids = torch.cat([torch.zeros(2, 20), torch.ones(2, 13)], 1).long().to(DEV)  # two packed docs

    def train(model, name):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        with kernels.backend(name):
            for idx in batches:
                logits = model(idx[:, :-1], doc_ids=doc_ids)
                loss = F.cross_entropy(logits.reshape(-1, 64), idx[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

    before = dict(kernels.TRITON_CALLS)
    ref_losses = train(reference, "torch")
    assert dict(kernels.TRITON_CALLS) == before
    fast_losses = train(fast, "triton")
    # 4 steps x 2 layers: attention, SwiGLU and 2 RMSNorms per layer, plus the final norm.
    assert kernels.TRITON_CALLS["attention_bwd"] - before.get("attention_bwd", 0) == 8
    assert kernels.TRITON_CALLS["rms_norm_bwd"] - before.get("rms_norm_bwd", 0) == 20
    assert kernels.TRITON_CALLS["swiglu_bwd"] - before.get("swiglu_bwd", 0) == 8
    assert ref_losses[-1] < ref_losses[0] - 0.1            # it trains
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
    # Adam divides by sqrt(v): where a gradient is ~0, fp32 noise becomes a ~1e-5 step. A wrong
    # gradient moves weights by ~lr = 1e-2 per step.
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_model_generation_matches_reference():
    # Prefill (attention with pad/prompt documents) then decode_attention on a static KV cache,
    # with left-padded prompts of different lengths (kv_start > 0): greedy tokens must agree.
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.llama(vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=88, max_position_embeddings=64)
    model = Transformer(cfg).to(DEV)
    with torch.no_grad():   # sharper logits than the 0.02 init, so greedy picks are not near-ties
        for p in model.parameters():
            p.mul_(8.0)
    prompts = [[5, 9, 13, 2, 7, 1, 30], [3, 3], [40, 41, 42, 43]]
    decode0 = kernels.TRITON_CALLS["decode_attention"]
    with kernels.backend("triton"):
        fast = model.generate(prompts, max_new_tokens=6, temperature=0)
    assert kernels.TRITON_CALLS["decode_attention"] > decode0
    with kernels.backend("torch"):
        ref = model.generate(prompts, max_new_tokens=6, temperature=0)
    assert fast == ref
    assert len({tuple(r) for r in ref}) > 1      # not a degenerate all-same output


def test_auto_falls_back_to_reference_for_head_dims_the_kernel_does_not_take(monkeypatch):
    """A tiny model (head dim 8) still runs on a GPU: "auto" uses the reference, with a warning."""
    monkeypatch.setattr(kernels, "CPU_BACKEND", "triton")  # what "auto" does for CUDA tensors
    monkeypatch.setattr(kernels, "_WARNED_HEAD_DIMS", set())
    q, k, v = torch.randn(3, 1, 4, 7, 8, device=DEV).unbind(0)
    before = sum(kernels.TRITON_CALLS.values())
    with pytest.warns(UserWarning, match="head dim 8"):
        out = kernels.attention(q, k, v)
    assert torch.allclose(out, kernels.attention_ref(q, k, v))
    assert sum(kernels.TRITON_CALLS.values()) == before
