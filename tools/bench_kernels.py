"""
tools/bench_kernels.py: kernels.py's two GPU checks, outside the kernels' own file.

    python tools/bench_kernels.py --bench            (needs a CUDA GPU; prints the tables of the README)
    python tools/bench_kernels.py --bench --kernels=attention --seqlens=2048,4096 --head_dims=128
    python tools/bench_kernels.py --compile_check    (no GPU needed: builds every kernel for sm_90
                                                      with ptxas, prints registers, spills and shared memory)

--bench: forward + backward time (triton.testing.do_bench median) and peak memory of each kernel
against PyTorch's (SDPA-flash and eager attention, eager SwiGLU and RMSNorm), side by side in one
run, with the ratios. --compile_check: every kernel compiled to a cubin for sm_90 from one
representative configuration, so a typo in a compiled-only path or a tile too large for shared
memory shows up on a machine without a GPU. Flags and presets as every script (configurator.py).
Reads / writes: nothing on disk (Triton's cache in ~/.triton).
"""
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import ConfigError, check, check_choice, check_positive, run_main  # noqa: E402
from kernels import (INTERPRET, _attn_bwd_delta, _attn_bwd_dkdv_body, _attn_bwd_dq_body,  # noqa: E402
                     _attn_fwd_body, _decode_combine_kernel, _decode_split_kernel, _rms_bwd_kernel,
                     _rms_fwd_kernel, _swiglu_body, attention, backend, rms_norm, rms_norm_ref, swiglu_ffn,
                     swiglu_ffn_ref)


# ----------------------------------------------------------------------------------------------
# Compile check: build every kernel for an NVIDIA GPU without one (ptxas ships with triton).

def _compile_specs(D=128, dtype="bf16"):
    """(name, kernel, pointer dtypes, float args, constexprs, launch options) for one representative
    configuration of each kernel; every other argument is an int32."""
    c = dict(GROUP=4, HEAD_DIM=D, CAUSAL=True, PREC="tf32")
    f32 = "fp32"
    unit = dict(stride_xk=1, stride_wk=1, stride_hn=1)   # the JIT specialises strides equal to 1
    return [
        ("attention_fwd", _attn_fwd_body, dict(Q=dtype, K=dtype, V=dtype, O=dtype, LSE=f32, DOC="i32"),
         ["qk_scale"], dict(c, HAS_DOC=False, BLOCK_M=128, BLOCK_N=64), dict(num_warps=8, num_stages=3)),
        ("attention_fwd_doc", _attn_fwd_body, dict(Q=dtype, K=dtype, V=dtype, O=dtype, LSE=f32, DOC="i32"),
         ["qk_scale"], dict(c, HAS_DOC=True, BLOCK_M=128, BLOCK_N=64), dict(num_warps=8, num_stages=3)),
        ("attention_bwd_delta", _attn_bwd_delta, dict(O=dtype, DO=dtype, DELTA=f32), [],
         dict(HEAD_DIM=D, BLOCK_M=64), dict(num_warps=4)),
        ("attention_bwd_dkdv", _attn_bwd_dkdv_body,
         dict(Q=dtype, K=dtype, V=dtype, DO=dtype, LSE=f32, DELTA=f32, DOC="i32", DK=dtype, DV=dtype),
         ["sm_scale", "qk_scale"], dict(c, HAS_DOC=True, BLOCK_M=32, BLOCK_N=128), dict(num_warps=8, num_stages=3)),
        ("attention_bwd_dq", _attn_bwd_dq_body,
         dict(Q=dtype, K=dtype, V=dtype, DO=dtype, LSE=f32, DELTA=f32, DOC="i32", DQ=dtype),
         ["sm_scale", "qk_scale"], dict(c, HAS_DOC=False, BLOCK_M=128, BLOCK_N=32), dict(num_warps=8, num_stages=3)),
        ("decode_split", _decode_split_kernel,
         dict(Q=dtype, K=dtype, V=dtype, KV_START="i64", KV_END="i64", M_OUT=f32, L_OUT=f32, ACC_OUT=f32),
         ["qk_scale"], dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=D, NUM_SPLITS=8, PREC="tf32", BLOCK_N=64, SPLIT=256),
         dict(num_warps=4)),
        ("decode_combine", _decode_combine_kernel, dict(M_IN=f32, L_IN=f32, ACC_IN=f32, O=dtype), [],
         dict(HEAD_DIM=D, SPLITS_PAD=8), dict(num_warps=4)),
        ("swiglu_fwd", _swiglu_body, {n: dtype for n in ("X", "WG", "WU", "H", "DH", "DG", "DU")}, [],
         dict(unit, BACKWARD=False, PREC="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
         dict(num_warps=8, num_stages=3)),
        ("swiglu_bwd", _swiglu_body, {n: dtype for n in ("X", "WG", "WU", "H", "DH", "DG", "DU")}, [],
         dict(unit, BACKWARD=True, PREC="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
         dict(num_warps=8, num_stages=3)),
        ("rms_norm_fwd", _rms_fwd_kernel, dict(X=dtype, W=dtype, Y=dtype, RSTD=f32), ["eps"],
         dict(ROWS=1, BLOCK_N=4096), dict(num_warps=4)),
        ("rms_norm_bwd", _rms_bwd_kernel, dict(X=dtype, W=dtype, DY=dtype, RSTD=f32, DX=dtype, DW_PART=f32), [],
         dict(ROWS=1, BLOCK_N=4096), dict(num_warps=4)),
    ]


def compile_check(arch=90, only=None):
    """Compile each kernel to a cubin for sm_`arch`; returns [(name, registers, spill bytes,
    shared memory bytes)]. Proves the kernels build for a GPU even where none is present."""
    import re
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if INTERPRET:
        raise RuntimeError("compile_check needs the compiled kernels: run without TRITON_INTERPRET=1")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results = []
    for name, fn, ptrs, floats, consts, options in _compile_specs():   # fn: the plain @triton.jit
        if only is not None and name not in only:
            continue
        sig, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            sig[arg] = ("constexpr" if arg in consts else "*" + ptrs[arg] if arg in ptrs
                        else "fp32" if arg in floats else "i32")
            if arg in ptrs or (arg.startswith("stride") and arg not in consts):
                # as the JIT does for 16-aligned pointers / strides (contiguous, head dim 64/128)
                attrs[(i,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        regs = spill = -1
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", out)
        if m:  # register spills land in the stack frame / local memory
            regs, spill = int(m.group(1)), max(int(m.group(2)), int(m.group(3)))
        results.append((name, regs, spill, compiled.metadata.shared))
    return results


# ----------------------------------------------------------------------------------------------
# Benchmark: python tools/bench_kernels.py --bench  (forward + backward time and peak memory, on a GPU).

@dataclass
class BenchConfig:
    bench: bool = False             # run the GPU benchmark
    compile_check: bool = False     # compile every kernel for sm_90 (no GPU needed) and report
    kernels: str = "attention,swiglu_ffn,rms_norm"
    seqlens: str = "512,1024,2048,4096,8192"
    head_dims: str = "64,128"       # attention head dims
    tokens: int = 16384             # attention: batch = tokens // T, so every row does equal work
    model_dim: int = 2048           # attention: heads = model_dim // head_dim (FlashAttention-2's setup)
    batch: int = 4                  # FFN / RMSNorm: x is (batch, T, hidden)
    hidden_sizes: str = "2048,4096" # FFN / RMSNorm widths; FFN intermediate = Llama's 8/3 * hidden, /256
    dtype: str = "bfloat16"


    def validate(self):
        check(self.bench or self.compile_check, "bench", self.bench,
              "nothing to do; pass --bench (GPU) or --compile_check (no GPU needed)")
        unknown = sorted(set(self.kernels.split(",")) - {"attention", "swiglu_ffn", "rms_norm"})
        check(not unknown, "kernels", self.kernels, f"unknown {unknown}; valid: attention, swiglu_ffn, rms_norm")
        check_choice(self, "dtype", ("bfloat16", "float16", "float32"))
        check_positive(self, "tokens", "model_dim", "batch")
        for flag in ("seqlens", "head_dims", "hidden_sizes"):
            _ints(getattr(self, flag), flag)


def _ints(s, flag):
    try:
        vals = [int(v) for v in s.split(",")]
    except ValueError:
        raise ConfigError(f"--{flag}={s!r}: not a comma-separated list of integers") from None
    if not all(v >= 1 for v in vals):
        raise ConfigError(f"--{flag}={s!r}: every value must be >= 1")
    return vals


def _measure(step, params):
    """(ms, peak MiB above what was allocated before) for one forward+backward `step`; 'OOM' if it
    does not fit."""
    try:
        step()                                   # warm-up: autotuning, cuBLAS heuristics
        for p in params:
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        ms = triton.testing.do_bench(step, grad_to_none=params, warmup=25, rep=100, return_mode="median")
        return ms, peak
    except torch.OutOfMemoryError:
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()
        return float("nan"), float("nan")


def _eager_attention(q, k, v):
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


class _Table:
    """Prints a table a row at a time (flushed), so a benchmark cut short still shows its rows."""

    def __init__(self, title, header):
        self.widths = [max(len(h), 9) for h in header]
        print(f"\n{title}")
        self.row(header)

    def row(self, cells):
        print("  ".join(str(c).rjust(w) for c, w in zip(cells, self.widths)), flush=True)


def _fmt(x, spec=".2f"):
    return "OOM" if x != x else format(x, spec)


def bench(cfg, device="cuda"):
    """Print the benchmark tables. `device` is "cuda" except in the test that dry-runs this function
    on CPU (interpreted kernels, CUDA timers stubbed) so a GPU session never finds a typo here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dtype = getattr(torch, cfg.dtype)
    dev = torch.device(device)
    names = cfg.kernels.split(",")
    print(f"tools/bench_kernels.py --bench on {torch.cuda.get_device_name(dev)}, {cfg.dtype}, forward+backward, "
          f"time in ms (triton.testing.do_bench median), peak = MiB allocated above the inputs")
    if "attention" in names:
        table = _Table("attention (causal, Hq = Hkv), fwd+bwd; target: triton/flash <= 1.25 at T >= 2048",
                       ["T", "D", "B", "H", "triton ms", "flash ms", "eager ms", "tri/flash", "tri/eager",
                        "triton MiB", "flash MiB", "eager MiB"])
        for D in _ints(cfg.head_dims, "head_dims"):
            for T in _ints(cfg.seqlens, "seqlens"):
                B, H = max(1, cfg.tokens // T), max(1, cfg.model_dim // D)
                q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
                do = torch.randn(B, H, T, D, device=dev, dtype=dtype)

                def run_triton():
                    with backend("triton"):
                        attention(q, k, v, causal=True).backward(do)

                def run_flash():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

                def run_eager():
                    _eager_attention(q, k, v).backward(do)

                res = [_measure(fn, [q, k, v]) for fn in (run_triton, run_flash, run_eager)]
                (t_tr, m_tr), (t_fl, m_fl), (t_ea, m_ea) = res
                table.row([T, D, B, H, _fmt(t_tr), _fmt(t_fl), _fmt(t_ea), _fmt(t_tr / t_fl),
                           _fmt(t_tr / t_ea), _fmt(m_tr, ".0f"), _fmt(m_fl, ".0f"), _fmt(m_ea, ".0f")])
                del q, k, v, do
    for name in ("swiglu_ffn", "rms_norm"):
        if name not in names:
            continue
        table = _Table(f"{name} (x = {cfg.batch} x T x hidden), fwd+bwd; target: faster than eager, less memory",
                       ["T", "hidden", "inter", "triton ms", "eager ms", "tri/eager", "triton MiB", "eager MiB",
                        "mem ratio"])
        for Hd in _ints(cfg.hidden_sizes, "hidden_sizes"):
            inter = 256 * ((8 * Hd // 3 + 255) // 256)
            for T in _ints(cfg.seqlens, "seqlens"):
                x = torch.randn(cfg.batch, T, Hd, device=dev, dtype=dtype, requires_grad=True)
                dy = torch.randn(cfg.batch, T, Hd, device=dev, dtype=dtype)
                if name == "swiglu_ffn":
                    ws = [(torch.randn(*s, device=dev, dtype=dtype) * s[1] ** -0.5).requires_grad_()
                          for s in ((inter, Hd), (inter, Hd), (Hd, inter))]
                    fast = lambda: swiglu_ffn(x, *ws).backward(dy)
                    eager = lambda: swiglu_ffn_ref(x, *ws).backward(dy)
                else:
                    ws = [torch.ones(Hd, device=dev, dtype=dtype, requires_grad=True)]
                    fast = lambda: rms_norm(x, ws[0], 1e-5).backward(dy)
                    eager = lambda: rms_norm_ref(x, ws[0], 1e-5).backward(dy)
                with backend("triton"):
                    t_tr, m_tr = _measure(fast, [x, *ws])
                t_ea, m_ea = _measure(eager, [x, *ws])
                table.row([T, Hd, inter if name == "swiglu_ffn" else "-", _fmt(t_tr), _fmt(t_ea),
                           _fmt(t_tr / t_ea), _fmt(m_tr, ".0f"), _fmt(m_ea, ".0f"), _fmt(m_tr / m_ea)])
                del x, dy, ws


def main(cfg):
    if cfg.compile_check:
        t0 = time.time()
        print("compiled for sm_90 (H100/H200):  kernel, registers/thread, spill bytes, shared memory bytes")
        for name, regs, spill, shared in compile_check():
            print(f"  {name:22s} {regs:4d} regs  {spill:5d} B spilled  {shared:7d} B shared")
        print(f"all kernels compiled in {time.time() - t0:.1f} s")
    if cfg.bench:
        if not torch.cuda.is_available():
            raise ConfigError("--bench needs a CUDA GPU (none found); on CPU, run the kernel "
                              "tests instead: python -m pytest -q tests/test_kernels.py")
        if INTERPRET:
            raise ConfigError("--bench: unset TRITON_INTERPRET (the interpreter only measures numpy)")
        bench(cfg)


def cli_args(argv):
    """The bare switches of the README (`--bench`, `--compile_check`) stand for `--bench=True`;
    everything else is configurator's syntax: preset files, --key=value."""
    return [a + "=True" if a in ("--bench", "--compile_check") else a for a in argv]


if __name__ == "__main__":
    run_main(main, BenchConfig, cli_args(sys.argv[1:]))
