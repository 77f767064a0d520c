"""
sample.py: talk to a checkpoint with the Llama-Nemotron reasoning toggle (paper sec. 4).

The system prompt is exactly `detailed thinking on` or `detailed thinking off`; the user's text
goes in the user turn. The paper decodes reasoning-on with temperature 0.6 / top-p 0.95 and
reasoning-off greedily: those are the defaults here when --temperature / --top_p are not given.

    python sample.py --ckpt=out/sft --prompt="3+5+2=" --reasoning=on
    python sample.py --ckpt=PATH --prompt="..." --reasoning=off --temperature=0 --max_new_tokens=64
    python sample.py --ckpt=out/parent --chat=False --prompt="3+5 is"    # a base model: plain text

Reads: a checkpoint folder (native, Hugging Face Llama or DeciLM; config.json + safetensors) with
its tokenizer (`tokenizer.model` at the root or under `original/`). Prints only the assistant's
response text to stdout; everything else goes to stderr.
"""
import sys
import time
from dataclasses import dataclass

import torch

from data import load_tokenizer
from model import load_model
from runtime import ConfigError, pick_device, run_main


@dataclass
class SampleConfig:
    ckpt: str = "out/parent"           # checkpoint folder (any format model.py reads)
    prompt: str = "Hello"              # the user turn
    reasoning: str = "on"              # on | off: the system prompt toggle
    chat: bool = True                  # False: continue --prompt as plain text (a base model)
    temperature: float | None = None   # default: 0.6 when reasoning is on, 0 (greedy) when off
    top_p: float | None = None         # default: 0.95 when reasoning is on, 1.0 when off
    top_k: int | None = None
    max_new_tokens: int = 256
    num_samples: int = 1               # independent samples of the same prompt (one batch)
    seed: int = 1337
    device: str = "auto"               # auto | cpu | cuda
    dtype: str = "auto"                # auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16 | float16


def main(cfg):
    if cfg.reasoning not in ("on", "off"):
        sys.exit(f"error: --reasoning must be on or off, got {cfg.reasoning!r}")
    on = cfg.reasoning == "on"
    temperature = cfg.temperature if cfg.temperature is not None else (0.6 if on else 0.0)
    top_p = cfg.top_p if cfg.top_p is not None else (0.95 if on else 1.0)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in ("auto", *dtypes):
        sys.exit(f"error: --dtype must be one of auto, {', '.join(dtypes)}, got {cfg.dtype!r}")
    try:
        device = pick_device(cfg.device)
        # bf16 on a GPU, as the released models run; the CPU has no fast bf16 matmul (and the
        # Triton interpreter none at all), so fp32 there.
        dtype = dtypes.get(cfg.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
        tok = load_tokenizer(cfg.ckpt)
        model = load_model(cfg.ckpt, device=device, dtype=dtype).eval()
    except (ValueError, FileNotFoundError, ConfigError) as e:
        sys.exit(f"error: {e}")
    if tok.n_vocab > model.config.vocab_size:
        sys.exit(f"error: the tokenizer in {cfg.ckpt} has {tok.n_vocab} tokens but the model's "
                 f"vocabulary is {model.config.vocab_size}")
    if cfg.chat:
        ids, _ = tok.render_chat([{"role": "user", "content": cfg.prompt}], reasoning=cfg.reasoning,
                                 add_generation_prompt=True)
    else:
        ids = [tok.bos_id] + tok.encode(cfg.prompt)
    t0 = time.time()
    try:
        outs = model.generate([ids] * cfg.num_samples, cfg.max_new_tokens, temperature=temperature,
                              top_k=cfg.top_k, top_p=top_p, stop_ids=tok.stop_ids, seed=cfg.seed,
                              pad_id=tok.pad_id, vocab_limit=tok.n_vocab)
    except ValueError as e:
        sys.exit(f"error: {e}")
    dt = time.time() - t0
    n_tokens = sum(len(o) for o in outs)
    print(f"[{len(ids)} prompt tokens, {n_tokens} generated in {dt:.2f}s, "
          f"{n_tokens / max(dt, 1e-9):.0f} tok/s, temperature={temperature}, top_p={top_p}]",
          file=sys.stderr)
    for i, out in enumerate(outs):
        stopped = bool(out) and out[-1] in tok.stop_ids
        text = tok.decode(out[:-1] if stopped else out)
        if not stopped:
            print(f"[sample {i}: stopped at max_new_tokens={cfg.max_new_tokens}, no end token]", file=sys.stderr)
        if cfg.num_samples > 1:
            print(f"--- sample {i} ---", file=sys.stderr)
        sys.stdout.write(text + ("\n" if cfg.num_samples > 1 else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main, SampleConfig)
