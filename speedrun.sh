#!/usr/bin/env bash
# The nano Llama-Nemotron recipe end to end on a laptop CPU, as far as its stages exist today:
#   1. data.py      the default world: tokenizer, pretraining corpus, SFT / RL / test sets
#   2. distill.py   pretrain the parent (no teacher)                             -> out/parent
#   3. sample.py    the parent continues text (a base model: --chat=False)
#   4. ranker_eval.py  the second system: offline ranker evaluation                -> out/ranker
# Still to come as their own stages: puzzle.py (NAS child), KD of the child, sft.py, grpo.py.
# Writes out/report.md. Usage: bash speedrun.sh  (~4 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p out
start=$(date +%s)
python data.py 2>&1 | tee out/data.log
python distill.py config/nano_parent_cpu.py 2>&1 | tee out/parent.log
python sample.py --ckpt=out/parent --chat=False --prompt="3+5+2+7 / " --temperature=0 --max_new_tokens=24 \
  > out/parent_sample.txt
python ranker_eval.py --out_dir=out/ranker 2>&1 | tee out/ranker.log
python - "$start" <<'PY'
import json, sys, time
rows = [json.loads(l) for l in open("out/parent/metrics.jsonl")]
train = [r for r in rows if "train_lm" in r]
val = [r for r in rows if "val_lm" in r]
speed = sum(r["tokens_per_s"] for r in train) / len(train)
ranker = json.load(open("out/ranker/results.json"))
lines = ["# nanoNemotron speedrun report", "",
         f"- wall time: {time.time() - int(sys.argv[1]):.0f} s",
         f"- parent: {train[-1]['step']} steps, final train loss {train[-1]['train_lm']:.3f}, "
         f"val loss {val[-1]['val_lm']:.3f}, {speed:,.0f} tokens/s (mean)",
         f"- the parent continues '3+5+2+7 / ' with {open('out/parent_sample.txt').read()!r}",
         "- ranker evaluation, mean relative error per estimator: "
         + ", ".join(f"{k} {v['mean_rel_error']:.3f}" for k, v in ranker["estimators"].items()),
         "", "Plots: out/parent/loss.png, out/ranker/"]
open("out/report.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
