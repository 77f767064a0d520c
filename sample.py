"""
sample.py: talk to a checkpoint, evaluate it, and time it: the recipe's yardsticks (paper sec. 4-5
report every model with reasoning on and off; sec. 2 its throughput).

The system prompt is exactly `detailed thinking on` or `detailed thinking off`; the user's text
goes in the user turn. The paper decodes reasoning-on with temperature 0.6 / top-p 0.95 and
reasoning-off greedily: those are the defaults for a single prompt when --temperature / --top_p
are not given. Evaluation is greedy unless --temperature is given.

    python sample.py --ckpt=out/sft --prompt="Add mod 10: y3+z5+a2+b." --reasoning=on
    python sample.py --ckpt=out/sft --eval=True --reasoning=on --n=500 --seed=1  # held-out accuracy
    python sample.py --ckpt=out/sft --eval=True --problems=my_problems.jsonl      # {"prompt", "answer"} rows
    python sample.py --ckpt=out/child --bench=True --batch_size=32              # prefill / decode tokens/s
    python sample.py --ckpt=out/parent --bench=True --bench_compare=True         # eager vs compiled decode
    python sample.py --ckpt=out/child --bench=True --baseline=out/parent          # two models, interleaved
    python sample.py --ckpt=out/sft --prompts=questions.txt --reasoning=off      # batched, one row per line
    python sample.py --ckpt=out/sft --chat_repl=True                             # interactive, streaming
    python sample.py --ckpt=out/parent --chat=False --prompt="3+5 is"            # plain continuation

Reads: a checkpoint folder (native, Hugging Face Llama or DeciLM; config.json + safetensors) with
its tokenizer (`tokenizer.model` at the root or under `original/`); for --eval the held-out test
split of data.py's task world (generated, so nothing else is needed) or --problems=FILE.
Writes: responses / metrics to stdout (everything else to stderr), and --out=FILE as JSON.
  --eval:  `accuracy: X`, `think_rate: Y` (fractions), then per task and per chain length on stderr
  --bench: `prefill_tokens_per_s: X`, `decode_tokens_per_s: Y`, `context: C` (medians of --repeats; with
    or without --baseline, a measurement whose repeats spread by more than --max_spread is taken
    again, up to --bench_retries times, and the calmest kept: JSON field spread_attempts;
    --bench_compare times once)
  --prompts=FILE: a .jsonl file ({"prompt", optional "reasoning"} rows) gives JSONL rows with a
    "response" field added; any other file holds one prompt per line and gives one line per
    prompt, the response as a JSON string (so a multi-line answer stays on one line).
"""
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from checkpoint import load_model
from configurator import (ConfigError, atomic_write, check, check_choice, check_positive, check_range,
                          check_readable, run_main)
from data import ADD_TASK, DataError, heldout_problems, load_rl_jsonl, load_tokenizer, split_reasoning
from evaluate import (bench_calmest, bench_compare, evaluate_problems, format_breakdown,
                      generate_responses)
from runtime import (check_decode_fits, check_heldout_size, check_vocab, pick_device)


@dataclass
class SampleConfig:
    ckpt: str = "out/parent"           # checkpoint folder (any format model.py reads)
    # one prompt (the default action)
    prompt: str = "Add mod 10: v3+w5+x2+y7+z."  # the user turn
    reasoning: str = "on"              # on | off: the system prompt toggle
    chat: bool = True                  # False: continue --prompt as plain text (a base model)
    temperature: float | None = None   # default: 0.6 when reasoning is on, 0 (greedy) when off; eval: 0
    top_p: float | None = None         # default: 0.95 when reasoning is on, 1.0 when off
    top_k: int | None = None
    max_new_tokens: int | None = None  # default: 256, --eval 128; at most what the context leaves
    num_samples: int = 1               # independent samples of the same prompt (one batch)
    seed: int = 1337
    device: str = "auto"               # auto | cpu | cuda
    dtype: str = "auto"                # auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16 | float16
    compile: bool = True               # the decode step as one torch.compile graph (False: eager)
    batch_size: int = 64               # rows per generate call (--eval, --prompts, --bench)
    # --prompts=FILE: batched answers
    prompts: str = ""
    # --eval: accuracy on held-out problems
    eval: bool = False
    n: int | None = None               # problems: default 500 from the split, or every row of --problems
    problems: str = ""                 # a JSONL of {"prompt", "answer"} rows instead of the split
    split: str = "test"                # test | val
    tasks: str = "all"                 # all | chat (the direct-answer tasks) | chains (addition chains):
                                       # the same problems as --n of all, filtered, so a run judged on one
                                       # kind skips the other (speedrun.sh: parent and child on chat,
                                       # SFT and GRPO on chains, ~40% of the eval time)
    # --bench: throughput
    bench: bool = False
    prompt_len: int = 32               # prompt tokens per row
    bench_tokens: int = 128            # new tokens per row
    repeats: int = 5                   # timed repeats (medians are reported)
    max_spread: float = 0.25           # a benchmark whose repeats differ by more than this (relative to the
    bench_retries: int = 2             # median) is taken again, up to this many times; the calmest is kept
    bench_compare: bool = False        # time eager and compiled decoding side by side, with the ratio
    baseline: str = ""                 # another checkpoint timed together with --ckpt (interleaved
                                       # repeats), e.g. the parent of a Puzzle child, with the ratio
    # interactive chat
    chat_repl: bool = False
    out: str = ""                      # also write the result (--eval / --bench) as JSON to this file

    def validate(self):
        check_choice(self, "reasoning", ("on", "off"))
        check_choice(self, "device", ("auto", "cpu", "cuda"))
        check_choice(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
        check_choice(self, "split", ("test", "val"))
        check_positive(self, "num_samples", "batch_size", "prompt_len", "bench_tokens", "repeats")
        check_range(self, "max_spread", 0)
        check_range(self, "bench_retries", 0)
        check_range(self, "bench_tokens", 2)
        for name in ("max_new_tokens", "n", "top_k"):
            if getattr(self, name) is not None:
                check_positive(self, name)
        if self.temperature is not None:
            check_range(self, "temperature", 0)
        if self.top_p is not None:
            check_range(self, "top_p", 0, 1, lo_open=True)
        modes = [m for m in ("eval", "bench", "chat_repl") if getattr(self, m)] + (["prompts"] if self.prompts else [])
        check(len(modes) <= 1, modes[-1] if modes else "eval", True,
              f"choose one of --eval, --bench, --prompts, --chat_repl (got {', '.join(modes)})")
        check(self.eval or not self.problems, "problems", self.problems, "needs --eval=True")
        check_choice(self, "tasks", ("all", "chat", "chains"))
        check(self.tasks == "all" or (self.eval and not self.problems), "tasks", self.tasks,
              "filters the held-out split of --eval=True (not a --problems file)")
        check(not self.bench_compare or self.bench, "bench_compare", True, "needs --bench=True")
        check(not self.baseline or (self.bench and not self.bench_compare), "baseline", self.baseline,
              "needs --bench=True (and not --bench_compare)")
        if self.baseline:
            check_readable(self.baseline, "baseline", "dir")
        check_readable(self.ckpt, "ckpt", "dir")
        for name in ("problems", "prompts"):
            if getattr(self, name):
                check_readable(getattr(self, name), name)
        if self.out:
            check(not os.path.isdir(self.out), "out", self.out, "is a folder; give a file name")
            out = os.path.realpath(self.out)
            for name in ("ckpt", "baseline", "problems", "prompts"):   # a result never lands in an input
                inp = getattr(self, name)
                if inp and (out == os.path.realpath(inp) or out.startswith(os.path.realpath(inp) + os.sep)):
                    raise ConfigError(f"--out={self.out}: is or lies inside --{name}={inp}; the result would "
                                      f"overwrite an input (choose another --out)")
        if self.eval and not self.problems:
            check_heldout_size("n", self.n, self.split)
        if self.bench:
            from checkpoint import load_config
            mcfg = load_config(self.ckpt)
            context = self.prompt_len + self.bench_tokens
            check_decode_fits("batch_size", self.batch_size, mcfg, context, pick_device(self.device))


def load(cfg):
    """The checkpoint and its tokenizer, on the chosen device and dtype."""
    device = pick_device(cfg.device)
    # bf16 on a GPU, as the released models run; the CPU has no fast bf16 matmul (and the Triton
    # interpreter none at all), so fp32 there.
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes.get(cfg.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
    model = load_model(cfg.ckpt, device=device, dtype=dtype).eval()
    try:
        tok = load_tokenizer(cfg.ckpt)
    except FileNotFoundError:
        raise ConfigError(f"--ckpt={cfg.ckpt}: the checkpoint has no tokenizer (tokenizer.model at its root "
                          f"or under original/); copy the one it was trained with into it") from None
    check_vocab(tok, model.config, f"--ckpt={cfg.ckpt}")
    return model, tok, device


def new_tokens(cfg, model, prompt_len, default):
    """--max_new_tokens (or the default), at most what the model's context leaves after the prompt."""
    room = model.config.max_position_embeddings - prompt_len + 1
    if room < 1:
        raise ConfigError(f"a prompt of {prompt_len} tokens does not fit the model's context of "
                          f"{model.config.max_position_embeddings}")
    want = cfg.max_new_tokens or default
    if want > room:
        print(f"[max_new_tokens {want} -> {room}: the model's context is {model.config.max_position_embeddings}]",
              file=sys.stderr)
    return min(want, room)


def write_out(cfg, result):
    if cfg.out:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        atomic_write(cfg.out, json.dumps({"config": asdict(cfg), **result}, indent=1))


def run_eval(cfg, model, tok):
    if cfg.problems:
        problems = load_rl_jsonl(cfg.problems)
        if not problems:
            raise DataError(f"{cfg.problems}: no problems in the file")
        if cfg.n is not None:
            if cfg.n > len(problems):
                raise ConfigError(f"--n={cfg.n}: {cfg.problems} holds only {len(problems)} problems")
            problems = problems[:cfg.n]
        source = cfg.problems
    else:
        try:
            problems = heldout_problems(cfg.split, cfg.n or 500, cfg.seed)
        except ValueError as e:
            raise ConfigError(f"--n={cfg.n}: {e}") from None
        source = f"the {cfg.split} split (seed {cfg.seed})"
        if cfg.tasks != "all":
            problems = [p for p in problems if (p["task"] == ADD_TASK) == (cfg.tasks == "chains")]
            source += f", its {cfg.tasks} only"
    longest = max(len(tok.render_prompt(p["prompt"], cfg.reasoning)) for p in problems)
    n_new = new_tokens(cfg, model, longest, 128)
    print(f"[eval] {len(problems)} problems from {source}, reasoning {cfg.reasoning}, "
          f"temperature {cfg.temperature or 0}, max_new_tokens {n_new}", file=sys.stderr)
    with tqdm(total=len(problems), desc="eval", unit="problem", file=sys.stderr, leave=False) as bar:
        res = evaluate_problems(model, tok, problems, cfg.reasoning, n_new, cfg.batch_size,
                                temperature=cfg.temperature or 0.0, top_p=cfg.top_p, seed=cfg.seed,
                                compile=cfg.compile, progress=bar)
    print(f"accuracy: {res['accuracy']:.4f}")
    print(f"think_rate: {res['think_rate']:.4f}")
    print(f"{format_breakdown(res)}\n{res['truncated']} of {res['n']} responses reached max_new_tokens "
          f"without an end token", file=sys.stderr)
    write_out(cfg, {k: v for k, v in res.items()})


def run_bench(cfg, model):
    if cfg.prompt_len + cfg.bench_tokens - 1 > model.config.max_position_embeddings:
        raise ConfigError(f"--prompt_len={cfg.prompt_len} + --bench_tokens={cfg.bench_tokens} exceeds the "
                          f"model's context of {model.config.max_position_embeddings}")
    if cfg.bench_compare:
        res = bench_compare(model, cfg.batch_size, cfg.prompt_len, cfg.bench_tokens, cfg.repeats)
        for path in ("eager", "compiled"):
            r = res[path]
            print(f"{path}_prefill_tokens_per_s: {r['prefill_tokens_per_s']:.1f}")
            print(f"{path}_decode_tokens_per_s: {r['decode_tokens_per_s']:.1f}")
        print(f"decode_speedup: {res['decode_speedup']:.2f}")
        print(f"same_tokens: {res['same_tokens']}")
        print(f"context: {res['context']}")
        print(f"[batch {cfg.batch_size}, {cfg.prompt_len}-token prompts, {cfg.bench_tokens} new tokens, "
              f"medians of {cfg.repeats} interleaved repeats; compile (one-time) {res['compiled']['compile_s']:.1f} s]",
              file=sys.stderr)
    elif cfg.baseline:
        # Two models timed in separate processes minutes apart on a shared machine differ by +-20%;
        # interleaved repeats in one process slow both alike when the load changes.
        base = load_model(cfg.baseline, device=next(model.parameters()).device,
                          dtype=next(model.parameters()).dtype).eval()
        both, _, attempts = bench_calmest({"model": model, "baseline": base}, cfg.batch_size, cfg.prompt_len,
                                          cfg.bench_tokens, cfg.compile, cfg.repeats, cfg.max_spread, cfg.bench_retries)
        res = {**both["model"], "baseline": both["baseline"], "spread_attempts": attempts,
               "decode_speedup": both["model"]["decode_tokens_per_s"] / both["baseline"]["decode_tokens_per_s"]}
        for name, r in (("", res), ("baseline_", res["baseline"])):
            print(f"{name}prefill_tokens_per_s: {r['prefill_tokens_per_s']:.1f}")
            print(f"{name}decode_tokens_per_s: {r['decode_tokens_per_s']:.1f}")
        print(f"decode_speedup: {res['decode_speedup']:.3f}")
        print(f"context: {res['context']}")
        print(f"[{res['path']} decode of {cfg.ckpt} and {cfg.baseline}, batch {cfg.batch_size}, {cfg.prompt_len}-token "
              f"prompts, {cfg.bench_tokens} new tokens, medians of {cfg.repeats} interleaved repeats]", file=sys.stderr)
    else:
        one, _, attempts = bench_calmest({"model": model}, cfg.batch_size, cfg.prompt_len, cfg.bench_tokens,
                                         cfg.compile, cfg.repeats, cfg.max_spread, cfg.bench_retries)
        res = {**one["model"], "spread_attempts": attempts}
        print(f"prefill_tokens_per_s: {res['prefill_tokens_per_s']:.1f}")
        print(f"decode_tokens_per_s: {res['decode_tokens_per_s']:.1f}")
        print(f"context: {res['context']}")
        print(f"[{res['path']} decode, batch {cfg.batch_size}, {cfg.prompt_len}-token prompts, {cfg.bench_tokens} "
              f"new tokens, medians of {cfg.repeats}; warm-up incl. compile {res['compile_s']:.1f} s]", file=sys.stderr)
    write_out(cfg, res)


def read_prompts(path):
    """--prompts: JSONL rows {"prompt", optional "reasoning"} or one prompt per line."""
    if path.endswith(".jsonl"):
        rows = []
        from data import _read_jsonl
        for lineno, row in _read_jsonl(path):
            if not isinstance(row.get("prompt"), str):
                raise DataError(f"{path}:{lineno}: field 'prompt' missing or not a string")
            if row.get("reasoning", "on") not in ("on", "off"):
                raise DataError(f"{path}:{lineno}: field 'reasoning' must be 'on' or 'off', got {row['reasoning']!r}")
            rows.append(row)
        return rows, True
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [{"prompt": line} for line in lines if line.strip()], False


def sampling_defaults(cfg, reasoning):
    on = reasoning == "on"
    temperature = cfg.temperature if cfg.temperature is not None else (0.6 if on else 0.0)
    top_p = cfg.top_p if cfg.top_p is not None else (0.95 if on else 1.0)
    return temperature, top_p


def run_prompts(cfg, model, tok):
    rows, is_jsonl = read_prompts(cfg.prompts)
    if not rows:
        raise DataError(f"{cfg.prompts}: no prompts in the file")
    for mode in ("on", "off"):  # one batch run per reasoning mode, answers put back in file order
        idx = [i for i, r in enumerate(rows) if r.get("reasoning", cfg.reasoning) == mode]
        if not idx:
            continue
        prompts = [tok.render_prompt(rows[i]["prompt"], mode) for i in idx]
        temperature, top_p = sampling_defaults(cfg, mode)
        texts, truncated = generate_responses(model, tok, prompts, new_tokens(cfg, model, max(map(len, prompts)), 256),
                                              cfg.batch_size, temperature, top_p, cfg.top_k, cfg.seed, cfg.compile)
        for i, t, cut in zip(idx, texts, truncated):
            rows[i]["response"], rows[i]["truncated"] = t, cut
    for r in rows:
        print(json.dumps({**r, "reasoning": r.get("reasoning", cfg.reasoning)}, ensure_ascii=False)
              if is_jsonl else json.dumps(r["response"], ensure_ascii=False))
    n_cut = sum(r["truncated"] for r in rows)
    if n_cut:
        print(f"[{n_cut} of {len(rows)} responses reached max_new_tokens without an end token]", file=sys.stderr)


def run_single(cfg, model, tok):
    temperature, top_p = sampling_defaults(cfg, cfg.reasoning)
    if cfg.chat:
        ids = tok.render_prompt(cfg.prompt, cfg.reasoning)
    else:
        ids = [tok.bos_id] + tok.encode(cfg.prompt)
    outs = model.generate([ids] * cfg.num_samples, new_tokens(cfg, model, len(ids), 256), temperature=temperature,
                          top_k=cfg.top_k, top_p=top_p, stop_ids=tok.stop_ids, seed=cfg.seed, pad_id=tok.pad_id,
                          vocab_limit=tok.n_vocab, compile=False)  # one call: compiling would cost more than it saves
    for i, out in enumerate(outs):
        text, stopped = tok.decode_response(out)
        if not stopped:
            print(f"[sample {i}: stopped at max_new_tokens, no end token]", file=sys.stderr)
        if cfg.num_samples > 1:
            print(f"--- sample {i} ---", file=sys.stderr)
        sys.stdout.write(text + ("\n" if cfg.num_samples > 1 else ""))
    sys.stdout.flush()


def run_chat_repl(cfg, model, tok):
    """Multi-turn chat with streaming output. Earlier turns keep only their answers (the template
    strips everything up to </think>). Commands: /think on, /think off, /reset, /quit."""
    mode, history = cfg.reasoning, []
    print(f"[chat with {cfg.ckpt}; reasoning {mode}. Commands: /think on|off, /reset, /quit]", file=sys.stderr)
    while True:
        try:
            line = input(f"you ({mode})> ")
        except EOFError:
            break
        cmd = line.strip()
        if cmd in ("/quit", "/exit"):
            break
        if cmd == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr)
            continue
        if cmd.startswith("/think"):
            arg = cmd.split()[1:] or [""]
            if arg[0] not in ("on", "off"):
                print("[usage: /think on | /think off]", file=sys.stderr)
            else:
                mode = arg[0]
                print(f"[reasoning {mode}]", file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        ids = tok.render_chat(history, reasoning=mode, add_generation_prompt=True)[0]
        room = model.config.max_position_embeddings - len(ids) + 1
        if room < 2:
            print("[the conversation fills the model's context; /reset to start over]", file=sys.stderr)
            history.pop()
            continue
        temperature, top_p = sampling_defaults(cfg, mode)
        out, printed = [], ""

        def stream(tok_tensor):
            nonlocal printed
            t = int(tok_tensor[0])
            if t in tok.stop_ids:
                return
            out.append(t)
            text = tok.decode(out)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
        model.generate([ids], min(cfg.max_new_tokens or 256, room), temperature=temperature, top_k=cfg.top_k,
                       top_p=top_p, stop_ids=tok.stop_ids, seed=cfg.seed + len(history), pad_id=tok.pad_id,
                       vocab_limit=tok.n_vocab, stream=stream)
        print()
        answer = tok.decode(out)
        history.append({"role": "assistant", "content": answer})
        if mode == "on" and split_reasoning(answer)[0] is None:
            print("[no think block in this answer]", file=sys.stderr)


def main(cfg):
    model, tok, _ = load(cfg)
    if cfg.eval:
        run_eval(cfg, model, tok)
    elif cfg.bench:
        run_bench(cfg, model)
    elif cfg.prompts:
        run_prompts(cfg, model, tok)
    elif cfg.chat_repl:
        run_chat_repl(cfg, model, tok)
    else:
        run_single(cfg, model, tok)


if __name__ == "__main__":
    run_main(main, SampleConfig)
