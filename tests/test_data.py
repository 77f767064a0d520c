"""Tests for data.py: tokenizer (Llama 3 file + trained BPE), chat template and mask, tasks and
verifier, splits, token shards, SFT / RL JSONL loaders, the prepare script.
Run: python -m pytest -q tests/test_data.py"""
import base64
import json
import os
import re
import sys
import warnings

import numpy as np
import pytest
import tiktoken.load
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
from runtime import ConfigError, parse_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3 = os.path.join(REPO, "..", "shared", "assets", "llama3-tokenizer.model")
needs_llama3 = pytest.mark.skipif(not os.path.isfile(LLAMA3), reason="llama3-tokenizer.model absent")

CORPUS = "\n\n".join(data.build_pretrain_corpus(150, seed=0)) + " hello world" * 300


@pytest.fixture(scope="module")
def llama3():
    return data.load_tokenizer(LLAMA3)


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return data.train_tokenizer(CORPUS, 700, str(folder), progress=False), str(folder)


def write_byte_ranks(path):
    with open(path, "wb") as f:
        for b in range(256):
            f.write(base64.b64encode(bytes([b])) + b" %d\n" % b)


# ---------------------------------------------------------------------------- Llama 3 tokenizer

@needs_llama3
def test_llama3_check_values(llama3):
    assert llama3.n_vocab == 128256 and llama3.n_ranks == 128000
    assert llama3.encode("Hello world") == [9906, 1917]
    ids, mask = llama3.render_chat([{"role": "user", "content": "Hi"}], reasoning="on")
    assert ids[:10] == [128000, 128006, 9125, 128007, 271, 67, 10319, 7422, 389, 128009]
    assert set(mask) == {0}
    sp = llama3.special_tokens
    assert (sp["<|begin_of_text|>"], sp["<|end_of_text|>"], sp["<|finetune_right_pad_id|>"],
            sp["<|start_header_id|>"], sp["<|end_header_id|>"], sp["<|eom_id|>"], sp["<|eot_id|>"],
            sp["<|python_tag|>"], sp["<|reserved_special_token_3|>"],
            sp["<|reserved_special_token_247|>"]) == (128000, 128001, 128004, 128006, 128007,
                                                       128008, 128009, 128010, 128011, 128255)
    assert llama3.stop_ids == [128001, 128008, 128009] and llama3.pad_id == 128004
    assert llama3.bos_id == 128000 and llama3.eot_id == 128009


@needs_llama3
def test_llama3_special_strings_stay_text(llama3):
    ids = llama3.encode("say <|eot_id|> and <|begin_of_text|>")
    assert all(i < 128000 for i in ids)
    assert llama3.decode(ids) == "say <|eot_id|> and <|begin_of_text|>"
    ids, mask = llama3.render_chat([{"role": "user", "content": "x <|eot_id|> y"}])
    assert ids.count(128009) == 2           # the system turn's and the user turn's own
    assert llama3.decode([128009]) == "<|eot_id|>"


@needs_llama3
@settings(max_examples=150, deadline=None)
@given(st.text())
def test_llama3_roundtrip_unicode(llama3, s):
    assert llama3.decode(llama3.encode(s)) == s


@needs_llama3
def test_llama3_folder_layouts(tmp_path, llama3):
    os.makedirs(tmp_path / "original")
    os.symlink(os.path.abspath(LLAMA3), tmp_path / "original" / "tokenizer.model")
    tok = data.load_tokenizer(str(tmp_path))
    assert tok.encode("Hello world") == [9906, 1917] and tok.eot_id == 128009
    tok.save(str(tmp_path / "ckpt"))
    tok2 = data.load_tokenizer(str(tmp_path / "ckpt"))
    assert tok2.special_tokens == llama3.special_tokens and tok2.n_vocab == 128256


# ---------------------------------------------------------------------------- other tiktoken files

def test_byte_level_file_default_specials(tmp_path):
    write_byte_ranks(tmp_path / "tokenizer.model")
    tok = data.load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert tok.n_vocab == 512 and tok.bos_id == 256 and tok.eot_id == 265 and tok.pad_id == 260
    assert tok.stop_ids == [257, 264, 265]
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([104, 512])


def test_hf_tokenizer_config_gives_specials(tmp_path):
    os.makedirs(tmp_path / "original")
    write_byte_ranks(tmp_path / "original" / "tokenizer.model")
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eot_id|>"]
    cfg = {"added_tokens_decoder": {str(300 + i): {"content": n} for i, n in enumerate(names)}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = data.load_tokenizer(str(tmp_path))
    assert tok.bos_id == 300 and tok.eot_id == 304 and tok.n_vocab == 305
    assert tok.pad_id == tok.eos_id == 301 and tok.stop_ids == [301, 304]


def test_bad_ranks_file_names_line(tmp_path):
    p = tmp_path / "tokenizer.model"
    write_byte_ranks(p)
    with open(p, "ab") as f:
        f.write(b"not-base64!! 256\n")
    with pytest.raises(data.DataError, match=r"tokenizer.model:257"):
        data.load_tokenizer(str(p))
    write_byte_ranks(p)
    with open(p, "ab") as f:
        f.write(base64.b64encode(b"ab") + b" 300\n")          # gap in ranks
    with pytest.raises(data.DataError, match="ranks must be exactly"):
        data.load_tokenizer(str(p))


# ---------------------------------------------------------------------------- trained BPE

def test_trained_tokenizer_format_and_roundtrip(small_tok, monkeypatch):
    tok, folder = small_tok
    assert tok.n_vocab == 700 and tok.n_ranks == 444
    assert tok.special_tokens["<|begin_of_text|>"] == 444 and tok.eot_id == 444 + 9
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")               # no stale cache of the path
    ranks = tiktoken.load.load_tiktoken_bpe(os.path.join(folder, "tokenizer.model"))
    assert ranks == tok.mergeable_ranks
    again = data.load_tokenizer(folder)
    assert again.special_tokens == tok.special_tokens and again.pattern == tok.pattern
    text = CORPUS[:5000]
    assert again.encode(text) == tok.encode(text) and tok.decode(tok.encode(text)) == text
    # the merges compress: the frequent word is one token, the corpus far below 1 token/byte
    assert len(tok.encode(" hello")) == 1
    assert len(tok.encode(text)) < 0.6 * len(text.encode())


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_trained_tokenizer_roundtrip_unicode(small_tok, s):
    tok = small_tok[0]
    assert tok.decode(tok.encode(s)) == s


def test_trainer_deterministic_and_rejects_tiny_vocab(tmp_path):
    a = data.train_tokenizer(CORPUS[:20000], 560, str(tmp_path / "a"), progress=False)
    b = data.train_tokenizer(CORPUS[:20000], 560, str(tmp_path / "b"), progress=False)
    assert a.mergeable_ranks == b.mergeable_ranks
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer("abc", 400, str(tmp_path / "c"), progress=False)
    with pytest.raises(ValueError, match="corpus too small"):
        data.train_tokenizer("ab ab", 600, str(tmp_path / "d"), progress=False)
    data.train_tokenizer(CORPUS[:20000], 560, str(tmp_path / "e" / "small.model"), progress=False)
    assert data.load_tokenizer(str(tmp_path / "e" / "small.model")).mergeable_ranks == a.mergeable_ranks


# ---------------------------------------------------------------------------- chat template

def masked_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_render_chat_mask_and_history(small_tok):
    tok = small_tok[0]
    msgs = [{"role": "user", "content": " Q1 "},
            {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "<think>\nnew thoughts\n</think>\n\nA2\n"}]
    ids, mask = tok.render_chat(msgs, reasoning="on")
    assert len(ids) == len(mask)
    text = tok.decode(ids)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "detailed thinking on<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n"
                    "<think>\nnew thoughts\n</think>\n\nA2<|eot_id|>")
    assert masked_text(tok, ids, mask) == "A1<|eot_id|><think>\nnew thoughts\n</think>\n\nA2<|eot_id|>"
    # the masked tokens are exactly the assistant content + eot (no header token is masked)
    assert [i for i, m in zip(ids, mask) if m and i in (tok.start_header_id, tok.end_header_id)] == []
    assert mask[-1] == 1 and ids[-1] == tok.eot_id


def test_render_chat_system_and_generation_prompt(small_tok):
    tok = small_tok[0]
    conv = [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "hi"}]
    ids, mask = tok.render_chat(conv, add_generation_prompt=True)
    assert ids == tok.render_prompt("hi", "off")
    assert tok.decode(ids).endswith("hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert set(mask) == {0}
    with pytest.raises(ValueError, match="conflicts"):
        tok.render_chat(conv, reasoning="on")
    ids, _ = tok.render_chat([{"role": "user", "content": "hi"}])          # no system: empty one
    assert tok.decode(ids).startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>"
                                      "\n\n<|eot_id|><|start_header_id|>user")
    ids, _ = tok.render_chat([{"role": "user", "content": "a <|eot_id|> b"}])
    assert ids.count(tok.eot_id) == 2
    with pytest.raises(ValueError, match="role"):
        tok.render_chat([{"role": "tool", "content": "x"}])


def test_render_chat_history_drops_reasoning_before_a_generation_prompt(small_tok):
    """Multi-turn chat as sample.py's REPL renders it: the conversation ends on a user turn with a
    generation prompt, so every assistant turn is history and keeps only its answer, the last one
    included (only a final assistant turn, the training target, keeps its think block)."""
    tok = small_tok[0]
    msgs = [{"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nfirst thoughts\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "<think>\nsecond thoughts\n</think>\n\nA2"},
            {"role": "user", "content": "Q3"}]
    ids, mask = tok.render_chat(msgs, reasoning="on", add_generation_prompt=True)
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                               "detailed thinking on<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nQ3<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert masked_text(tok, ids, mask) == "A1<|eot_id|>A2<|eot_id|>"
    without = tok.render_chat(msgs, reasoning="on")[0]     # same history without the prompt
    assert ids[:len(without)] == without


def test_split_reasoning_and_format():
    assert data.split_reasoning("<think>\nR1\nR2\n</think>\n\nA") == ("R1\nR2", "A")
    assert data.split_reasoning("  just 7 ") == (None, "just 7")
    assert data.split_reasoning("<think>\ncut off") == ("cut off", "")
    # the last </think> ends the reasoning, as the chat template cuts earlier assistant turns
    assert data.split_reasoning("<think>\na</think>b\n</think>\n\nA") == ("a</think>b", "A")
    assert data.check_format("<think>\nr\n</think>\n\n7", "on")
    assert not data.check_format("7", "on")
    assert not data.check_format("<think>r</think><think>r</think>7", "on")
    assert not data.check_format("<think>\nr\n</think>\n\n", "on")
    assert not data.check_format("<think>\nr\n</think>\n\n7</think>", "on")
    assert data.extract_answer("<think>\n7") == "" and data.extract_answer(" 7\n") == "7"
    assert data.check_format("7", "off") and not data.check_format("<think>r</think>7", "off")


# ---------------------------------------------------------------------------- tasks and verifier

def test_addmod_trace_has_hints_and_fixed_width_lines():
    p = data.addmod_problem([3, 5, 2, 7])
    assert p["prompt"] == "Add mod 10: v3+w5+x2+y7+z." and p["answer"] == "7"
    assert p["trace"] == "v3+w5=8\n8+x2=0\n0+y7=7\n7+z."
    assert data.chain_text([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2 + [0] * 6).count("a") == 1  # 26 letters, each once
    starts = []
    for p in data.generate_problems("addmod10", "train", 200, seed=1):
        lines = p["trace"].splitlines()
        assert len(lines) == p["k"] and lines[-2].endswith("=" + p["answer"])
        assert int(p["answer"]) == sum(p["operands"]) % 10
        hinted = p["prompt"].removeprefix("Add mod 10: ").removesuffix(".").split("+")  # ['v3', ..., 'z']
        end = hinted.pop()
        a = "abcdefghijklmnopqrstuvwxyz".index(hinted[0][0])             # consecutive letters, z -> a
        assert hinted == [f"{'abcdefghijklmnopqrstuvwxyz'[(a + i) % 26]}{d}" for i, d in enumerate(p["operands"])]
        assert end == "abcdefghijklmnopqrstuvwxyz"[(a + p["k"]) % 26]   # the letter after the last
        assert lines[-1] == f"{p['answer']}+{end}."                    # the stop: `7+z.`
        starts.append(a)
        assert lines[0] == f"{hinted[0]}+{hinted[1]}={sum(p['operands'][:2]) % 10}"
        total = int(lines[0][-1])
        for i, line in enumerate(lines[1:-1], start=2):   # the running total + the next hinted operand
            assert line == f"{total}+{hinted[i]}={(total + p['operands'][i]) % 10}"
            assert len(line) == 6                       # the same width at every k
            total = int(line[-1])
    assert len(set(starts)) >= 20   # chains start at every letter (SFT's short chains use them all)
    for bad in ([3], [1] * 26, [3, 10]):   # 26 operands leave no letter for the stop
        with pytest.raises(ValueError, match="single digits"):
            data.addmod_problem(bad)


def test_verifier_accepts_references_rejects_perturbed():
    probs = (data.generate_problems("addmod10", "test", 60, seed=2, k_min=3)
             + data.generate_problems("chat", "test", 60, seed=2))
    assert {p["task"] for p in probs} == set(data.TASKS)
    for p in probs:
        on, off = data.problem_response(p, "on"), data.problem_response(p, "off")
        assert data.verify(p, on) and data.verify(p, off) and data.check_format(on, "on")
        assert data.verify(p, "  \n" + on.replace("\n\n", "\n \n  ") + "  ")      # whitespace
        assert not data.verify(p, on + " 1") and not data.verify(p, "x" + off)
        assert not data.verify(p, on.split("</think>")[0])                        # unclosed think
        assert not data.verify(p, "<think>\n" + p["answer"] + "\n</think>\n\n")   # answer in thought
    p = data.addmod_problem([1, 2, 3])
    for wrong in ("5", "16", "6.", "", "6 6"):
        assert not data.verify(p, wrong)
    assert data.verify(p, "6") and data.verify({"answer": "6"}, "<think>\n..\n</think>\n\n 6 ")


def test_splits_disjoint_deterministic():
    sets = {s: data.generate_problems("addmod10", s, 300, seed=3, k_min=3, k_max=5, unique=True)
            + data.generate_problems("chat", s, 300, seed=3, unique=True)
            for s in ("train", "val", "test")}
    prompts = {s: {p["prompt"] for p in ps} for s, ps in sets.items()}
    assert all(len(v) == 600 for v in prompts.values())
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"]
                or prompts["val"] & prompts["test"])
    assert all(data.problem_split(p) == s for s, ps in sets.items() for p in ps)
    again = data.generate_problems("addmod10", "val", 300, seed=3, k_min=3, k_max=5, unique=True)
    assert again == sets["val"][:300]
    assert data.generate_problems("addmod10", "val", 50, seed=4, k_min=3, k_max=5) != again[:50]
    with pytest.raises(ValueError, match="too small"):     # k=2 has 100 problems, ~10 in test
        data.generate_problems("addmod10", "test", 50, seed=0, k_min=2, k_max=2, unique=True)
    with pytest.raises(ValueError, match="unknown task"):
        data.generate_problems("nope", "train", 1, seed=0)


def test_capacity_floor_is_a_lower_bound_and_spares_the_count(monkeypatch):
    """Evaluations size their chains per k from split_capacity_floor and count a k's 10^k prompts
    only where the floor is not enough (it was ~14 s for k = 3..6 in every sample.py --eval)."""
    for split in ("val", "test"):
        for k in range(2, 6):
            assert data.split_capacity_floor(split, k) <= data.split_capacity(split, k), (split, k)
    real, counted = data.split_capacity, []
    monkeypatch.setattr(data, "split_capacity", lambda s, k: counted.append(k) or real(s, k))
    per_k = data.chains_per_k("test", 1500, 3, 12)   # speedrun.sh's 1,500 test chains
    assert per_k[3] == real("test", 3) // 2 and sum(per_k.values()) == 1500
    assert set(per_k.values()) - {per_k[3]} <= {161, 162}
    from runtime import check_heldout_size
    check_heldout_size("n", 2500, "test")
    assert set(counted) == {3}
    with pytest.raises(ValueError, match="too few distinct chains"):   # k = 4: 969 in test, 484 drawable
        data.chains_per_k("test", 485, 4, 4)
    assert 4 in counted


def test_pretrain_corpus_states_no_heldout_chat_answer():
    """Word sentences and number runs answer chat tasks; none may answer a val/test problem."""
    text = "\n".join(data.build_pretrain_corpus(600, seed=5))
    stated = set()
    for m in re.finditer(r"The list ([a-z ]+) has \d+ words|said: ([a-z ]+)\. Then", text):
        words = (m.group(1) or m.group(2)).split()
        stated |= {data.problem_split(data.chat_problem(t, words)) for t in ("echo", "count", "last", "list")}
    for m in re.finditer(r"Counting: ([\d, ]+)\.", text):
        nums = [int(x) for x in m.group(1).split(", ")]
        stated |= {data.problem_split(data.chat_problem("next", [n])) for n in nums[:-1]}
    assert stated == {"train"}


def test_pretrain_corpus_has_no_heldout_chain():
    docs = data.build_pretrain_corpus(400, seed=5)
    assert docs == data.build_pretrain_corpus(400, seed=5)
    text = "\n".join(docs)
    assert "<think>" not in text and "<|" not in text
    # the problems the documents state: "To add a3+b5+c2 modulo 10", "a3+b5+c2 = 0 (mod 10)", and
    # a trace on one line, "a3+b5=8 then 8+c2=0." (its hinted operands are the chain's)
    c = r"([a-z]\d(?:\+[a-z]\d)+)"
    chains = set(re.findall(rf"To add {c} modulo 10|^{c} = \d \(mod 10\)", text, re.M))
    chains = {"".join(re.findall(r"[a-z](\d)", x)) for tup in chains for x in tup if x}
    chains |= {"".join(re.findall(r"[a-z](\d)", m)) for m in re.findall(r"^a\d\+b\d=\d(?: then \d\+[a-z]\d=\d)*\.$", text, re.M)}
    assert len(chains) > 300
    splits = {data.problem_split(data.addmod_problem([int(c) for c in ch])) for ch in chains}
    assert splits == {"train"}


# ---------------------------------------------------------------------------- token shards

def test_token_shards_roundtrip_and_checks(tmp_path):
    docs = [[7, 1, 2, 3], [7, 4], [7, 60000, 5]]
    idx = data.write_token_shards(docs, str(tmp_path / "a"), np.uint16, bos_id=7, shard_tokens=4)
    assert idx["n_tokens"] == 9 and idx["n_docs"] == 3 and len(idx["shards"]) == 2
    arr = data.load_token_shards(str(tmp_path / "a"), n_vocab=65536)
    assert arr.dtype == np.uint16 and arr.tolist() == sum(docs, [])
    assert np.flatnonzero(arr == 7).tolist() == [0, 4, 6]          # document starts
    with pytest.raises(data.DataError, match="n_vocab"):
        data.load_token_shards(str(tmp_path / "a"), n_vocab=1000)
    with pytest.raises(data.DataError, match="cannot hold"):
        data.load_token_shards(str(tmp_path / "a"), n_vocab=128256)
    assert data.dtype_for_vocab(768) == np.uint16 and data.dtype_for_vocab(128256) == np.uint32
    data.write_token_shards([[128000, 128255]], str(tmp_path / "b"), np.uint32)   # bos inferred
    assert data.load_token_shards(str(tmp_path / "b")).tolist() == [128000, 128255]
    with pytest.raises(ValueError, match="does not fit"):
        data.write_token_shards([[7, 70000]], str(tmp_path / "c"), np.uint16, bos_id=7)
    with pytest.raises(ValueError, match="document 1"):
        data.write_token_shards([[7, 1], [1, 7]], str(tmp_path / "c"), np.uint16)
    with open(tmp_path / "a" / "shard_000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(data.DataError, match="shard_000.bin"):
        data.load_token_shards(str(tmp_path / "a"))


def test_masked_shards_roundtrip(tmp_path):
    """The loss mask travels beside the tokens (mask_XXX.bin) and must match them document by document."""
    docs, masks = [[7, 1, 2, 3], [7, 4], [7, 5, 6]], [[0, 0, 1, 1], [0, 1], [1, 1, 1]]
    data.write_token_shards(docs, str(tmp_path / "m"), np.uint16, bos_id=7, shard_tokens=4, masks=masks)
    ids, mask = data.load_token_shards(str(tmp_path / "m"), n_vocab=768, with_mask=True)
    assert ids.tolist() == sum(docs, []) and mask.tolist() == sum(masks, [])
    data.write_token_shards(docs, str(tmp_path / "n"), np.uint16, bos_id=7)
    assert data.load_token_shards(str(tmp_path / "n"), with_mask=True)[1] is None   # no mask: all targets
    with pytest.raises(ValueError):
        data.write_token_shards(docs, str(tmp_path / "bad"), np.uint16, bos_id=7, masks=[[1], [1, 1], [1, 1, 1]])


def test_copy_documents_mask_only_the_second_copies(small_tok):
    """A copy exercise's loss falls on its second copies: the masked text of each span equals its
    unmasked first copy, and no held-out echo problem or chain is stated in a training document."""
    tok = small_tok[0]
    docs = data.build_copy_documents(tok, 40, seed=3, split="train")
    assert all(ids[0] == tok.bos_id and len(ids) == len(m) and m[0] == 0 for ids, m in docs)
    assert all(sum(m) > 0 for _, m in docs)
    for (ids, m) in docs:
        runs, cur = [], []
        for t, k in zip(ids, m):
            if k:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        whole = tok.decode(ids)
        for r in runs:
            span = tok.decode(r)
            if span.startswith("- "):                    # copied as a list: its words were a span
                words = [w[2:] for w in span.split("\n")]
                assert all(w.startswith("- ") for w in span.split("\n")), span
                assert f"listed: {' '.join(words)}\n" in whole, span
            else:
                assert whole.count(span) >= 2, span     # each target span was written before
    a = data.build_copy_documents(tok, 5, seed=3, split="train")
    assert a == docs[:5]                               # deterministic in (seed, split)


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("which", ["small", "llama3"])
def test_copy_answers_reuse_the_prompt_tokens(which, small_tok):
    """Echo and last answer with the words after a word and a colon, as the prompt has them, so
    each copied word is the very token sequence of the prompt (a bare answer starts a line, where
    Llama 3's pre-tokenisation spells a word in other pieces: `duck` -> `d` `uck`, ` duck` is one)."""
    if which == "llama3":
        if not os.path.exists(LLAMA3):
            pytest.skip("Llama 3 tokenizer asset absent")
        tok = data.load_tokenizer(LLAMA3)
    else:
        tok = small_tok[0]
    for task in ("echo", "last"):
        for p in data.generate_problems(task, "train", 30, seed=5):
            words = p["args"] if task == "echo" else p["args"][-1:]
            copied = tok.encode(" " + " ".join(words))
            assert p["answer"].endswith(" " + " ".join(words))
            assert _contains(tok.encode(p["prompt"]), copied), p
            assert tok.encode(p["answer"])[-len(copied):] == copied, p
            assert data.verify(p, p["answer"]) and not data.verify(p, " ".join(words) + " x")
    # the bare word at a line start is other tokens than after a space (why the answers have a lead)
    assert tok.encode("\n\nduck")[1:] != tok.encode(" duck") or which == "small"


# ---------------------------------------------------------------------------- JSONL

def test_sft_jsonl_roundtrip_and_string_input(tmp_path, small_tok):
    tok = small_tok[0]
    probs = data.generate_problems("addmod10", "train", 3, seed=6) + \
        data.generate_problems("chat", "train", 2, seed=6)
    rows = [data.sft_example(p, m) for p in probs for m in ("on", "off")]
    markup = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking on"
              "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\nx\n</think>\n\nA1<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    rows.append({"input": markup, "output": "<think>\ny\n</think>\n\nA2<|eot_id|>", "reasoning": "on",
                 "system_prompt": "", "category": "chat"})
    rows.append({"input": "plain question", "output": "ok", "reasoning": "off", "system_prompt": ""})
    path = str(tmp_path / "sft.jsonl")
    data.write_sft_jsonl(rows, path)
    exs = data.load_sft_jsonl(path, tokenizer=tok)
    assert len(exs) == len(rows)
    for ex, row in zip(exs[:10], rows):
        assert ex["messages"][0] == {"role": "system", "content": row["system_prompt"]}
        assert ex["messages"][-1]["content"] == row["output"]
        assert masked_text(tok, ex["ids"], ex["mask"]) == row["output"] + "<|eot_id|>"
    m = exs[10]["messages"]
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant"]
    assert m[0]["content"] == "detailed thinking on" and m[3]["content"] == "Q2"
    assert masked_text(tok, exs[10]["ids"], exs[10]["mask"]) == \
        "A1<|eot_id|><think>\ny\n</think>\n\nA2<|eot_id|>"
    assert exs[11]["messages"][0]["content"] == "detailed thinking off"
    assert exs[11]["messages"][1] == {"role": "user", "content": "plain question"}


def test_sft_jsonl_errors_and_max_len(tmp_path, small_tok):
    tok = small_tok[0]
    good = json.dumps({"input": [{"role": "user", "content": "hi"}], "output": "x" * 40,
                       "reasoning": "off", "system_prompt": "detailed thinking off"})
    short = json.dumps({"input": "hi", "output": "yo", "reasoning": "on"})
    p = tmp_path / "s.jsonl"
    p.write_text(short + "\n\n" + good + "\n{broken\n")
    with pytest.raises(data.DataError, match=r"s\.jsonl:4: malformed JSON"):
        data.load_sft_jsonl(str(p))
    p.write_text(json.dumps({"input": "hi", "output": "o", "reasoning": "on",
                             "system_prompt": "detailed thinking off"}) + "\n")
    with pytest.raises(data.DataError, match=r"s\.jsonl:1: system prompt 'detailed thinking off' contradicts"):
        data.load_sft_jsonl(str(p))
    p.write_bytes(short.encode() + b"\n" + b'{"input": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=r"s\.jsonl:2: not valid UTF-8"):
        data.load_sft_jsonl(str(p))
    p.write_text(short + "\n" + json.dumps({"input": "hi", "reasoning": "on"}) + "\n")
    with pytest.raises(data.DataError, match=r"s\.jsonl:2: missing field 'output'"):
        data.load_sft_jsonl(str(p))
    p.write_text(json.dumps({"input": "hi", "output": "o", "reasoning": "maybe"}) + "\n")
    with pytest.raises(data.DataError, match=r":1: field 'reasoning'"):
        data.load_sft_jsonl(str(p))
    p.write_text(json.dumps({"input": [{"role": "user"}], "output": "o", "reasoning": "on"}) + "\n")
    with pytest.raises(data.DataError, match=r":1: input\[0\] needs fields"):
        data.load_sft_jsonl(str(p))
    p.write_text(json.dumps({"input": [{"role": "user", "content": 3}], "output": "o",
                             "reasoning": "on"}) + "\n")
    with pytest.raises(data.DataError, match=r":1: input\[0\] field 'content'"):
        data.load_sft_jsonl(str(p))
    p.write_text("\n".join([short, good, good, short]) + "\n")
    n_short = len(data.load_sft_jsonl(str(p), tokenizer=tok)[0]["ids"])
    with pytest.warns(UserWarning, match=r"skipped 2 of 4 examples longer than max_len"):
        exs = data.load_sft_jsonl(str(p), tokenizer=tok, max_len=n_short)
    assert [e["line"] for e in exs] == [1, 4] and all(len(e["ids"]) <= n_short for e in exs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(data.load_sft_jsonl(str(p), tokenizer=tok, max_len=10_000)) == 4


def test_rl_jsonl(tmp_path):
    probs = data.generate_problems("addmod10", "train", 5, seed=7)
    probs[0]["pass_rate"] = 0.5
    path = str(tmp_path / "rl.jsonl")
    data.write_rl_jsonl(probs, path)
    back = data.load_rl_jsonl(path)
    assert back == probs and all(data.verify(p, data.problem_response(p, "on")) for p in back)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "answer": "1"}\n{"prompt": "p"}\n')
    with pytest.raises(data.DataError, match=r"bad\.jsonl:2: missing field 'answer'"):
        data.load_rl_jsonl(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "answer": "1", "pass_rate": 1.5}\n')
    with pytest.raises(data.DataError, match="pass_rate"):
        data.load_rl_jsonl(str(tmp_path / "bad.jsonl"))


# ---------------------------------------------------------------------------- CLI / prepare

def test_parse_overrides():
    cfg = parse_config(data.DataConfig, ["--seed=5", "--chat_frac=0.5", "--sft_train=1e3"])
    assert cfg.seed == 5 and cfg.chat_frac == 0.5 and cfg.sft_train == 1000
    with pytest.raises(ConfigError, match="valid keys: .*out_dir.*seed"):
        parse_config(data.DataConfig, ["--nope=1"])
    with pytest.raises(ConfigError, match="--seed"):
        parse_config(data.DataConfig, ["--seed=abc"])


def test_tokenize_local_corpus(tmp_path):
    """A local corpus tokenized with an existing tokenizer (here one trained in the test)."""
    tok = data.train_tokenizer("the cat sat on the mat. " * 200, 520, str(tmp_path / "tok"))
    (tmp_path / "a.txt").write_text("the cat sat")
    (tmp_path / "b.jsonl").write_text('{"text": "on the mat"}\n{"text": "the end"}\n')
    cfg = data.DataConfig(out_dir=str(tmp_path / "out"), tokenizer=str(tmp_path / "tok"), val_every=3,
                          tokenize_text=f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}")
    data.tokenize_corpus(cfg)
    train = data.load_token_shards(str(tmp_path / "out" / "pretrain_train"), n_vocab=tok.n_vocab)
    val = data.load_token_shards(str(tmp_path / "out" / "pretrain_val"), n_vocab=tok.n_vocab)
    assert list(train) == [tok.bos_id] + tok.encode("the cat sat") + [tok.bos_id] + tok.encode("on the mat")
    assert list(val) == [tok.bos_id] + tok.encode("the end")
    assert data.load_tokenizer(str(tmp_path / "out")).encode("the mat") == tok.encode("the mat")
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{"txt": "y"}\n')
    with pytest.raises(data.DataError, match=r"c.jsonl:2: missing field 'text'"):
        data.tokenize_corpus(data.DataConfig(out_dir=str(tmp_path / "o2"), tokenizer=str(tmp_path / "tok"),
                                             tokenize_text=str(tmp_path / "c.jsonl")))


def test_prepare_small_world(tmp_path):
    cfg = parse_config(data.DataConfig, [
        f"--out_dir={tmp_path}", "--tokenizer_chars=300000", "--pretrain_tokens=20000",
        "--pretrain_val_tokens=3000", "--sft_train=200", "--sft_val=40", "--rl_train=50",
        "--val_per_k=5", "--test_per_k=5", "--test_chat=20", "--instruct_train=30", "--instruct_val=6"])
    sizes = data.prepare(cfg)
    tok = data.load_tokenizer(str(tmp_path))
    # the instruct rows: SFT schema, direct answers ("off", no think block)
    inst = data.load_sft_jsonl(str(tmp_path / "instruct_train.jsonl"), tokenizer=tok)
    assert len(inst) == 30 and {e["reasoning"] for e in inst} == {"off"}
    assert len(data.load_sft_jsonl(str(tmp_path / "instruct_val.jsonl"), tokenizer=tok)) == 6
    assert tok.n_vocab == 768
    train = data.load_token_shards(str(tmp_path / "pretrain_train"), n_vocab=tok.n_vocab)
    assert len(train) == sizes["pretrain_train"]["tokens"] >= 20000 and train.dtype == np.uint16
    assert (train == tok.bos_id).sum() == sizes["pretrain_train"]["docs"]
    sft = data.load_sft_jsonl(str(tmp_path / "sft_train.jsonl"), tokenizer=tok)
    assert len(sft) == 200 and {e["reasoning"] for e in sft} == {"on", "off"}
    assert sum(len(e["ids"]) for e in sft) == sizes["sft_train"]["tokens"]
    rl = data.load_rl_jsonl(str(tmp_path / "rl_train.jsonl"))
    test = data.load_rl_jsonl(str(tmp_path / "test_problems.jsonl"))
    val = data.load_rl_jsonl(str(tmp_path / "val_problems.jsonl"))
    assert len(rl) == 50 and len(test) == 10 * 5 + 20 and len(val) == 10 * 5 + 20
    assert {p["prompt"] for p in test}.isdisjoint(p["prompt"] for p in rl + val)
    assert {p["k"] for p in test if p["task"] == "addmod10"} == set(range(3, 13))
    # SFT chains stop at --sft_k_max=8; RL prompts go on past them to k_max=12 (and the test)
    rows = [json.loads(line) for line in open(tmp_path / "sft_train.jsonl")]
    chains = [r for r in rows if r["task"] == "addmod10"]
    assert {r["k"] for r in chains} == set(range(2, 9)) and len(chains) == 150
    assert {p["k"] for p in rl} == set(range(9, 13))   # RL: --rl_k_min=9..k_max
    # the pretraining text and conversations hold chains of k <= --pretrain_k_max=8 only
    text = "\n".join(data.build_pretrain_corpus(300, 5, "train", cfg.k_min, cfg.pretrain_k_max))
    longest = max(len(m) for m in re.findall(r"(?:[a-z]\d\+)+[a-z]\d", text))
    assert longest == 3 * 8 - 1                # `a1+b2+...+h8` (23 characters): 8 operands, never more
