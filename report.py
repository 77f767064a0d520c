"""
report.py: the speedrun's report card, the paper's story retold with the numbers of one nano run.

    python report.py --out_dir=out        (speedrun.sh runs it last)

Reads what the stages and the evaluation wrote under --out_dir: logs/*.seconds (wall time per
stage), eval/*.json (sample.py --eval / --bench results: every accuracy and throughput here comes
from sample.py on the same held-out problems), puzzle/assemble.json + layout.txt (the child's layout,
predicted speed-up, the homogeneous control), and the stages' metrics.jsonl. Writes report.json (the numbers),
report.md (tables, the plots below, the paper's numbers beside the nano ones), accuracy_by_k.png and
curves.png. A number that a stage did not produce is an error naming the missing file, never a
blank in the table.
"""
import os
import platform
from dataclasses import dataclass

import torch

from checkpoint import load_config
from configurator import ConfigError, atomic_write, check_readable, read_json_object, run_main, write_json
from data import ADD_TASK, CHAT_TASKS, EVAL_K_MAX, EVAL_K_MIN
from model import count_params, kv_bytes_per_token
from runtime import moving_average, read_metrics

MODELS = ("parent", "child", "sft", "grpo")
STAGES = ("data", "parent", "puzzle", "kd", "sft", "grpo", "eval")
PAPER = {  # Llama-Nemotron, tables 3-5 and sec. 2 (see ../shared/notes/llama-nemotron.md)
    "LN-Ultra 253B": {"GPQA-Diamond": "76.0 / 56.6", "MATH500": "97.0 / 80.4", "AIME25": "72.5 / 16.7"},
    "LN-Super 49B": {"GPQA-Diamond": "66.7 / 50.0", "MATH500": "96.6 / 74.0", "AIME25": ""},
    "LN-Nano 8B": {"GPQA-Diamond": "", "MATH500": "95.4 / 36.6", "AIME25": ""},
}


@dataclass
class ReportConfig:
    out_dir: str = "out"

    def validate(self):
        check_readable(self.out_dir, "out_dir", "dir")


class Doc(dict):
    """A JSON object read from `path`: a missing field is an error naming the file and the field."""

    def __init__(self, data, path):
        super().__init__(data)
        self.path = path

    def __missing__(self, key):
        raise ConfigError(f"report: {self.path}: field {key!r} is missing (not a file its stage wrote? "
                          f"redo the stage, see speedrun.sh)")


def _json(path):
    if not os.path.isfile(path):
        raise ConfigError(f"report: {path} is missing (did its stage run? see speedrun.sh)")
    return read_json_object(path, context="report: ", expected="an object", hint="; redo its stage",
                            object_hook=lambda d: Doc(d, path))


def _seconds(path):
    text = open(path, encoding="utf-8", errors="replace").read().strip()
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"report: {path}: {text[:40]!r} is not a whole number of seconds "
                          f"(speedrun.sh writes the stage's wall time there)") from None


def _number(doc, key):
    v = doc[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"report: {getattr(doc, 'path', '?')}: field {key!r} is {v!r}, not a number")
    return v


def _metrics(out, m):
    path = os.path.join(out, m, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"report: {path} is missing (the {m} stage's log; did it run? see speedrun.sh)")
    return read_metrics(path)


def collect(out):
    ev = lambda name: _json(os.path.join(out, "eval", f"{name}.json"))
    r = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
         else f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}"}
    r["seconds"] = {}
    for s in STAGES:
        p = os.path.join(out, "logs", f"{s}.seconds")
        if os.path.isfile(p):
            r["seconds"][s] = _seconds(p)
    r["seconds"]["total"] = sum(r["seconds"].values())
    evals = {m: {mode: ev(f"{m}_{mode}") for mode in ("on", "off")} for m in MODELS}
    bench = ev("bench")  # sample.py --ckpt=child --bench=True --baseline=parent
    for m in ("parent", "child"):
        cfg = load_config(os.path.join(out, m))
        b = bench if m == "child" else bench["baseline"]
        if not isinstance(b, dict):
            raise ConfigError(f"report: {bench.path}: field 'baseline' is {b!r}, expected the baseline's timings")
        on, off = evals[m]["on"], evals[m]["off"]
        # the parent and child are instruct models: judged on the direct-answer (chat) tasks, in their
        # better mode (neither has been taught the toggle, so the modes differ only in the system prompt)
        for e in (on, off):   # a damaged eval file is named by its first bad field
            _number(e, "accuracy"), _number(e, "think_rate")
        chat = {mode: subset_accuracy(evals[m][mode], CHAT_TASKS) for mode in ("on", "off")}
        best = max(("on", "off"), key=lambda mode: chat[mode][0])
        r[m] = {"params": count_params(cfg), "kv_bytes_per_token": kv_bytes_per_token(cfg),
                "decode_tokens_per_s": _number(b, "decode_tokens_per_s"),
                "prefill_tokens_per_s": _number(b, "prefill_tokens_per_s"),
                "accuracy": chat[best][0], "best_mode": best, "n_chat": chat[best][1],
                "chat_by_task": {t: evals[m][best]["by_task"][t] for t in CHAT_TASKS if t in evals[m][best]["by_task"]},
                "accuracy_on": _number(on, "accuracy"), "accuracy_off": _number(off, "accuracy"),
                "chat_accuracy_on": chat["on"][0], "chat_accuracy_off": chat["off"][0],
                "think_rate_on": _number(on, "think_rate"), "think_rate_off": _number(off, "think_rate")}
    asm = _json(os.path.join(out, "puzzle", "assemble.json"))
    child, control = asm["child"], asm.get("control")
    r["child"]["predicted_speedup"] = child["predicted_speedup"]
    r["puzzle"] = {"predicted_speedup": child["predicted_speedup"], "kl": child["kl"], "score": child["score"],
                   "attention": child["attention"], "ffn": child["ffn"],
                   "homogeneous": None if control is None else
                   {k: control[k] for k in ("predicted_speedup", "kl", "score", "attention", "ffn")}}
    layout = os.path.join(out, "puzzle", "layout.txt")
    if not os.path.isfile(layout):
        raise ConfigError(f"report: {layout} is missing (puzzle.py's assemble stage writes it)")
    with open(layout, encoding="utf-8", errors="replace") as f:
        r["puzzle"]["layout_table"] = f.read().rstrip()
    r["child"]["assemble_measured_speedup"] = child.get("measured_speedup")
    r["child"]["measured_speedup"] = r["child"]["decode_tokens_per_s"] / r["parent"]["decode_tokens_per_s"]
    r["child"]["accuracy_vs_parent"] = r["child"]["accuracy"] / max(r["parent"]["accuracy"], 1e-9)
    for m in ("sft", "grpo"):   # the reasoning models: judged on the held-out chains
        on, off = evals[m]["on"], evals[m]["off"]
        (acc_on, n_chains), (acc_off, _) = (subset_accuracy(e, (ADD_TASK,)) for e in (on, off))
        r[m] = {"accuracy_on": acc_on, "accuracy_off": acc_off, "n_chains": n_chains,
                "all_accuracy_on": _number(on, "accuracy"), "all_accuracy_off": _number(off, "accuracy"),
                "think_rate_on": _number(on, "think_rate"), "think_rate_off": _number(off, "think_rate")}
    conv = [row for row in _metrics(out, "sft") if "chain_gain_last_third" in row]
    r["sft"]["gain_last_third"] = conv[-1]["chain_gain_last_third"] if conv else None
    err = lambda a: 1 - a
    r["grpo"]["gain_points"] = 100 * (r["grpo"]["accuracy_on"] - r["sft"]["accuracy_on"])
    r["grpo"]["error_reduction"] = 1 - err(r["grpo"]["accuracy_on"]) / max(err(r["sft"]["accuracy_on"]), 1e-9)
    r["by_k"] = {m: {mode: evals[m][mode]["by_k"] for mode in ("on", "off")} for m in MODELS}
    r["by_task"] = {m: {mode: evals[m][mode]["by_task"] for mode in ("on", "off")} for m in MODELS}
    r["n_problems"] = r["parent"]["n_chat"] + r["sft"]["n_chains"]   # the problems judged (speedrun.sh
    # evaluates each model on its kind only: sample.py --tasks)
    p, c = r["parent"], r["child"]
    think_ok = lambda m: r[m]["think_rate_on"] >= 0.995 and r[m]["think_rate_off"] <= 0.005
    r["checks"] = {
        "parent >= 80% on the direct-answer tasks, >= 60% on each": p["accuracy"] >= 0.80
        and min(p["chat_by_task"].values(), default=0) >= 0.60,
        "child decode >= 1.5x parent, within 20% of the MIP's prediction": c["measured_speedup"] >= 1.5
        and abs(c["measured_speedup"] / c["predicted_speedup"] - 1) <= 0.20,
        "child after KD >= 95% of the parent's accuracy (>= 1,000 direct-answer problems)":
            c["accuracy_vs_parent"] >= 0.95 and c["n_chat"] >= 1000,
        "SFT converged (held-out chains rise <= 2 points over its last third)":
            r["sft"]["gain_last_third"] is not None and r["sft"]["gain_last_third"] <= 0.02,
        "SFT on - off >= 25 points (chains)": r["sft"]["accuracy_on"] - r["sft"]["accuracy_off"] >= 0.25,
        "GRPO >= +5 points or >= 30% fewer errors (>= 1,000 chains, on)":
            (r["grpo"]["gain_points"] >= 5 or r["grpo"]["error_reduction"] >= 0.30) and r["grpo"]["n_chains"] >= 1000,
        "think block >= 99.5% on, <= 0.5% off (SFT, GRPO)": think_ok("sft") and think_ok("grpo"),
    }
    return r


def subset_accuracy(ev, tasks):
    """(accuracy, n) of an eval result over some of its tasks, from its per-task accuracies and counts."""
    n = {t: ev["n_by_task"].get(t, 0) for t in tasks}
    total = sum(n.values())
    return (sum(ev["by_task"][t] * n[t] for t in tasks if n[t]) / total if total else 0.0), total


def chain_models(r):
    """The models evaluated on addition chains (speedrun.sh judges parent and child on the chat tasks
    only, `sample.py --tasks=chat`: they have no accuracy by chain length)."""
    return [m for m in MODELS if r["by_k"][m]["on"]]


def plots(r, out):
    metrics = {m: _metrics(out, m) for m in MODELS}   # every log first: a missing one is named before any plot
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, mode in zip(axes, ("on", "off")):
        for m in chain_models(r):
            ks = sorted(r["by_k"][m][mode], key=int)
            ax.plot([int(k) for k in ks], [r["by_k"][m][mode][k] for k in ks], marker="o", label=m)
        ax.set_title(f"detailed thinking {mode}: accuracy by chain length")
        ax.set_xlabel("k (numbers added)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    fig.tight_layout()
    atomic_write(os.path.join(out, "accuracy_by_k.png"), lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
    panels = [("parent", "parent pretraining", ["train_lm", "val_lm"]),
              ("child", "child KD (from the parent)", ["train_kl", "train_cos", "val_kl", "val_lm"]),
              ("sft", "SFT", ["train_loss", "val_loss"]),
              # GRPO: rollout accuracy per difficulty bucket (the curriculum's batch mix drifts to harder
              # prompts, so its mean reward falls while every bucket rises) and held-out accuracy
              ("grpo", "GRPO: rollout accuracy by bucket (smoothed), held-out accuracy", None)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for ax, (m, title, keys) in zip(axes, panels):
        rows = metrics[m]
        smooth = {}
        if keys is None:
            keys = sorted({k for row in rows for k in row if k.startswith("reward_accuracy_on_")})
            smooth = {k: 5 for k in keys}
            keys += ["accuracy_on", "accuracy_off"]
        for k in keys:
            pts = [(row["step"], row[k]) for row in rows if row.get(k) is not None]
            if pts:
                xs, ys = zip(*pts)
                if k in smooth:
                    ys = moving_average(list(ys), smooth[k])
                ax.plot(xs, ys, label=k.replace("reward_accuracy_on_", "rollouts "), marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(os.path.join(out, "curves.png"), lambda p: fig.savefig(p, dpi=100))
    plt.close(fig)


def markdown(r):
    p, c, s, g = r["parent"], r["child"], r["sft"], r["grpo"]
    pct = lambda x: f"{100 * x:.1f}"
    sec = r["seconds"]
    lines = [
        "# nanoNemotron speedrun report", "",
        f"Device: {r['device']}. Wall time: {sec['total']} s "
        f"({', '.join(f'{k} {v} s' for k, v in sec.items() if k != 'total')}). "
        f"Every accuracy: `sample.py --eval` on {r['n_problems']} held-out test problems "
        f"({r['sft']['n_chains']} addition chains k = {EVAL_K_MIN}..{EVAL_K_MAX}, {r['parent']['n_chat']} direct-answer chat tasks), greedy, "
        "the same for every model. "
        "Parent and child are judged on the chat tasks (their better mode), SFT and GRPO on the chains.", "",
        "## Checks (the paper's claims at nano scale)", "",
        "| claim | holds |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in r["checks"].items()]
    lines += ["", "## 1. Puzzle: a faster child that keeps the parent's accuracy (paper sec. 2)", "",
              "| model | params | KV bytes/token | decode tokens/s (batch 32) | chat accuracy on / off | "
              + " | ".join(CHAT_TASKS) + " |",
              "|---|---|---|---|---|" + "---|" * len(CHAT_TASKS)]
    for name, m in (("parent", p), ("Puzzle child after KD", c)):
        lines.append(f"| {name} | {m['params']:,} | {m['kv_bytes_per_token']} | {m['decode_tokens_per_s']:,.0f} | "
                     f"{pct(m['chat_accuracy_on'])} / {pct(m['chat_accuracy_off'])} | "
                     + " | ".join(pct(m["chat_by_task"].get(t, float("nan"))) for t in CHAT_TASKS) + " |")
    lines += ["",
              f"Measured decode speed-up {c['measured_speedup']:.2f}x (the MIP predicted {c['predicted_speedup']:.2f}x; "
              f"puzzle.py's own re-timing before acceptance: {c['assemble_measured_speedup'] or float('nan'):.2f}x); "
              f"the child keeps {pct(c['accuracy_vs_parent'])}% of the parent's accuracy (better mode).", ""]
    pz = r["puzzle"]
    if pz["homogeneous"] is not None:
        h = pz["homogeneous"]
        lines += ["Heterogeneity against the control the paper argues against (same library, every layer alike, "
                  "before any KD):", "",
                  "| model | predicted speed-up | KL to the parent (held-out tokens) |", "|---|---|---|",
                  f"| Puzzle child ({', '.join(sorted(set(pz['attention'] + pz['ffn'])))}) | {pz['predicted_speedup']:.2f}x | "
                  f"{pz['kl']:.4f} |",
                  f"| homogeneous control ({h['attention'][0]} + {h['ffn'][0]} in every layer) | "
                  f"{h['predicted_speedup']:.2f}x | {h['kl']:.4f} |", ""]
    else:
        lines += ["Homogeneous control: no uniform choice of blocks is predicted as fast as the Puzzle child.", ""]
    lines += ["![per-layer layout of the parent, the Puzzle child and the control](puzzle/layout.png)", "",
              "```", pz["layout_table"], "```", ""]
    gl = s["gain_last_third"]
    lines += ["## 2. Reasoning SFT: one model, two modes (paper sec. 4)", "",
              "SFT's held-out chain accuracy rose " + ("(not measured)" if gl is None else f"{100 * gl:+.1f} points")
              + " over its last third of steps (converged when <= 2).", "",
              "| model | chain accuracy on | chain accuracy off | think block on | think block off |", "|---|---|---|---|---|"]
    for name, m in (("SFT", s), ("GRPO", g)):
        # two decimals: the threshold is 99.5%, and 99.47% printed as "99.5%" beside a "no" reads as a bug
        lines.append(f"| {name} | {pct(m['accuracy_on'])} | {pct(m['accuracy_off'])} | {100 * m['think_rate_on']:.2f}% | "
                     f"{100 * m['think_rate_off']:.2f}% |")
    lines += ["", f"## 3. GRPO on top of SFT (paper sec. 5): {g['gain_points']:+.1f} points with reasoning on, "
              f"{pct(g['error_reduction'])}% of SFT's errors removed", "",
              "![accuracy by chain length](accuracy_by_k.png)", "", "![curves](curves.png)", "",
              "Accuracy by chain length (reasoning on):", "",
              "| k | " + " | ".join(chain_models(r)) + " |", "|---|" + "---|" * len(chain_models(r))]
    ks = sorted(r["by_k"]["sft"]["on"], key=int)
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(pct(r["by_k"][m]["on"].get(k, float("nan"))) for m in chain_models(r))
                     + " |")
    lines += ["", "## What the paper reports (on / off)", "",
              "| model | GPQA-Diamond | MATH500 | AIME25 |", "|---|---|---|---|"]
    lines += [f"| {k} | " + " | ".join(v.values()) + " |" for k, v in PAPER.items()]
    lines += [f"| nano (this run, held-out tasks) | | SFT {pct(s['accuracy_on'])} / {pct(s['accuracy_off'])}, "
              f"GRPO {pct(g['accuracy_on'])} / {pct(g['accuracy_off'])} | |", "",
              "Efficiency: LN-Super has 5x the throughput of Llama-3.3-70B at batch 256 on one H100; LN-Ultra "
              f"1.71x lower latency than Llama-3.1-405B. Nano: {c['measured_speedup']:.2f}x decode throughput at "
              "batch 32 on this device."]
    return "\n".join(lines) + "\n"


def main(cfg):
    out = cfg.out_dir
    r = collect(out)
    plots(r, out)
    md = markdown(r)   # both made before either is written
    write_json(os.path.join(out, "report.json"), r)
    atomic_write(os.path.join(out, "report.md"), md)
    print(md)


if __name__ == "__main__":
    run_main(main, ReportConfig)
