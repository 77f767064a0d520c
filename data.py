"""
data.py: the data layer of the Llama-Nemotron recipe (arXiv 2505.00949).

    tokenizer    Llama 3's tiktoken BPE (`tokenizer.model`, 128,000 ranks + 256 special tokens), or a
                 small byte-level BPE trained here for the offline default world, in the same format.
    chat         the Llama-Nemotron chat template with the reasoning toggle (the paper's SFT:
                 system prompt `detailed thinking on|off`, `<think>...</think>` before the answer in
                 "on" mode), rendered to (ids, loss mask) in one function.
    tasks        verifiable tasks with graded difficulty: chains of k single-digit additions mod 10
                 (reasoning helps: see ../shared/notes/design.md), plus short chat-style tasks for
                 "off" mode; a programmatic verifier stands in for the RL stage's LLM judge.
                 Splits are fixed by hashing each problem's text, so no problem is in two splits.
    files        pretraining token shards (uint16/uint32), SFT JSONL in the
                 Llama-Nemotron-Post-Training-Dataset schema, RL prompt JSONL.

Run:   python data.py [--key=value ...]        (python data.py --help lists the keys)
Reads: nothing (the default world is generated).
Writes out/data/: tokenizer.model + tokenizer_meta.json, pretrain_train/ and pretrain_val/ (token
       shards + index.json), sft_train.jsonl, sft_val.jsonl, rl_train.jsonl, val_problems.jsonl,
       test_problems.jsonl, data_meta.json.  About 3 s on 2 CPU cores (default sizes).
"""
import base64
import binascii
import functools
import hashlib
import itertools
import json
import math
import os
import random
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import regex
import tiktoken
from tqdm import tqdm

from configurator import (ConfigError, UserError, atomic_write, check, check_choice, check_positive, check_range,
                          check_readable, check_writable_dir, sniff_file)


class DataError(UserError):
    """Bad input data: the message names the file, line and field."""


# ----------------------------------------------------------------------------------------------
# Tokenizer (tiktoken)

# Llama 3's pre-tokenisation split pattern (Meta's llama3 tokenizer.py).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The default world's pre-tokenisation: Llama 3's pattern with two changes for a model this small.
# A word never absorbs the space before it (` fish` -> ` ` `fish`), so a word is the same token in a
# prompt and at the start of an answer line, and echoing it is copying a token: with Llama 3's
# pattern 26 of the 32 world words were one token after a space and 2-3 pieces at a line start.
# Numbers split into single digits (as Llama 1 and 2 do), so 417 is always 4 1 7, not one or two
# pieces whose boundaries vary with the merges.
NANO_PATTERN = r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# experimental: a word keeps the space after it ("milk ", "snow ", "frog"), so a copied span is the
# same token sequence as its source
NANO_TRAIL_PATTERN = r"\p{L}+ ?|\p{N}|[^\s\p{L}\p{N}]+ ?[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PATTERNS = {"nano": NANO_PATTERN, "nano_trail": NANO_TRAIL_PATTERN, "llama3": LLAMA3_PATTERN}

# The 256 special tokens of Llama 3.1 / 3.3 (the parents of LN-Nano/Super/Ultra), in id order: they
# are not in tokenizer.model and get ids n_ranks + i (128000 + i for the real file). Order as in
# Meta's llama-models tokenizer and HF's tokenizer_config.json; id 128005 is named
# <|reserved_special_token_2|> in HF's file (<|step_id|> in some Meta versions), and the reserved
# names run 3..247 from 128011 so that 11 + 245 = 256.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
assert len(LLAMA3_SPECIAL_TOKENS) == 256

# Tokens the template needs (an error if a tokenizer lacks them) and ones it uses when present.
REQUIRED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eot_id|>"]
SIDECAR = "tokenizer_meta.json"     # pattern + special tokens, written beside tokenizer.model

THINK_START = "<think>"
THINK_END = "</think>"


def _read_ranks(path):
    """Parse a tiktoken ranks file (`base64(token_bytes) rank` per line) with line-numbered errors.
    Same result as tiktoken.load.load_tiktoken_bpe, but it checks what tiktoken assumes: ranks
    0..n-1 without gaps or duplicates, and every single byte present (else some text could not be
    encoded at all)."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected 'base64_token rank', got {line[:80]!r}")
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (binascii.Error, ValueError) as e:
                raise DataError(f"{path}:{lineno}: bad token or rank {line[:80]!r}: {e}") from None
            if token in ranks:
                raise DataError(f"{path}:{lineno}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise DataError(f"{path}: no ranks in file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} (gaps or duplicates)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{path}: not byte-level: {len(missing)} single bytes have no rank "
                        f"(first: {missing[0]})")
    return ranks


class Tokenizer:
    """A tiktoken Encoding plus the Llama-Nemotron chat template.

    n_vocab = ranks + special tokens; bos_id, eot_id, pad_id (<|finetune_right_pad_id|>, or
    <|end_of_text|> when the tokenizer has no pad token), stop_ids (end_of_text, eom, eot: the three
    eos ids of the released Nemotron configs)."""

    def __init__(self, mergeable_ranks, special_tokens, pattern=LLAMA3_PATTERN, name="tokenizer"):
        for tok in REQUIRED_SPECIALS:
            if tok not in special_tokens:
                raise DataError(f"{name}: special token {tok} is missing")
        clash = [t for t, i in special_tokens.items() if i < len(mergeable_ranks)]
        if clash:
            raise DataError(f"{name}: special token {clash[0]} has an id inside the "
                            f"{len(mergeable_ranks)} ranks")
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.n_ranks = len(mergeable_ranks)
        self.n_vocab = self.enc.n_vocab
        sp = self.special_tokens
        self.bos_id = sp["<|begin_of_text|>"]
        self.eos_id = sp["<|end_of_text|>"]
        self.eot_id = sp["<|eot_id|>"]
        self.start_header_id = sp["<|start_header_id|>"]
        self.end_header_id = sp["<|end_header_id|>"]
        self.pad_id = sp.get("<|finetune_right_pad_id|>", self.eos_id)
        self.stop_ids = [i for i in (sp["<|end_of_text|>"], sp.get("<|eom_id|>"), self.eot_id)
                         if i is not None]
        self._headers = {}

    def __repr__(self):
        return f"Tokenizer(n_ranks={self.n_ranks}, n_vocab={self.n_vocab})"

    def encode(self, text):
        """Plain text -> ids. Special-token strings typed in the text stay ordinary text."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts, num_threads=2)

    def decode(self, ids):
        """ids -> str; special ids decode to their names, broken UTF-8 to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (n_vocab={self.n_vocab})")
        return self.enc.decode(ids, errors="replace")

    def decode_response(self, out):
        """A generated response's ids (ending in a stop id if it stopped) -> (text without the stop
        token, whether it stopped)."""
        stopped = bool(out) and out[-1] in self.stop_ids
        return self.decode(out[:-1] if stopped else out), stopped

    def _header(self, role):
        if role not in self._headers:
            self._headers[role] = ([self.start_header_id] + self.encode(role)
                                   + [self.end_header_id] + self.encode("\n\n"))
        return self._headers[role]

    def render_chat(self, messages, reasoning=None, add_generation_prompt=False):
        """The Llama-Nemotron template -> (ids, mask), two lists of ints of equal length.

        <|begin_of_text|>, then always a system turn: `detailed thinking on|off` when reasoning is
        given, else the conversation's own system message (first message), else empty; then each
        turn `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`.
        Assistant turns before the last message lose everything up to </think> (as the released
        template does); a final assistant turn keeps its reasoning (it is the training target).
        mask = 1 on assistant content tokens and their closing <|eot_id|>, 0 elsewhere.
        add_generation_prompt appends the empty assistant header (mask 0)."""
        if reasoning not in (None, "on", "off"):
            raise ValueError(f"reasoning must be 'on', 'off' or None, got {reasoning!r}")
        msgs = list(messages)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
        system, offset = None, 0
        if msgs and msgs[0]["role"] == "system":
            system, msgs, offset = msgs[0]["content"].strip(), msgs[1:], 1
        if reasoning is not None:
            want = f"detailed thinking {reasoning}"
            if system is not None and system != want:
                raise ValueError(f"reasoning={reasoning!r} conflicts with system message {system!r}")
            system = want
        ids, mask = [self.bos_id], [0]

        def add(toks, m):
            ids.extend(toks)
            mask.extend([m] * len(toks))
        add(self._header("system") + self.encode(system or "") + [self.eot_id], 0)
        for i, m in enumerate(msgs):
            role, content = m["role"], m["content"]
            if role not in ("user", "assistant"):
                raise ValueError(f"message {i + offset}: role must be user or assistant here "
                                 f"(system only first), got {role!r}")
            if role == "assistant" and i < len(msgs) - 1 and THINK_END in content:
                content = content.split(THINK_END)[-1]     # history keeps only the answer
            add(self._header(role), 0)
            add(self.encode(content.strip()) + [self.eot_id], int(role == "assistant"))
        if add_generation_prompt:
            if msgs and msgs[-1]["role"] == "assistant":
                raise ValueError("add_generation_prompt after an assistant turn")
            add(self._header("assistant"), 0)
        return ids, mask

    def render_prompt(self, prompt, reasoning):
        """A single user turn ready for generation: the common case for evaluation and RL."""
        return self.render_chat([{"role": "user", "content": prompt}], reasoning=reasoning,
                                add_generation_prompt=True)[0]

    def save(self, folder):
        """Write tokenizer.model (tiktoken format) + tokenizer_meta.json into folder."""
        os.makedirs(folder, exist_ok=True)
        write_ranks(self.mergeable_ranks, os.path.join(folder, "tokenizer.model"))
        meta = {"format": "tiktoken", "pattern": self.pattern, "n_ranks": self.n_ranks,
                "special_tokens": self.special_tokens}
        atomic_write(os.path.join(folder, SIDECAR), json.dumps(meta, indent=1))


def write_ranks(ranks, path):
    """A tiktoken ranks file (`base64(token) rank` per line), written atomically."""
    atomic_write(path, b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
                                for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])))


def _specials_from_hf_config(path, n_ranks):
    """added_tokens_decoder of a HF tokenizer_config.json -> {name: id} (ids >= n_ranks only)."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    added = cfg.get("added_tokens_decoder")
    if not isinstance(added, dict):
        raise DataError(f"{path}: field 'added_tokens_decoder' missing or not an object")
    specials = {}
    for k, v in added.items():
        if not isinstance(v, dict) or "content" not in v:
            raise DataError(f"{path}: added_tokens_decoder[{k!r}] has no field 'content'")
        if int(k) >= n_ranks:
            specials[v["content"]] = int(k)
    return specials


def tokenizer_file(folder):
    """The tokenizer.model of a checkpoint folder: at its root, or under original/ (the layout of
    Hugging Face Llama downloads); None if there is none."""
    for cand in ("tokenizer.model", os.path.join("original", "tokenizer.model")):
        if os.path.isfile(os.path.join(folder, cand)):
            return os.path.join(folder, cand)
    return None


def load_tokenizer(path):
    """path: a tiktoken ranks file, or a folder holding tokenizer.model (or original/tokenizer.model,
    the layout of HF Llama downloads). Pattern and special tokens come from tokenizer_meta.json beside
    the file, else a tokenizer_config.json (beside it or in the folder), else Llama 3's defaults:
    LLAMA3_PATTERN and the 256 Llama 3 special tokens at ids n_ranks + i."""
    if os.path.isdir(path):
        model_file = tokenizer_file(path)
        if model_file is None:
            raise FileNotFoundError(f"{path}: no tokenizer.model or original/tokenizer.model")
        folders = [os.path.dirname(model_file), path]
    elif os.path.isfile(path):
        model_file, folders = path, [os.path.dirname(path) or "."]
    else:
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
    kind = sniff_file(model_file)
    if kind != "a text file":
        raise DataError(f"{model_file}: is {kind}, not a tokenizer.model (tiktoken ranks: "
                        f"`base64_token rank` lines); give the tokenizer.model or the folder holding it")
    ranks = _read_ranks(model_file)
    pattern, specials = LLAMA3_PATTERN, None
    sidecar = os.path.join(os.path.dirname(model_file), SIDECAR)
    if os.path.isfile(sidecar):
        try:
            with open(sidecar) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{sidecar}:{e.lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{sidecar}: expected a JSON object, got {type(meta).__name__}")
        for key in ("pattern", "special_tokens"):
            if key not in meta:
                raise DataError(f"{sidecar}: missing field {key!r}")
        if not isinstance(meta["pattern"], str):
            raise DataError(f"{sidecar}: field 'pattern' must be a string (a regex), got {meta['pattern']!r}")
        try:
            import regex
            regex.compile(meta["pattern"])
        except ImportError:
            pass
        except regex.error as e:
            raise DataError(f"{sidecar}: field 'pattern' is not a valid regular expression ({e})") from None
        if not isinstance(meta["special_tokens"], dict):
            raise DataError(f"{sidecar}: field 'special_tokens' must be an object of token: id")
        bad = [(k, v) for k, v in meta["special_tokens"].items()
               if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise DataError(f"{sidecar}: field 'special_tokens': the id of {bad[0][0]!r} is {bad[0][1]!r}, "
                            f"not a non-negative integer")
        if "n_ranks" in meta and (not isinstance(meta["n_ranks"], int) or isinstance(meta["n_ranks"], bool)):
            raise DataError(f"{sidecar}: field 'n_ranks' must be an integer, got {meta['n_ranks']!r}")
        pattern, specials = meta["pattern"], dict(meta["special_tokens"])
        if meta.get("n_ranks", len(ranks)) != len(ranks):
            raise DataError(f"{sidecar}: n_ranks={meta['n_ranks']} but {model_file} has "
                            f"{len(ranks)} ranks")
    else:
        for folder in dict.fromkeys(folders):
            cfg = os.path.join(folder, "tokenizer_config.json")
            if os.path.isfile(cfg):
                specials = _specials_from_hf_config(cfg, len(ranks))
                break
    if specials is None:
        specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    try:
        return Tokenizer(ranks, specials, pattern, name=os.path.basename(model_file))
    except ValueError as e:   # tiktoken: a pattern its regex engine rejects, ids that collide
        raise DataError(f"{sidecar if os.path.isfile(sidecar) else model_file}: not a usable tokenizer "
                        f"({str(e).strip()[:200]})") from None


def train_tokenizer(text, vocab_size, out_path, pattern=LLAMA3_PATTERN, progress=True):
    """Train a byte-level BPE on text; save it to out_path (a folder that gets tokenizer.model +
    tokenizer_meta.json, or a path ending in .model with the sidecar beside it) and return the
    Tokenizer. vocab_size counts everything: 256 byte tokens,
    the merges, and the 256 Llama 3 special tokens (so ids of specials are n_ranks + i as for
    Llama 3). Classic BPE: split text with the pattern, count chunks, repeatedly merge the most
    frequent adjacent pair (ties: the smallest pair of ids, for determinism)."""
    n_ranks = vocab_size - len(LLAMA3_SPECIAL_TOKENS)
    if n_ranks < 256:
        raise DataError(f"vocab_size={vocab_size} < 512 (256 bytes + 256 special tokens)")
    chunk_counts = Counter(regex.findall(pattern, text))
    words = [list(c.encode("utf-8")) for c in chunk_counts]
    counts = list(chunk_counts.values())
    token_bytes = [bytes([b]) for b in range(256)]          # id -> bytes; id == rank
    ranks = {t: i for i, t in enumerate(token_bytes)}
    pair_counts, where = Counter(), defaultdict(set)
    for wi, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_counts[p] += counts[wi]
            where[p].add(wi)
    # delay: a run that fails at once (corpus too small) shows its error line alone
    bar = tqdm(total=n_ranks - 256, desc="bpe merges", disable=not progress, leave=False, delay=0.5)
    while len(ranks) < n_ranks:
        if not pair_counts:
            raise DataError(f"corpus too small: only {len(ranks)} tokens reachable, "
                            f"{n_ranks} ranks asked (vocab_size={vocab_size})")
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merged = token_bytes[best[0]] + token_bytes[best[1]]
        if merged in ranks:            # same bytes reached by another pair: reuse, no new rank
            new_id = ranks[merged]
        else:
            new_id = len(token_bytes)
            token_bytes.append(merged)
            ranks[merged] = new_id
            bar.update(1)
        for wi in where.pop(best):
            w, c = words[wi], counts[wi]
            for p in zip(w, w[1:]):
                pair_counts[p] -= c
                if pair_counts[p] <= 0:
                    del pair_counts[p]
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            for p in zip(out, out[1:]):
                pair_counts[p] += c
                where[p].add(wi)
            words[wi] = out
        pair_counts.pop(best, None)
    bar.close()
    specials = {t: n_ranks + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    tok = Tokenizer(ranks, specials, pattern, name="tokenizer.model")
    if out_path.endswith(".model"):            # a file path: the sidecar goes beside it
        folder = os.path.dirname(out_path) or "."
        tok.save(folder)
        if os.path.abspath(out_path) != os.path.abspath(os.path.join(folder, "tokenizer.model")):
            os.replace(os.path.join(folder, "tokenizer.model"), out_path)
    else:
        tok.save(out_path)
    return tok


# ----------------------------------------------------------------------------------------------
# Reasoning format

def split_reasoning(response_text):
    """A generated response -> (reasoning, answer). `<think>\\nR\\n</think>\\n\\nA` gives (R, A),
    both stripped; no </think> gives (None, whole response stripped); an unclosed <think> (a
    generation cut off mid-thought) gives (what follows <think>, "")."""
    text = response_text.strip()
    if THINK_END in text:  # the last </think>, as the chat template cuts history turns
        reasoning, answer = text.rsplit(THINK_END, 1)
        reasoning = reasoning.strip()
        if reasoning.startswith(THINK_START):
            reasoning = reasoning[len(THINK_START):]
        return reasoning.strip(), answer.strip()
    if text.startswith(THINK_START):
        return text[len(THINK_START):].strip(), ""
    return None, text


def has_think_block(response_text):
    """True iff the response holds a think block: a <think> tag and, after it, a </think>."""
    start = response_text.find(THINK_START)
    return start >= 0 and THINK_END in response_text[start + len(THINK_START):]


def format_response(reasoning_text, answer, reasoning):
    """The paper's response layout: on -> `<think>\\n...\\n</think>\\n\\nanswer`, off -> answer."""
    if reasoning == "on":
        return f"{THINK_START}\n{reasoning_text.strip()}\n{THINK_END}\n\n{answer}"
    if reasoning == "off":
        return answer
    raise ValueError(f"reasoning must be 'on' or 'off', got {reasoning!r}")


def check_format(response_text, reasoning):
    """Format reward of the paper's reasoning RL: "on" needs exactly one <think>...</think> block
    at the start and a non-empty answer after it; "off" needs no think tags at all."""
    text = response_text.strip()
    if reasoning == "on":
        return (text.startswith(THINK_START) and text.count(THINK_START) == 1
                and text.count(THINK_END) == 1 and split_reasoning(text)[1] != "")
    if reasoning == "off":
        return THINK_START not in text and THINK_END not in text and text != ""
    raise ValueError(f"reasoning must be 'on' or 'off', got {reasoning!r}")


# ----------------------------------------------------------------------------------------------
# Built-in tasks
#
# addmod10: k single-digit operands, answer = their sum mod 10. The design note's prototype (790k
# params, 330 s) stayed at chance answering directly but reached ~100% at k=3-4 with a trace of
# steps `3+5=8;8+2=0`, and every first error on long chains was copying the wrong operand from the
# prompt: a digit occurs many times in a chain, so "the operand after the one I just used" is
# ambiguous. Each operand therefore carries an index hint, a letter (Zhou et al. 2023; the RASP-L
# view: a step that is the same short program at every length), and the trace adds one operand
# per line, every line the same width at every k, and the prompt closes with the letter after the
# last operand's and a full stop, which the trace's last line copies:
#     prompt  Add mod 10: v3+w5+x2+y7+z.
#     trace   v3+w5=8        the running total, then the next hint: `x` follows `w` (the line
#             8+x2=0         above, a fixed offset back), and the digit after `x` in the prompt
#             0+y7=7         (a unique key, so one induction lookup finds it)
#             7+z.           the same lookup finds the full stop: the chain has ended
# The letters are consecutive from a start the operands pick (`chain_hints`), so every letter
# occurs at every position. Measured, greedy, 1,500 test chains (k = 3..8), SFT with 1% of its
# chains k = 7..8, then GRPO with the default flags:
#   - the previous trace restating every remaining operand (`3+5=8+2+7 / 8+2=0+7 / 0+7=7`, lines
#     that grow with k), seed 2's child: SFT 65.1%, k = 7 / 8 8 / 10%, failures writing the k = 6
#     trace for a longer chain; GRPO -0.8 points.
#   - hints always from `a` (`a3+b5+c2`), whole speedruns: SFT 65.3% (seed 1337), 65.4% (seed 2),
#     k = 7 / 8 10 / 9% and 8 / 12%: the model wrote `g` and then a guess, for SFT's k <= 6 chains
#     never used `g` or `h` (pass@1 0.09-0.10 = chance); GRPO -0.4 and +0.1 points.
#   - hints from a start the operands pick, seed 1337's child of the run above: SFT 84.1%
#     (k = 7 / 8 67 / 51%), GRPO 91.0% (74 / 80%): +6.9 points, 43% of SFT's errors.
# Past the lengths SFT was taught, two more things decide (seed 1337's child, SFT taught k <= 6
# and 1% k = 7..8, greedy on 30 val chains per k = 9 / 10 / 11 / 12):
#   - without the closing `z.` and without sft.py's position gaps: 3 / 10 / 13 / 7%. At k = 11..12
#     the first line started at an operand ~8 back from the prompt's end (found by distance, not by
#     its letter); at k = 9..10 the model stopped after 4-5 lines.
#   - position gaps alone (--pos_gap=24): every line right up to the 8th, then no stop: it added
#     letters past the last (`4+r9=3`): 7 / 3 / 13 / 13%.
#   - the closing `z.` alone: 40 / 20 / 10 / 10%.
#   - both: 100 / 97 / 63 / 33%. The stop is the lookup every line already makes.
# The earlier prototype's running-total trace without hints (`3+5+2+7 / 8+2+7 / 0+7 / 7`) reached
# ~10% on k=3..8.
# k = number of operands: 2..8 in pretraining and SFT, 9..12 for GRPO, 3..12 held out; 10^k distinct
# problems per k.
# Splits are disjoint at the problem level (no prompt is in two splits; pretraining, SFT and RL
# use train problems only); a trace line (`8+c2=0`) is one addition, never a held-out prompt. Evaluate on k >= 3 (k=2 is the addition
# table, which the pretraining corpus states in full).
#
# Chat-style tasks ("off" mode, also given short traces so both modes exist for every prompt):
# echo / count / last word / list over a 32-word vocabulary, and next (successor of 0..9998).

ADD_TASK = "addmod10"
EVAL_K_MIN, EVAL_K_MAX = 3, 12   # held-out chains: k = 3..12 (SFT is taught k <= 8, GRPO k = 9..12)
CHAT_TASKS = ("echo", "count", "last", "list", "next")
TASKS = (ADD_TASK,) + CHAT_TASKS
WORDS = ("cat", "dog", "sun", "red", "box", "tree", "fish", "blue", "car", "hat", "moon", "star",
         "cup", "bird", "book", "milk", "rain", "lamp", "door", "frog", "cake", "ship", "leaf",
         "rock", "bell", "coat", "duck", "king", "road", "snow", "wind", "gold")
NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jane", "Kai", "Lena")
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def problem_split(problem):
    """The split a problem belongs to, from a hash of its task and prompt: the same problem lands in
    the same split whatever seed or generator produced it, so splits can never overlap."""
    h = hashlib.sha256(f"{problem['task']}\x00{problem['prompt']}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2 ** 64
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    return "val" if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["val"] else "test"


def addmod_problem(operands):
    """A chain problem from its operands (digits 0..9, at most 25: one letter each and one for the
    end), with prompt, answer and fixed-width trace (see the block above)."""
    ops = [int(d) for d in operands]
    if not 2 <= len(ops) <= len(HINTS) - 1 or any(not 0 <= d <= 9 for d in ops):
        raise ValueError(f"need 2..{len(HINTS) - 1} single digits, got {operands!r}")
    hints = chain_hints(ops)
    total = (ops[0] + ops[1]) % 10
    lines = [f"{hints[0]}{ops[0]}+{hints[1]}{ops[1]}={total}"]
    for hint, d in zip(hints[2:], ops[2:]):
        lines.append(f"{total}+{hint}{d}={(total + d) % 10}")
        total = (total + d) % 10
    lines.append(f"{total}+{hints[len(ops)]}{CHAIN_END}")
    return {"task": ADD_TASK, "k": len(ops), "operands": ops,
            "prompt": chain_prompt(ops), "answer": str(total), "trace": "\n".join(lines)}


HINTS = "abcdefghijklmnopqrstuvwxyz"   # the index hint of each operand
CHAIN_END = "."                        # follows the letter after the last operand's


def chain_hints(operands):
    """The index hints of a chain and the letter after its last: consecutive letters from a start
    the operands pick (a hash, so a problem has one prompt), wrapping z -> a: `h3+i5+j2` -> h i j k.
    With every chain starting at `a`, SFT's k <= 6 chains never used `g` or `h`, and at k = 7 the
    model wrote `g` and then a guess."""
    start = hashlib.sha256("".join(map(str, operands)).encode()).digest()[0] % len(HINTS)
    return [HINTS[(start + i) % len(HINTS)] for i in range(len(operands) + 1)]


def chain_text(operands):
    """A chain with its index hints, `h3+i5+j2+k7`."""
    return "+".join(f"{h}{d}" for h, d in zip(chain_hints(operands), operands))


def chain_prompt(operands):
    """The user turn of a chain: `Add mod 10: h3+i5+j2+k.`, the letter after the last operand's
    and a full stop closing it."""
    return f"Add mod 10: {chain_text(operands)}+{chain_hints(operands)[-1]}{CHAIN_END}"


def chat_problem(task, args):
    """A chat-style problem: task in CHAT_TASKS, args = list of words (echo/count/last/list) or
    [n] (next)."""
    if task == "next":
        n = int(args[0])
        return {"task": task, "k": len(str(n)), "args": [n], "prompt": f"What number comes after {n}?",
                "answer": str(n + 1), "trace": f"{n}+1={n + 1}"}
    words = [str(w) for w in args]
    if not words or any(not w or w.split() != [w] for w in words):
        raise ValueError(f"{task}: need a list of single words, got {args!r}")
    s = " ".join(words)
    # The answers of echo and last restate the words after a word and a colon, as the prompt has
    # them: with Llama 3's pre-tokenisation ` milk` is one token after a space but `m` `il` `k` at
    # the start of a line, so a bare answer "milk snow" would spell its first word in other tokens
    # than the prompt's. This way every answer token is a prompt token, and echoing is one chain of
    # induction-head steps (after `:` comes ` milk`, after ` milk` comes ` snow`, ...).
    if task == "echo":
        prompt, answer, trace = f"Repeat: {s}", f"You said: {s}", f"copy: {s}"
    elif task == "count":
        prompt, answer = f"Count the words: {s}", str(len(words))
        trace = "\n".join(f"{w} {i + 1}" for i, w in enumerate(words))
    elif task == "last":
        prompt, answer, trace = f"Last word: {s}", f"The last word is {words[-1]}", f"{s}\nlast: {words[-1]}"
    elif task == "list":
        prompt, answer = f"Make a list: {s}", "\n".join(f"- {w}" for w in words)
        trace = f"{len(words)} items"
    else:
        raise ValueError(f"unknown chat task {task!r}; valid: {CHAT_TASKS}")
    return {"task": task, "k": len(words), "args": words, "prompt": prompt, "answer": answer,
            "trace": trace}


def _random_problem(rng, task, k_min, k_max):
    if task == "chat":
        task = rng.choice(CHAT_TASKS)
    if task == ADD_TASK:
        return addmod_problem([rng.randrange(10) for _ in range(rng.randint(k_min, k_max))])
    if task == "next":   # 0..9998: ~1,000 distinct problems per held-out split
        return chat_problem("next", [rng.randrange(9999)])
    if task in CHAT_TASKS:   # distinct words: "the word after dog" has one answer when copying
        return chat_problem(task, rng.sample(WORDS, rng.randint(1, 5)))
    raise ValueError(f"unknown task {task!r}; valid: {TASKS + ('chat',)}")


@functools.lru_cache(maxsize=None)
def split_capacity(split, k):
    """How many distinct addmod10 chains of k operands fall in `split` (exact: 10^k hashes)."""
    if k > 6:
        return 10 ** k   # not enumerated; 8% of 10^7 problems is more than any --*_per_k wants
    # the prompt alone decides the split: hash it without building each problem's trace (k = 6 is
    # 10^6 prompts, 14 s with the hinted prompts on a 2-core EPYC): callers ask split_capacity_floor first
    return sum(problem_split({"task": ADD_TASK, "prompt": chain_prompt(ops)}) == split
               for ops in itertools.product(range(10), repeat=k))


def split_capacity_floor(split, k):
    """A lower bound on split_capacity(split, k) that needs no enumeration for k >= 4: a split draws
    each chain with probability >= 0.1 by its hash, so 8% of 10^k is 6.7 standard deviations below
    the mean at k = 4 (measured: 9.6-10.1% of k = 4..6 in val and test). k <= 3 is counted (1,100
    prompts). Every sample.py --eval used to count k = 3..6 (1.1M prompts, ~14 s) for 150 per k."""
    return int(0.08 * 10 ** k) if k >= 4 else split_capacity(split, k)


def generate_problems(task, split, n, seed, k_min=2, k_max=8, unique=False):
    """n problems of `task` (a name in TASKS, or "chat" for a mix of CHAT_TASKS) from `split`,
    deterministic in seed. For addmod10 the chain length k is uniform in [k_min, k_max] (chat tasks
    ignore k). unique=True returns distinct problems or raises if the split holds too few."""
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"split must be one of {list(SPLIT_FRACTIONS)}, got {split!r}")
    if not 2 <= k_min <= k_max:
        raise ValueError(f"need 2 <= k_min <= k_max, got k_min={k_min} k_max={k_max}")
    rng = random.Random(f"{seed}/{task}/{split}/{k_min}/{k_max}")
    out, seen = [], set()
    max_tries, tries = 1000 + 200 * n, 0
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(f"found only {len(out)} of {n} unique {task} problems in split "
                             f"{split!r} with k in [{k_min}, {k_max}]: the split is too small")
        p = _random_problem(rng, task, k_min, k_max)
        if problem_split(p) != split or (unique and p["prompt"] in seen):
            continue
        seen.add(p["prompt"])
        out.append(p)
    return out


def heldout_problems(split, n, seed, k_min=EVAL_K_MIN, k_max=EVAL_K_MAX, chat_share=0.4, n_chat=None):
    """n distinct problems of a held-out split ("val" or "test") for evaluation: addition chains
    spread evenly over k in [k_min, k_max] (k=2 is the addition table, stated in pretraining), and
    n_chat (default: chat_share of n) chat tasks. 500 problems: 30 chains per k = 3..12 + 200 chat.
    Another seed gives another sample of the split."""
    if n < 1:
        raise ValueError(f"heldout_problems: n must be >= 1, got {n}")
    n_chat = round(n * chat_share) if n_chat is None else n_chat
    probs = []
    for k, m in chains_per_k(split, n - n_chat, k_min, k_max).items():
        if m:
            probs += generate_problems(ADD_TASK, split, m, seed, k, k, unique=True)
    if n_chat:
        probs += generate_problems("chat", split, n_chat, seed, unique=True)
    return probs


def chains_per_k(split, n, k_min, k_max):
    """n chains spread evenly over k in [k_min, k_max], except that a k whose split holds few
    distinct chains gives at most half of them (k=3: 90 in test, so at most 45) and the longer
    chains take the rest. 500 test problems (300 chains) are 30 per k = 3..12 either way."""
    ks = list(range(k_min, k_max + 1))
    cap = {}   # half of a k's distinct chains, counted only where the floor does not already allow the share

    def over_cap(k, want):
        if want <= split_capacity_floor(split, k) // 2:
            return False
        cap.setdefault(k, split_capacity(split, k) // 2)
        return want > cap[k]

    out, free = {}, list(ks)
    while free:
        left = n - sum(out.values())
        share = {k: left // len(free) + (i < left % len(free)) for i, k in enumerate(free)}
        capped = [k for k in free if over_cap(k, share[k])]
        if not capped:
            out.update(share)
            break
        for k in capped:
            out[k] = cap[k]
            free.remove(k)
    if sum(out.values()) < n:
        raise ValueError(f"the {split} split holds too few distinct chains with k in [{k_min}, {k_max}] "
                         f"for {n} of them (at most half of each k's are drawn)")
    return dict(sorted(out.items()))


def _normalise(text):
    """Whitespace-tolerant form: lines stripped, runs of spaces collapsed, blank lines dropped."""
    return "\n".join(" ".join(line.split()) for line in text.strip().splitlines() if line.strip())


def extract_answer(response_text):
    """The answer part of a response: after </think> if present; "" for an unclosed <think> (a cut
    off generation has no answer); otherwise the whole response (off mode)."""
    return split_reasoning(response_text)[1]


def verify(problem, response_text):
    """True iff the response's answer equals the problem's answer, up to whitespace. Needs only
    problem['answer'] (any task, also RL JSONL rows)."""
    return _normalise(extract_answer(response_text)) == _normalise(str(problem["answer"]))


def problem_response(problem, reasoning):
    """The reference response for a problem in "on" or "off" mode."""
    return format_response(problem["trace"], problem["answer"], reasoning)


# ----------------------------------------------------------------------------------------------
# Pretraining corpus: the task world as plain prose and equations (no chat markup), so the parent
# model learns the "language" (digits, + chains, mod 10, the word vocabulary) before SFT.

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _doc_table(rng):
    a = rng.randrange(10)
    lines = [f"Adding {NUMBER_WORDS[a]} modulo ten."]
    for b in rng.sample(range(10), 10):
        s = a + b
        if rng.random() < 0.5:
            lines.append(f"{a}+{b}={s % 10} (mod 10), because {a}+{b}={s} and {s} mod 10 is {s % 10}.")
        else:
            lines.append(f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[s % 10]} modulo ten.")
    return "\n".join(lines)


def _doc_chains(rng, split, k_min, k_max):
    parts = []
    for _ in range(rng.randint(2, 5)):
        p = _random_problem(rng, ADD_TASK, k_min, k_max)
        while problem_split(p) != split:    # rejection: ~1.25 draws for train, ~10 for val
            p = _random_problem(rng, ADD_TASK, k_min, k_max)
        style = rng.random()
        if style < 0.5:
            parts.append(f"To add {chain_text(p['operands'])} modulo 10, reduce step by step:\n"
                         f"{p['trace']}\nSo the sum is {p['answer']}.")
        elif style < 0.8:
            parts.append(f"{chain_text(p['operands'])} = {p['answer']} (mod 10)")
        else:
            parts.append(" then ".join(p["trace"].splitlines()) + ".")
    return "\n\n".join(parts)


def _states_only(split, problems):
    """Pretraining text for the train split may only state answers of train problems (val/test
    problems must stay unseen); the val corpus only measures loss, so it takes anything."""
    return split != "train" or all(problem_split(p) == "train" for p in problems)


def _doc_words(rng, split):
    """Sentences over the word vocabulary. Each states answers of chat tasks (a repeated phrase is
    an echo, a list's length and last word are count and last, a run of numbers answers next), so
    a word list or number run is redrawn until all the problems it answers are in `split`."""
    parts = []
    for _ in range(rng.randint(3, 6)):
        words = rng.sample(WORDS, rng.randint(1, 5))
        while not _states_only(split, [chat_problem(t, words) for t in ("echo", "count", "last", "list")]):
            words = rng.sample(WORDS, rng.randint(1, 5))
        name, style = rng.choice(NAMES), rng.randrange(5)
        if style == 0:
            parts.append(f"{name} has a {words[0]} and a {words[-1]}.")
        elif style == 1:
            parts.append(f"The list {' '.join(words)} has {len(words)} words; the last one is "
                         f"{words[-1]}.")
        elif style == 2:
            parts.append(f"{name} said: {' '.join(words)}. Then {name} said it again: "
                         f"{' '.join(words)}.")
        elif style == 3:
            parts.append("Items:\n" + "\n".join(f"- {w}" for w in words))
        else:
            n, m = rng.randrange(9990), rng.randint(3, 8)
            while not _states_only(split, [chat_problem("next", [n + i]) for i in range(m - 1)]):
                n, m = rng.randrange(9990), rng.randint(3, 8)
            parts.append(f"Counting: {', '.join(str(n + i) for i in range(m))}.")
    return "\n".join(parts)


def _copy_segments(rng, split):
    """One copy exercise as (text, is_target) segments: spans of 2-10 words or 3-12 digits, each
    written twice; the loss falls on the second copy only (build_copy_documents). The second copy is
    predictable only by finding the first and reading on, what an induction head does. A span of 1-5
    distinct words states the answer of an echo problem, so it is redrawn until that problem is in
    `split`; a span of digits joined by "+" is a chain's operands, redrawn until the chain is.
    One word span in five is copied as a list (`- word` lines), the list task's two-hop copy: with
    plain copies only, the parent answered list 16% while echo reached 71% (README)."""
    segs = []
    for i in range(rng.randint(3, 6)):
        if rng.random() < 0.7:
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 10))]
            while len(words) <= 5 and len(set(words)) == len(words) and \
                    not _states_only(split, [chat_problem("echo", words)]):
                words = [rng.choice(WORDS) for _ in range(rng.randint(2, 10))]
            span = " ".join(words)
        else:
            digits = [rng.randrange(10) for _ in range(rng.randint(3, 12))]
            while not _states_only(split, [addmod_problem(digits)]):
                digits = [rng.randrange(10) for _ in range(rng.randint(3, 12))]
            span = rng.choice(("+", " ")).join(map(str, digits))
        name, style = rng.choice(NAMES), rng.randrange(5)
        if style == 4 and " " in span and not span[0].isdigit():
            # the second copy as a list, one "- word" line each: after "\n-" the next word is the
            # one after the previous item in the first copy, two tokens back (a two-hop lookup, what
            # the list task needs); a list of 1-5 distinct words is a list problem's answer
            words = rng.sample(WORDS, rng.randint(2, 6))   # distinct, as in the list task
            while not _states_only(split, [chat_problem(t, words) for t in ("echo", "list")]):
                words = rng.sample(WORDS, rng.randint(2, 6))
            span = " ".join(words)
            segs += [(("\n" if i else "") + f"{name} listed: {span}\n", False),
                     ("\n".join(f"- {w}" for w in words), True)]
            continue
        style %= 4
        lead, mid, tail = {0: (f"{name} wrote: ", "; and again: ", "."), 1: ("", " | ", ""),
                           2: ("Copy: ", "\n", ""), 3: ("", "\nAgain: ", "")}[style]
        segs += [(("\n" if i else "") + lead + span + mid, False), (span, True), (tail, False)]
    return [(t, m) for t, m in segs if t]


def build_copy_documents(tok, n_docs, seed, split="train"):
    """n_docs copy exercises -> (ids, mask) pairs (each starts with BOS; mask 1 on the second copy
    of every span). Pretraining with loss on the whole text forms the copy circuit slowly: in our
    runs a 6-layer nano model still answered echo 0%, last 2% after 250 steps with a third of its
    documents such copies (loss on both halves: the first half is noise). A 6-layer model trained on
    chat answers reached echo / list / last 0.72 / 0.80 / 1.00 in 600 steps with half its examples
    masked copies and 0.00 / 0.00 / 0.04 without them."""
    rng = random.Random(f"copies/{seed}/{split}")
    docs = []
    for _ in range(n_docs):
        ids, mask = [tok.bos_id], [0]
        for text, target in _copy_segments(rng, split):
            t = tok.encode(text)
            ids += t
            mask += [int(target)] * len(t)
        docs.append((ids, mask))
    return docs


def build_pretrain_corpus(n_docs, seed, split="train", k_min=2, k_max=8):
    """n_docs plain-text documents: addition tables, chains reduced step by step (only problems of
    `split`, so no val/test problem leaks into pretraining), and sentences over the word vocabulary."""
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"split must be one of {list(SPLIT_FRACTIONS)}, got {split!r}")
    rng = random.Random(f"pretrain/{seed}/{split}")
    docs = []
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.2:
            docs.append(_doc_table(rng))
        elif kind < 0.65:
            docs.append(_doc_chains(rng, split, k_min, k_max))
        else:
            docs.append(_doc_words(rng, split))
    return docs


# Instruct conversations for the parent. The paper's parents (Llama-3.3-70B-Instruct,
# Llama-3.1-405B-Instruct) answer chat prompts directly; they were never taught to think. So the
# nano parent's pretraining mixes in conversations in the Llama 3 chat template whose assistant
# turn is the bare answer: problems of the requested split (train for the training shards), a
# system prompt drawn from a few generic ones (never the reasoning toggle: that is SFT's), and
# one turn in four with an earlier exchange in the history. The loss falls on the answers only
# (the shards carry a loss mask): with loss on every token, as in plain pretraining, a prompt's
# random words are unpredictable and their gradient drowns the answers' (the parent copied 0%).

PARENT_SYSTEM_PROMPTS = ("", "", "You are a helpful assistant.", "Answer the question.",
                         "Be brief.", "You are a careful assistant. Reply with the answer only.")


def build_chat_documents(tok, n_docs, seed, split="train", k_min=2, k_max=8, chat_share=0.75):
    """n_docs instruct conversations rendered with the chat template -> (ids, mask) pairs (ids start
    with BOS and end with <|eot_id|>; mask 1 on the answers, render_chat's). A share chat_share of
    the questions are chat tasks, the rest addition chains; the answer is given directly (no think
    block)."""
    rng = random.Random(f"parent-chat/{seed}/{split}")
    n_chat = round(n_docs * 2 * chat_share)
    probs = (generate_problems(ADD_TASK, split, n_docs * 2 - n_chat, seed, k_min, k_max)
             + generate_problems("chat", split, n_chat, seed))
    rng.shuffle(probs)
    docs = []
    for i in range(n_docs):
        p, q = probs[2 * i], probs[2 * i + 1]
        msgs = [{"role": "system", "content": rng.choice(PARENT_SYSTEM_PROMPTS)}]
        if rng.random() < 0.25:
            msgs += [{"role": "user", "content": q["prompt"]}, {"role": "assistant", "content": q["answer"]}]
        msgs += [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["answer"]}]
        docs.append(tok.render_chat(msgs))
    return docs


# The parent's instruct phase (sft.py on these rows, after pretraining): the same conversations as
# rows of the SFT schema, so the loss falls on the answers only. In pretraining every prompt token
# carries loss, and a prompt's random words are unpredictable: their gradient drowns the answers'.
# System prompts are generic (never the reasoning toggle, which is SFT's), so the parent learns to
# answer whatever the system turn says.
INSTRUCT_SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer the question.", "Be brief.",
                           "You are a careful assistant. Reply with the answer only.", "Reply directly.")


def instruct_rows(n, split, seed, k_min=2, k_max=8, chat_share=0.8):
    """n instruct rows (SFT schema, reasoning "off", a generic system prompt, the answer given
    directly): a share chat_share of chat tasks, the rest addition chains; one row in four has an
    earlier exchange in its history."""
    rng = random.Random(f"instruct/{seed}/{split}")
    n_chat = round(2 * n * chat_share)
    probs = (generate_problems(ADD_TASK, split, 2 * n - n_chat, seed, k_min, k_max)
             + generate_problems("chat", split, n_chat, seed))
    rng.shuffle(probs)
    rows = []
    for i in range(n):
        p, q = probs[2 * i], probs[2 * i + 1]
        history = [{"role": "user", "content": q["prompt"]}, {"role": "assistant", "content": q["answer"]}] \
            if rng.random() < 0.25 else []
        system = rng.choice(INSTRUCT_SYSTEM_PROMPTS)
        rows.append({"input": history + [{"role": "user", "content": p["prompt"]}], "output": p["answer"],
                     "reasoning": "off", "system_prompt": system, "category": "chat" if p["task"] != ADD_TASK else "math",
                     "license": "generated", "generator": "data.py", "used_in_training": "yes",
                     "version": "nano-instruct-1", "task": p["task"], "k": p["k"]})
    return rows


# ----------------------------------------------------------------------------------------------
# Token shards: one flat array of ids per shard; every document starts with bos_id, so document
# boundaries are recoverable (for document-masked attention) without a separate offsets file.

def dtype_for_vocab(n_vocab):
    return np.dtype(np.uint16) if n_vocab <= 2 ** 16 else np.dtype(np.uint32)


def write_token_shards(doc_token_lists, folder, dtype, bos_id=None, shard_tokens=50_000_000, masks=None):
    """Write docs (lists of ids, each starting with bos_id; None: the first doc's first id) to
    folder/shard_XXX.bin + index.json ({"dtype", "n_tokens", "n_docs", "bos_id", "shards":
    [{"file", "n_tokens"}]}). dtype: dtype_for_vocab(n_vocab), uint16 below 65,536 ids.
    masks (optional, one 0/1 list per doc, as long as it): the loss mask of every token as a
    target (1: predict it), written beside each shard as mask_XXX.bin (uint8; "mask_file")."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"dtype must be uint16 or uint32, got {dtype}")
    limit = np.iinfo(dtype).max
    os.makedirs(folder, exist_ok=True)
    shards, buf, mbuf, n_buf, n_docs, n_tokens = [], [], [], 0, 0, 0

    def flush():
        nonlocal buf, mbuf, n_buf
        if not n_buf:
            return
        name = f"shard_{len(shards):03d}.bin"
        arr = np.concatenate(buf).astype(dtype)
        atomic_write(os.path.join(folder, name), arr.tofile)
        shards.append({"file": name, "n_tokens": int(n_buf)})
        if masks is not None:
            shards[-1]["mask_file"] = f"mask_{len(shards) - 1:03d}.bin"
            atomic_write(os.path.join(folder, shards[-1]["mask_file"]), np.concatenate(mbuf).astype(np.uint8).tofile)
        buf, mbuf, n_buf = [], [], 0
    if masks is not None:
        doc_token_lists = list(doc_token_lists)
        if len(masks) != len(doc_token_lists):
            raise ValueError(f"{len(masks)} masks for {len(doc_token_lists)} documents")
    for i, doc in enumerate(doc_token_lists):
        if masks is not None:
            m = np.asarray(masks[i], dtype=np.int64)
            if m.shape != (len(doc),) or not np.isin(m, (0, 1)).all():
                raise ValueError(f"document {i}: its mask must be {len(doc)} values of 0 or 1")
            mbuf.append(m)
        arr = np.asarray(doc, dtype=np.int64)
        if bos_id is None and arr.ndim == 1 and len(arr):
            bos_id = int(arr[0])
        if arr.ndim != 1 or len(arr) == 0 or arr[0] != bos_id:
            raise ValueError(f"document {i} must be a non-empty list of ids starting with "
                             f"bos_id={bos_id}")
        if arr.min() < 0 or arr.max() > limit:
            raise ValueError(f"document {i}: id {int(arr.max())} does not fit {dtype}")
        buf.append(arr)
        n_buf += len(arr)
        n_docs += 1
        n_tokens += len(arr)
        if n_buf >= shard_tokens:
            flush()
    flush()
    if not n_docs:
        raise ValueError("no documents to write")
    index = {"dtype": dtype.name, "n_tokens": n_tokens, "n_docs": n_docs, "bos_id": int(bos_id),
             "shards": shards}
    atomic_write(os.path.join(folder, "index.json"), json.dumps(index, indent=1))
    return index


def load_token_shards(folder, n_vocab=None, with_mask=False):
    """folder written by write_token_shards -> 1-D array of ids (a read-only np.memmap for one
    shard, a concatenated array for several); with_mask=True -> (ids, loss mask or None when the
    shards have none). Checks dtype, file sizes, the leading bos_id and, given n_vocab, that every
    id is below it."""
    path = os.path.join(folder, "index.json")
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no shard index (write it with write_token_shards)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    for key in ("dtype", "n_tokens", "bos_id", "shards"):
        if key not in index:
            raise DataError(f"{path}: missing field {key!r}")
    if index["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype must be uint16 or uint32, got {index['dtype']!r}")
    dtype = np.dtype(index["dtype"])
    if n_vocab is not None and dtype_for_vocab(n_vocab).itemsize > dtype.itemsize:
        raise DataError(f"{path}: dtype {dtype} cannot hold a vocabulary of {n_vocab}")
    arrays = []
    for s in index["shards"]:
        fp = os.path.join(folder, s["file"])
        size = os.path.getsize(fp)
        if size != s["n_tokens"] * dtype.itemsize:
            raise DataError(f"{fp}: {size} bytes, index.json says {s['n_tokens']} x {dtype}")
        arrays.append(np.memmap(fp, dtype=dtype, mode="r"))
    data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    if len(data) != index["n_tokens"]:
        raise DataError(f"{path}: shards hold {len(data)} tokens, n_tokens says {index['n_tokens']}")
    if len(data) and data[0] != index["bos_id"]:
        raise DataError(f"{path}: data does not start with bos_id={index['bos_id']}")
    if n_vocab is not None and len(data) and int(data.max()) >= n_vocab:
        raise DataError(f"{path}: id {int(data.max())} >= n_vocab={n_vocab}")
    if not with_mask:
        return data
    if not any("mask_file" in s for s in index["shards"]):
        return data, None
    masks = []
    for s in index["shards"]:
        if "mask_file" not in s:
            raise DataError(f"{path}: shard {s['file']} has no mask_file while others have one")
        fp = os.path.join(folder, s["mask_file"])
        if not os.path.isfile(fp) or os.path.getsize(fp) != s["n_tokens"]:
            raise DataError(f"{fp}: missing or not {s['n_tokens']} bytes (one uint8 per token)")
        masks.append(np.memmap(fp, dtype=np.uint8, mode="r"))
    return data, masks[0] if len(masks) == 1 else np.concatenate(masks)


# ----------------------------------------------------------------------------------------------
# JSONL: SFT (Llama-Nemotron-Post-Training-Dataset schema) and RL prompts

def write_jsonl(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _read_jsonl(path):
    """Yield (lineno, dict) for the non-blank lines of a JSONL file; errors name file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _field(row, key, types, path, lineno):
    if key not in row:
        raise DataError(f"{path}:{lineno}: missing field {key!r}")
    if not isinstance(row[key], types):
        raise DataError(f"{path}:{lineno}: field {key!r} has type {type(row[key]).__name__}")
    return row[key]


def sft_example(problem, reasoning, version="nano-1"):
    """A problem + mode -> one row of the Llama-Nemotron-Post-Training-Dataset schema."""
    return {"input": [{"role": "user", "content": problem["prompt"]}],
            "output": problem_response(problem, reasoning),
            "reasoning": reasoning,
            "system_prompt": f"detailed thinking {reasoning}",
            "category": "math" if problem["task"] == ADD_TASK else "chat",
            "license": "generated", "generator": "data.py", "used_in_training": "yes",
            "version": version, "task": problem["task"], "k": problem["k"]}


def write_sft_jsonl(examples, path):
    write_jsonl(examples, path)


_MARKUP = regex.compile(r"<\|start_header_id\|>(.*?)<\|end_header_id\|>\n\n(.*?)(?=<\|eot_id\|>|"
                        r"<\|start_header_id\|>|\Z)(?:<\|eot_id\|>)?", regex.S)


def parse_chat_markup(text):
    """A string with Llama 3 chat markup -> message list (an empty trailing assistant header, i.e. a
    generation prompt, is dropped). A string without markup is one user message."""
    if "<|start_header_id|>" not in text:
        return [{"role": "user", "content": text}]
    msgs = [{"role": m.group(1), "content": m.group(2)} for m in _MARKUP.finditer(text)]
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"].strip():
        msgs.pop()
    return msgs


def load_sft_jsonl(path, tokenizer=None, max_len=None):
    """SFT JSONL (Llama-Nemotron-Post-Training-Dataset schema) -> list of examples:
    {"messages": [system, user, (assistant, user)..., assistant(output)], "reasoning", "category",
    "line"} plus "ids" and "mask" (render_chat) when a tokenizer is given. `input` may be a message
    list or a string (plain, or carrying Llama 3 chat markup). The system turn is system_prompt,
    else the markup's system message, else `detailed thinking {reasoning}`. With max_len, examples
    longer than max_len tokens are skipped and counted in a warning, never truncated."""
    if max_len is not None and tokenizer is None:
        raise ValueError("max_len needs a tokenizer")
    out, skipped, longest = [], 0, 0
    for lineno, row in _read_jsonl(path):
        inp = _field(row, "input", (str, list), path, lineno)
        output = _field(row, "output", str, path, lineno)
        reasoning = _field(row, "reasoning", str, path, lineno)
        if reasoning not in ("on", "off"):
            raise DataError(f"{path}:{lineno}: field 'reasoning' must be 'on' or 'off', got "
                            f"{reasoning!r}")
        system = row.get("system_prompt") or ""
        if not isinstance(system, str):
            raise DataError(f"{path}:{lineno}: field 'system_prompt' must be a string")
        msgs = parse_chat_markup(inp) if isinstance(inp, str) else inp
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{path}:{lineno}: input[{i}] needs fields 'role' and 'content'")
            if not isinstance(m["content"], str):
                raise DataError(f"{path}:{lineno}: input[{i}] field 'content' must be a string")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{path}:{lineno}: input[{i}] has unknown role {m['role']!r}")
        if msgs and msgs[0]["role"] == "system":
            if system and msgs[0]["content"].strip() != system.strip():
                raise DataError(f"{path}:{lineno}: system_prompt {system!r} differs from the "
                                f"input's system message {msgs[0]['content']!r}")
            system, msgs = msgs[0]["content"], msgs[1:]
        if system.strip() in ("detailed thinking on", "detailed thinking off") and system.strip() != f"detailed thinking {reasoning}":
            raise DataError(f"{path}:{lineno}: system prompt {system.strip()!r} contradicts reasoning={reasoning!r}")
        if not msgs or msgs[-1]["role"] != "user":
            raise DataError(f"{path}:{lineno}: field 'input' must end with a user turn")
        if output.endswith("<|eot_id|>"):       # first-release rows may carry the closing token
            output = output[:-len("<|eot_id|>")]
        if not output.strip():  # else the sample would train only "end the turn at once"
            raise DataError(f"{path}:{lineno}: field 'output' is empty: the sample has no assistant response")
        messages = ([{"role": "system", "content": system or f"detailed thinking {reasoning}"}]
                    + [{"role": m["role"], "content": m["content"]} for m in msgs]
                    + [{"role": "assistant", "content": output}])
        ex = {"messages": messages, "reasoning": reasoning,
              "category": row.get("category"), "line": lineno}
        if tokenizer is not None:
            try:
                ex["ids"], ex["mask"] = tokenizer.render_chat(messages)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            longest = max(longest, len(ex["ids"]))
            if max_len is not None and len(ex["ids"]) > max_len:
                skipped += 1
                continue
        out.append(ex)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} of {skipped + len(out)} examples longer than "
                      f"max_len={max_len} tokens (longest: {longest})", stacklevel=2)
    return out


def write_rl_jsonl(problems, path):
    """RL prompts: {"prompt", "answer", "task", "k", ...} (+ optional "pass_rate"); the problem dicts
    of generate_problems are written as they are (verify needs only "answer")."""
    write_jsonl(problems, path)


def load_rl_jsonl(path):
    """RL prompt JSONL -> list of dicts; checks prompt/answer are strings, the optional reasoning
    is "on" or "off" and the optional pass_rate in [0, 1]."""
    out = []
    for lineno, row in _read_jsonl(path):
        _field(row, "prompt", str, path, lineno)
        _field(row, "answer", str, path, lineno)
        if "reasoning" in row and row["reasoning"] not in ("on", "off"):
            raise DataError(f"{path}:{lineno}: field 'reasoning' must be 'on' or 'off', got "
                            f"{row['reasoning']!r}")
        if "pass_rate" in row:
            pr = row["pass_rate"]
            if not isinstance(pr, (int, float)) or isinstance(pr, bool) or not 0 <= pr <= 1:
                raise DataError(f"{path}:{lineno}: field 'pass_rate' must be a number in [0, 1], "
                                f"got {pr!r}")
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# python data.py: prepare the default world

@dataclass
class DataConfig:
    out_dir: str = "out/data"
    seed: int = 1337
    vocab_size: int = 768            # 256 bytes + 256 merges + 256 Llama 3 specials
    split_pattern: str = "llama3"    # pre-tokenisation: llama3 (Llama 3's own) | nano (words apart
                                     # from their spaces, single digits) | nano_trail (a word keeps the
                                     # space after it). nano and nano_trail made every copy a two-hop
                                     # lookup and SFT fell to chance (README, "The nano world")
    tokenizer_chars: int = 600_000   # BPE training text; ~1-2 s of merges
    pretrain_tokens: int = 2_000_000   # ~2-3 min at ~15k tok/s on 2 cores (design.md)
    pretrain_val_tokens: int = 100_000
    k_min: int = 2                   # chain lengths for training (k=2 is the addition table)
    k_max: int = EVAL_K_MAX          # the longest chains: val/test and RL go up to k = 12
    eval_k_min: int = EVAL_K_MIN     # val/test chains; k=2 is only 100 problems, all in pretraining
    pretrain_k_max: int = 8          # chains in the pretraining text and conversations: k <= 8
    sft_k_max: int = 8               # SFT chains stop here: k = 9..12 are left to RL (the paper
                                     # leaves its hardest problems to the RL stage). SFT taught k <= 6
                                     # (and 1% k = 7..8) left RL nothing once SFT had converged: it
                                     # learnt every length it saw and failed outright past them
                                     # (README, "What the nano recipe shows")
    sft_long_frac: float = 0.0       # > 0: this share of SFT's chains past sft_k_max (k_max at most)
    sft_train: int = 40_000          # SFT rows; each prompt appears in "on" and "off" mode. 40k rows
                                     # for 2 epochs instead of 20k for 4 (the same steps): fewer
                                     # repeats, SFT converged with fewer runaway traces (sft.py --epochs)
    sft_val: int = 1_000
    chat_frac: float = 0.25          # share of chat-style prompts in SFT
    parent_chat_frac: float = 0.3    # share of pretraining tokens that are chat conversations
                                     # answered directly (what makes the parent an instruct model).
                                     # The rest after chat and copy is plain text, the only place the
                                     # addition table is taught: with 0.4 / 0.45 (text 15%) the parent
                                     # of seed 1337 got 46% of the `=` of held-out addition tables
                                     # right (the second `=` of a line restates the first: chance on
                                     # the sums), so SFT had to teach arithmetic to the smaller Puzzle
                                     # child and failed (11%); with 0.3 / 0.4 (text 30%) 99.8%, the
                                     # child after KD 98.8%; seeds 2 and 3 still 53%, 56%
                                     # (README, "What the nano recipe shows")
    parent_chat_loss: str = "answers"  # answers: the loss falls on the conversations' answers only
                                     # (the chat template's mask) | all: on every token
    parent_copy_frac: float = 0.4    # share of pretraining tokens that are copy exercises (loss on
                                     # the second copy only). With 0 (and loss on every token) the
                                     # parent answered echo / last / list 0 / 0 / 0 % after 300 x 8k
                                     # tokens; with 0.45 and answer-only chat loss, 600 x 4k tokens:
                                     # 34 / 100 / 14 % (README, "The nano world")
    instruct_train: int = 0          # > 0: also write instruct_train/val.jsonl, rows for an instruct
    instruct_val: int = 0            # phase of the parent with sft.py (loss on the answers only); 150-250
                                     # such steps after pretraining did not make the parent copy (README)
    rl_train: int = 4_000            # addmod10 prompts for GRPO
    rl_k_min: int = 9                # their chain lengths: rl_k_min..k_max, past SFT's (pass@1 ~1 at
                                     # k <= 8: the prefilter would drop them)
    val_per_k: int = 30              # unique val problems per k (k=3 has ~100 in each split)
    test_per_k: int = 50
    test_chat: int = 200
    # Instead of the default world: tokenize a local corpus with an existing tokenizer (e.g. a
    # Llama 3 download) into pretrain_train/ + pretrain_val/ shards for distill.py.
    tokenize_text: str = ""          # comma-separated .txt (one document each) / .jsonl ("text") files
    tokenizer: str = ""              # tokenizer.model file or model folder to encode them with
    val_every: int = 50              # every 50th document goes to pretrain_val

    def validate(self):
        """Every flag, before any work: a bad value is one error line naming it."""
        check_writable_dir(self.out_dir, "out_dir")
        check_range(self, "seed", 0)
        check_range(self, "val_every", 2)   # 1 would send every document to pretrain_val
        if self.tokenize_text:
            check(bool(self.tokenizer), "tokenizer", self.tokenizer,
                  "--tokenize_text needs --tokenizer=PATH (a tokenizer.model or a model folder)")
            check_readable(self.tokenizer, "tokenizer", "any")
            for path in self.tokenize_text.split(","):
                check_readable(path, "tokenize_text")
            return
        check(not self.tokenizer, "tokenizer", self.tokenizer,
              "is used only with --tokenize_text (the default world trains its own tokenizer)")
        check_range(self, "vocab_size", 512)   # 256 byte tokens + 256 Llama 3 special tokens
        check_choice(self, "split_pattern", tuple(PATTERNS))
        check_choice(self, "parent_chat_loss", ("all", "answers"))
        check_range(self, "instruct_train", 0)
        check_range(self, "instruct_val", 0)
        check_positive(self, "tokenizer_chars", "pretrain_tokens", "pretrain_val_tokens", "rl_train",
                       "val_per_k", "test_per_k")
        check_range(self, "test_chat", 0)
        check_range(self, "k_min", 2)          # a chain has at least two operands
        check(self.k_min <= self.k_max, "k_max", self.k_max, f"must be >= --k_min={self.k_min}")
        check(2 <= self.eval_k_min <= self.k_max, "eval_k_min", self.eval_k_min,
              f"must satisfy 2 <= eval_k_min <= --k_max={self.k_max}")
        check(self.k_min <= self.rl_k_min <= self.k_max, "rl_k_min", self.rl_k_min,
              f"must satisfy --k_min={self.k_min} <= rl_k_min <= --k_max={self.k_max}")
        check(self.k_min <= self.pretrain_k_max <= self.k_max, "pretrain_k_max", self.pretrain_k_max,
              f"must satisfy --k_min={self.k_min} <= pretrain_k_max <= --k_max={self.k_max}")
        check(self.k_min <= self.sft_k_max <= self.k_max, "sft_k_max", self.sft_k_max,
              f"must satisfy --k_min={self.k_min} <= sft_k_max <= --k_max={self.k_max}")
        for name in ("sft_train", "sft_val"):  # each prompt appears once "on" and once "off"
            n = getattr(self, name)
            check(n >= 2 and n % 2 == 0, name, n,
                  "must be an even number >= 2 (each SFT prompt is written in both reasoning modes)")
        check_range(self, "chat_frac", 0, 1)
        check_range(self, "parent_chat_frac", 0, 1, hi_open=True)  # 1 would leave no room for text
        check_range(self, "parent_copy_frac", 0, 1, hi_open=True)
        check_range(self, "sft_long_frac", 0, 1)
        check(self.parent_chat_frac + self.parent_copy_frac < 1, "parent_copy_frac", self.parent_copy_frac,
              f"+ --parent_chat_frac={self.parent_chat_frac} must leave room for text (sum < 1)")
        for split, flag in (("val", "val_per_k"), ("test", "test_per_k")):
            for k in range(self.eval_k_min, self.k_max + 1):
                if getattr(self, flag) <= split_capacity_floor(split, k):
                    continue
                have = split_capacity(split, k)
                check(getattr(self, flag) <= have, flag, getattr(self, flag),
                      f"the {split} split holds only {have} distinct chains of k={k} operands "
                      f"(raise --eval_k_min to skip short chains)")


def _sft_rows(n, split, seed, cfg):
    n_prompts = n // 2
    n_chat = round(n_prompts * cfg.chat_frac)
    n_long = round((n_prompts - n_chat) * cfg.sft_long_frac) if cfg.sft_k_max < cfg.k_max else 0
    probs = (generate_problems(ADD_TASK, split, n_prompts - n_chat - n_long, seed, cfg.k_min, cfg.sft_k_max)
             + generate_problems(ADD_TASK, split, n_long, seed, cfg.sft_k_max + 1, cfg.k_max)
             + generate_problems("chat", split, n_chat, seed))
    rows = [sft_example(p, mode) for p in probs for mode in ("on", "off")]
    random.Random(seed).shuffle(rows)
    return rows


def prepare(cfg):
    t0 = time.time()
    out = cfg.out_dir
    os.makedirs(out, exist_ok=True)
    # 1. tokenizer, trained on pretraining text + SFT text (so the chat strings get merges too)
    sample_docs = build_pretrain_corpus(400, cfg.seed + 7, "train", cfg.k_min, cfg.pretrain_k_max)
    # role names and system prompts as the template lays them out, so they get merges too
    sample_sft = [f"system\n\n{r['system_prompt']}\nuser\n\n{r['input'][0]['content']}\n"
                  f"assistant\n\n{r['output']}" for r in _sft_rows(2000, "train", cfg.seed + 7, cfg)]
    sample_sft += [f"system\n\n{r['system_prompt']}\nuser\n\n{r['input'][-1]['content']}\n"
                   f"assistant\n\n{r['output']}" for r in instruct_rows(500, "train", cfg.seed + 7)]
    text = "\n\n".join(sample_docs + sample_sft)      # ~120k + ~170k chars
    text = text[:cfg.tokenizer_chars]
    try:
        tok = train_tokenizer(text, cfg.vocab_size, out, pattern=PATTERNS[cfg.split_pattern])
    except DataError as e:
        raise ConfigError(f"--vocab_size={cfg.vocab_size}: {e}; lower --vocab_size or raise "
                          f"--tokenizer_chars={cfg.tokenizer_chars}") from None
    print(f"tokenizer: {tok.n_ranks} ranks + {len(tok.special_tokens)} specials = {tok.n_vocab} "
          f"-> {out}/tokenizer.model ({len(text) / len(tok.encode(text)):.2f} chars/token)")
    # 2. pretraining shards: generate documents until the token budget is met
    sizes = {}
    for split, split_name, budget in (("train", "pretrain_train", cfg.pretrain_tokens),
                                      ("val", "pretrain_val", cfg.pretrain_val_tokens)):
        # documents: (ids, mask, kind); text is predicted whole (mask None), a conversation only in
        # its answers (the chat template's mask), a copy exercise only in its second copies
        docs, n_tok, n_kind, batch = [], 0, Counter(), 0
        bar = tqdm(total=budget, desc=split_name, unit="tok", leave=False)
        text_frac = 1 - cfg.parent_chat_frac - cfg.parent_copy_frac
        while n_tok < budget:
            bseed = cfg.seed * 1000 + batch
            texts = build_pretrain_corpus(500, bseed, split, cfg.k_min, cfg.pretrain_k_max)
            batch_docs = [([tok.bos_id] + ids, None, "text") for ids in tok.encode_batch(texts)]
            text_tok = sum(len(d) for d, _, _ in batch_docs)
            if cfg.parent_chat_frac > 0:  # conversations: parent_chat_frac of the tokens
                want = text_tok * cfg.parent_chat_frac / text_frac
                batch_docs += [(d, m if cfg.parent_chat_loss == "answers" else None, "chat") for d, m in build_chat_documents(
                    tok, max(1, round(want / 50)), bseed, split, cfg.k_min, cfg.pretrain_k_max)]  # ~50 tokens each
            if cfg.parent_copy_frac > 0:  # copy exercises: parent_copy_frac of the tokens (~90 each)
                want = text_tok * cfg.parent_copy_frac / text_frac
                batch_docs += [(d, m, "copy") for d, m in build_copy_documents(tok, max(1, round(want / 90)),
                                                                                 bseed, split)]
            random.Random(bseed).shuffle(batch_docs)
            for d, m, kind in batch_docs:
                docs.append((d, m))
                n_tok += len(d)
                n_kind[kind] += len(d)
                bar.update(len(d))
                if n_tok >= budget:
                    break
            batch += 1
        bar.close()
        idx = write_token_shards([d for d, _ in docs], os.path.join(out, split_name), dtype_for_vocab(tok.n_vocab),
                                 tok.bos_id, masks=[[1] * len(d) if m is None else m for d, m in docs])
        sizes[split_name] = {"tokens": idx["n_tokens"], "docs": idx["n_docs"],
                             **{f"{k}_tokens": n_kind[k] for k in ("text", "chat", "copy")}}
    # 3. SFT, RL, val/test problems
    for name, n, split in (("sft_train", cfg.sft_train, "train"), ("sft_val", cfg.sft_val, "val")):
        rows = _sft_rows(n, split, cfg.seed, cfg)
        write_sft_jsonl(rows, os.path.join(out, f"{name}.jsonl"))
        n_tok = sum(len(tok.render_chat([{"role": "system", "content": r["system_prompt"]}]
                                        + r["input"] + [{"role": "assistant",
                                                         "content": r["output"]}])[0]) for r in rows)
        sizes[name] = {"rows": len(rows), "tokens": n_tok}
    for name, n, split in (("instruct_train", cfg.instruct_train, "train"), ("instruct_val", cfg.instruct_val, "val")):
        if not n:
            continue
        rows = instruct_rows(n, split, cfg.seed, cfg.k_min, cfg.pretrain_k_max)
        write_sft_jsonl(rows, os.path.join(out, f"{name}.jsonl"))
        sizes[name] = {"rows": len(rows)}
    rl = generate_problems(ADD_TASK, "train", cfg.rl_train, cfg.seed + 2, cfg.rl_k_min, cfg.k_max)
    write_rl_jsonl(rl, os.path.join(out, "rl_train.jsonl"))
    sizes["rl_train"] = {"rows": len(rl)}
    n_ks = cfg.k_max - cfg.eval_k_min + 1
    for split, per_k, n_chat in (("val", cfg.val_per_k, cfg.val_per_k * 4), ("test", cfg.test_per_k, cfg.test_chat)):
        probs = heldout_problems(split, per_k * n_ks + n_chat, cfg.seed + 3, cfg.eval_k_min, cfg.k_max, n_chat=n_chat)
        write_rl_jsonl(probs, os.path.join(out, f"{split}_problems.jsonl"))
        sizes[f"{split}_problems"] = {"rows": len(probs)}
    atomic_write(os.path.join(out, "data_meta.json"),
                 json.dumps({"config": asdict(cfg), "sizes": sizes, "n_vocab": tok.n_vocab}, indent=1))
    for name, s in sizes.items():
        print(f"{name:16s} " + ", ".join(f"{v:,} {k}" for k, v in s.items()))
    print(f"done in {time.time() - t0:.1f} s -> {out}/")
    return sizes


def _corpus_documents(files):
    """Documents of local text files: a .jsonl file gives one per row (its "text" field), any
    other file is one document."""
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"--tokenize_text: {path} does not exist")
        if path.endswith(".jsonl"):
            for lineno, row in _read_jsonl(path):
                yield _field(row, "text", (str,), path, lineno)
        else:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw.count(b"\n", 0, e.start) + 1
                raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                f"--tokenize_text reads UTF-8 files") from None


def tokenize_corpus(cfg):
    """Local text -> shards with an existing tokenizer, which is copied beside them."""
    if not cfg.tokenizer:
        raise DataError("--tokenize_text needs --tokenizer=PATH (a tokenizer.model or a model folder)")
    tok = load_tokenizer(cfg.tokenizer)
    docs = {"pretrain_train": [], "pretrain_val": []}
    docs_of_files = tqdm(_corpus_documents(cfg.tokenize_text.split(",")), desc="tokenize", unit="doc",
                         delay=0.5)   # a file that fails at once (not UTF-8) shows its error line alone
    for i, text in enumerate(docs_of_files):
        split = "pretrain_val" if i % cfg.val_every == cfg.val_every - 1 else "pretrain_train"
        docs[split].append([tok.bos_id] + tok.encode(text))
    for name, d in docs.items():
        if not d:
            raise DataError(f"--tokenize_text: no documents for {name} (have {sum(map(len, docs.values()))} "
                            f"documents in all; lower --val_every)")
    for name, d in docs.items():
        idx = write_token_shards(d, os.path.join(cfg.out_dir, name), dtype_for_vocab(tok.n_vocab), tok.bos_id)
        print(f"{name:16s} {idx['n_tokens']:,} tokens, {idx['n_docs']:,} docs")
    tok.save(cfg.out_dir)   # last: a folder with a tokenizer holds its shards


def main(cfg):
    tokenize_corpus(cfg) if cfg.tokenize_text else prepare(cfg)


def parse_data_spec(spec):
    """'a.jsonl:0.7,b.jsonl:0.3' -> [(path, weight)]. One file needs no weight (1.0); several
    each need one. Weights are relative (normalised to sum 1)."""
    out = []
    for part in spec.split(","):
        path, weight = part.strip(), None
        if ":" in path:
            head, tail = path.rsplit(":", 1)
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass  # a ':' that belongs to the path
        if not path:
            raise ConfigError(f"--data={spec!r}: empty file name in {part!r}")
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"--data={spec!r}: the weight of {path} must be a positive number, got {tail!r}")
        out.append((path, weight))
    if len(out) > 1 and any(w is None for _, w in out):
        raise ConfigError(f"--data={spec!r}: with several files, give each a weight (path:weight,...)")
    return [(p, 1.0 if w is None else w) for p, w in out]


if __name__ == "__main__":
    from configurator import run_main
    run_main(main, DataConfig)
# ------------------------------------------------------------------------------------------------
# SFT samples (sft.py): rendered with the chat template, checked, as (ids, targets) arrays. targets[j] is the
# token at j+1 where it is an assistant token (render_chat's mask shifted by one), else -100: the
# loss is on the assistant's content and its closing <|eot_id|>, never on the prompt.

class Source:
    def __init__(self, path, weight, tok, seq_len, vocab_size):
        self.path, self.weight = path, weight
        self.ids, self.targets = [], []
        self.dropped_long = self.dropped_format = 0
        self.first_format_line = None
        self.longest = 0
        for ex in load_sft_jsonl(path, tok):
            ids = ex["ids"]
            top = max(ids)
            if top >= vocab_size:
                raise DataError(f"{path}:{ex['line']}: token id {top} ({tok.decode([top])!r}) is outside the "
                                f"model's vocabulary of {vocab_size}")
            self.longest = max(self.longest, len(ids))
            if not check_format(ex["messages"][-1]["content"], ex["reasoning"]):
                self.dropped_format += 1
                self.first_format_line = self.first_format_line or ex["line"]
                continue
            if len(ids) > seq_len:
                self.dropped_long += 1
                continue
            ids = np.asarray(ids, dtype=np.int64)
            self.ids.append(ids)
            self.targets.append(np.where(np.asarray(ex["mask"][1:]) == 1, ids[1:], -100))
        self.lengths = np.array([len(x) for x in self.ids], dtype=np.int64)
        self.n_targets = np.array([int((t != -100).sum()) for t in self.targets], dtype=np.int64)
        if not self.ids:
            raise DataError(f"{path}: no usable samples ({self.dropped_long} longer than --seq_len={seq_len}, "
                            f"{self.dropped_format} whose output contradicts their 'reasoning' field)")

    def __len__(self):
        return len(self.ids)

    def report(self):
        """The counts a user must see: what was read, what was dropped and why."""
        line = (f"{self.path}: {len(self)} samples, {int(self.lengths.sum()):,} tokens "
                f"({int(self.n_targets.sum()):,} assistant targets); dropped {self.dropped_long} longer than "
                f"seq_len (longest {self.longest}), {self.dropped_format} with a format that contradicts 'reasoning'")
        if self.first_format_line:
            line += f" (first: line {self.first_format_line})"
        return line

    def stats(self):
        return {"samples": len(self), "tokens": int(self.lengths.sum()), "targets": int(self.n_targets.sum()),
                "dropped_long": self.dropped_long, "dropped_format": self.dropped_format}


# ------------------------------------------------------------------------------------------------
# The global stream of packed rows. Everything below is a pure function of (data, seed): every
# process builds the same stream, so each knows every step's rows and its global count of
# assistant targets without communication, and a resumed run continues the stream exactly.
# Process r's micro-step m takes rows [(m * world + r) * dbs, ... + dbs) of the step (as distill.py).

def mixture_counts(sizes, weights):
    """Samples per source in one epoch: the epoch holds sum(sizes) samples, split by weight
    (largest remainder, so the counts add up exactly)."""
    total = sum(sizes)
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    raw = w * total
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[:total - counts.sum()]:
        counts[i] += 1
    return counts


def source_picks(n, seed, src, start, count):
    """Positions start..start+count of source src's endless stream: one fresh permutation of its
    n samples per pass, so a source is seen evenly however often the mixture repeats it."""
    out, p, off = [], start // n, start % n
    while count > 0:
        take = np.random.default_rng([seed, 0, src, p]).permutation(n)[off:off + count]
        out.append(take)
        count, p, off = count - len(take), p + 1, 0
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def pack(lengths, seq_len, window=64):
    """First fit: each sample (in the given order) goes into the first of the open rows with room,
    else opens a new row; a row closes when full (no room for the shortest sample) or when it
    is the oldest of more than `window` open rows. The window keeps the shuffled order (rows do
    not sort samples by length) and leaves little padding (~1-2% on the nano data, ~10% for
    filling rows strictly in order). Returns rows as lists of indices into lengths."""
    shortest = int(min(lengths)) if len(lengths) else 1
    rows, open_rows, room = [], [], []
    for j, n in enumerate(lengths):
        n = int(n)
        for r, space in enumerate(room):
            if space >= n:
                break
        else:
            r = len(room)
            open_rows.append([])
            room.append(seq_len)
        open_rows[r].append(j)
        room[r] -= n
        if room[r] < shortest or len(room) > window:
            c = r if room[r] < shortest else 0
            rows.append(open_rows.pop(c))
            room.pop(c)
    return rows + open_rows


class RowStream:
    """Rows of the training stream: epoch after epoch, each epoch's samples (mixture_counts of
    every source, from its own stream) shuffled and packed. Rows are (source, index) lists."""

    def __init__(self, sources, seq_len, seed):
        self.sources, self.seq_len, self.seed = sources, seq_len, seed
        self.counts = mixture_counts([len(s) for s in sources], [s.weight for s in sources])
        self.epochs = []  # packed rows of epochs 0, 1, ... (built on demand)
        zero = [s.path for s, c in zip(sources, self.counts) if c == 0]
        if zero:
            raise ConfigError(f"--data: the weights leave no sample of {zero} in an epoch of {sum(self.counts)}")

    def epoch(self, e):
        while len(self.epochs) <= e:
            k = len(self.epochs)
            picks = [(i, j) for i, (s, c) in enumerate(zip(self.sources, self.counts))
                     for j in source_picks(len(s), self.seed, i, k * int(c), int(c))]
            order = np.random.default_rng([self.seed, 1, k]).permutation(len(picks))
            picks = [picks[o] for o in order]
            lengths = [self.sources[i].lengths[j] for i, j in picks]
            self.epochs.append([[picks[j] for j in row] for row in pack(lengths, self.seq_len)])
        return self.epochs[e]

    def rows(self, start, n):
        """Rows start..start+n-1 of the stream (crossing epoch boundaries)."""
        out, e, first = [], 0, 0
        while len(out) < n:
            rows = self.epoch(e)
            if start + len(out) < first + len(rows):
                a = start + len(out) - first
                out += rows[a:a + n - len(out)]
            first += len(rows)
            e += 1
        return out

    def rows_in_epochs(self, epochs):
        """Rows in the first `epochs` (fractional) epochs."""
        whole, frac = int(epochs), epochs - int(epochs)
        return sum(len(self.epoch(e)) for e in range(whole)) + (int(frac * len(self.epoch(whole))) if frac else 0)

    def n_targets(self, rows):
        return int(sum(self.sources[i].n_targets[j] for row in rows for i, j in row))



