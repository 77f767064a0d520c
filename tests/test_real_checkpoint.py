"""A checkpoint as Hugging Face writes it runs the whole recipe with the stages' default flags plus
only a step or token budget: puzzle.py -> distill.py (KD from it) -> sft.py -> grpo.py -> sample.py,
each the way its command line runs it (configurator.run_main: a bad input is one `error:` line and
exit 2), in a fresh working directory so that every default path (out/data, out/child, out/sft, ...)
is the one a user gets.
  - a transformers-written Llama (2 layers, 512-token context) carrying the real Llama 3 tokenizer
    (128,256 ids): the defaults must fit a context that is not the nano parent's and a vocabulary
    500x the nano one (chunked logits; the 256 x 16 = 4,096-token batches);
  - the same with a 131,072-token context (Llama 3.1's): no stage may make rows of that length
    (every tensor any stage creates is watched), and the resolved row lengths are the data's.
Run: python -m pytest -q tests/test_real_checkpoint.py"""
import contextlib
import json
import os
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
import distill
import grpo
import puzzle
import sample
import sft
from checkpoint import load_config
from configurator import parse_config, run_main
from runtime import logits_chunk

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3 = os.path.join(ROOT, "..", "shared", "assets", "llama3-tokenizer.model")

# Puzzle's budgets (its defaults: 65,536 BLD tokens, here one step of 8 x 256; 8,192 for each
# held-out pass, here one 256-token window: the replace-1-block scores run 25 models' logits over
# 128,256 ids, 61 s for 512 tokens). --compile=False: the cost stage compiles one decode graph per
# probe, 48 here, 435 s of a 449 s stage on this 2-core CPU; eager decoding times the same probes.
PUZZLE_BUDGET = ["--bld_tokens=2048", "--calib_tokens=256", "--bld_eval_tokens=256", "--score_tokens=256",
                 "--cost_new_tokens=8", "--cost_repeats=1", "--compile=False"]


def hf_llama(folder, vocab_size, context, tokenizer_file=None, tok=None):
    """A random LlamaForCausalLM saved by transformers (config.json, model.safetensors), with the
    tokenizer where a Hugging Face download keeps it: original/tokenizer.model."""
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                                 rope_theta=500000.0, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(c).save_pretrained(folder)
    os.makedirs(os.path.join(folder, "original"))
    if tokenizer_file:
        shutil.copy(tokenizer_file, os.path.join(folder, "original", "tokenizer.model"))
    else:
        tok.save(os.path.join(folder, "original"))


def world_data(workdir, model):
    """out/data as the stages expect it: pretraining shards tokenized with the model's own tokenizer
    (data.py --tokenize_text), SFT rows and RL prompts of the nano world (text: any tokenizer)."""
    out = os.path.join(workdir, "out", "data")
    os.makedirs(out)
    corpus = os.path.join(workdir, "corpus.jsonl")
    with open(corpus, "w") as f:
        for text in data.build_pretrain_corpus(200, seed=0):   # ~26k Llama 3 tokens, 4 documents held out
            f.write(json.dumps({"text": text}) + "\n")
    assert cli(data.main, data.DataConfig, f"--tokenize_text={corpus}", f"--tokenizer={model}",
               f"--out_dir={out}") == 0
    for name, split, n in (("sft_train", "train", 48), ("sft_val", "val", 8)):
        probs = data.generate_problems(data.ADD_TASK, split, n // 2, 1, 2, 5)
        data.write_sft_jsonl([data.sft_example(p, m) for p in probs for m in ("on", "off")],
                             os.path.join(out, f"{name}.jsonl"))
    data.write_rl_jsonl(data.generate_problems(data.ADD_TASK, "train", 40, 2, 6, 8),
                        os.path.join(out, "rl_train.jsonl"))


def cli(main, cls, *argv):
    """What `python SCRIPT ARGV` exits with (0, or 2 after one `error:` line)."""
    try:
        run_main(main, cls, list(argv))
    except SystemExit as e:
        return e.code
    return 0


def train_config(folder):
    with open(os.path.join(folder, "train_config.json")) as f:
        return json.load(f)


class NoDimension(TorchDispatchMode):
    """Fails the op that makes a tensor of >= 2 dimensions with one of at least `limit`: a row, a
    batch of rows, positions, a RoPE table or a KV cache of the context's length. 1-D tensors are
    left out: flat data and storages (a loaded file's, 153,600 elements here) are longer than any
    row. Fails at once, before such a tensor is used (16 rows of 131,072 tokens would need a
    131,072^2 attention)."""
    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and max(t.shape) >= self.limit:
                raise AssertionError(f"{func} made a tensor of shape {tuple(t.shape)}")
        return out


def run_recipe(model, capsys, watch=None, kd_budget=()):
    """puzzle -> KD -> SFT -> GRPO -> sample on `model`, defaults + budgets; returns the stages'
    resolved settings. `watch`: a dispatch mode active during every stage; kd_budget: distill.py
    flags beyond --max_steps=1."""
    watch = watch or contextlib.nullcontext()
    with watch:
        # Puzzle: the default target (1.6x faster decoding) is out of reach when the 128k-id LM head
        # is most of a 2-layer model's decode step: one line that says what is reachable, the
        # library, scores and costs kept; then the MIP alone, under a memory budget
        rc = cli(puzzle.main, puzzle.PuzzleConfig, f"--parent={model}", *PUZZLE_BUDGET)
        err = capsys.readouterr().err.strip().splitlines()
        if rc:
            assert rc == 2 and err[-1].startswith("error: --target_speedup=1.6: no architecture in the search "
                                                  "space reaches it"), err[-3:]
            with open("out/puzzle/costs.json") as f:
                costs = json.load(f)
            pcfg = load_config(model)
            space = puzzle.search_space(pcfg, parse_config(puzzle.PuzzleConfig, [f"--parent={model}"]))
            parent = puzzle.predict(costs, {sub: [space[sub][0]["name"]] * pcfg.num_hidden_layers
                                            for sub in puzzle.SUBS}, 2)
            assert cli(puzzle.main, puzzle.PuzzleConfig, f"--parent={model}", *PUZZLE_BUDGET, "--stage=mip",
                       "--target_speedup=0", f"--max_memory_bytes={parent['memory_bytes'] - 1}") == 0, \
                capsys.readouterr().err[-2000:]
        assert os.path.isfile("out/puzzle/child/model.safetensors")
        # KD of the child from the Hugging Face folder (distill.py's --out_dir default: out/child)
        assert cli(distill.main, distill.DistillConfig, "--init_from=out/puzzle/child", f"--teacher={model}",
                   "--max_steps=1", *kd_budget) == 0, capsys.readouterr().err[-2000:]
        # SFT from out/child (its default --init_from), GRPO from out/sft, sample.py from out/grpo
        assert cli(sft.main, sft.SFTConfig, "--max_steps=1") == 0, capsys.readouterr().err[-2000:]
        assert cli(grpo.main, grpo.GRPOConfig, "--max_steps=1", "--max_new_tokens=16") == 0, \
            capsys.readouterr().err[-2000:]
        capsys.readouterr()
        assert cli(sample.main, sample.SampleConfig, "--ckpt=out/grpo", "--max_new_tokens=8") == 0, \
            capsys.readouterr().err[-2000:]
    answer = capsys.readouterr().out
    return {"puzzle_rc": rc, "kd": train_config("out/child"), "sft": train_config("out/sft"),
            "grpo": train_config("out/grpo"), "answer": answer}


@pytest.mark.skipif(not os.path.isfile(LLAMA3), reason="llama3-tokenizer.model absent")
def test_llama3_folder_runs_every_stage_with_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    llama3 = data.load_tokenizer(LLAMA3)
    model = str(tmp_path / "llama")
    hf_llama(model, llama3.n_vocab, 512, tokenizer_file=LLAMA3)
    world_data(str(tmp_path), model)
    # KD in 2,048-token steps (its default, 4,096, is the other test's): 128,256-id logits of the
    # teacher and the student, recomputed in backward, are most of this test's time
    got = run_recipe(model, capsys, kd_budget=["--total_batch_size=2048"])
    # the 1.6x target: usually refused in one line (then the memory budget, run_recipe checks both), but
    # whether a 2-layer model with a 128k-id head has a 1.6x child depends on timed costs: with the
    # test suite beside a speedrun on the 2-core EPYC one was found (a timed assert is not a test)
    assert got["puzzle_rc"] in (0, 2)
    # rows as long as the data needs, not the 512-token context: KD's at most 2,048 / 16 rows,
    # SFT's the longest sample rounded up (to 256), in 4,096-token batches
    assert (got["kd"]["seq_len"], got["kd"]["total_batch_size"]) == (128, 2048)
    assert (got["sft"]["seq_len"], got["sft"]["total_batch_size"]) == (256, 4096)
    # a 128k vocabulary: the vocabulary-sized losses take 2^26 / 128,256 = 523 tokens per chunk
    assert got["kd"]["vocab_chunk"] == 0 and logits_chunk(llama3.n_vocab) == 523
    assert got["grpo"]["eval_problems"] == 0   # one step: no evaluations
    assert got["answer"].strip()


def test_a_131072_token_context_makes_no_rows_of_that_length(tmp_path, capsys, monkeypatch):
    """Llama 3.1's context in config.json: every stage resolves its rows from the data (256, the
    RL prompts + 16 new tokens), and no tensor any stage makes has a dimension of 131,072 (a row,
    a KV cache or a RoPE table of the context's length would). A small vocabulary (a BPE trained
    here) keeps the run short: the context is what is tested."""
    monkeypatch.chdir(tmp_path)
    tok = data.train_tokenizer(" ".join(data.build_pretrain_corpus(60, seed=1)), 600, str(tmp_path / "tok"),
                               progress=False)
    model = str(tmp_path / "llama")
    hf_llama(model, tok.n_vocab, 131072, tok=tok)
    world_data(str(tmp_path), model)
    with pytest.raises(AssertionError, match="131072"), NoDimension(131072):   # the watch works
        torch.zeros(1, 131072)
    got = run_recipe(model, capsys, NoDimension(131072))
    assert (got["kd"]["seq_len"], got["kd"]["total_batch_size"]) == (256, 4096)
    assert (got["sft"]["seq_len"], got["sft"]["total_batch_size"]) == (256, 4096)
