"""
puzzle_io.py: Puzzle's plumbing, so that puzzle.py holds the method: the stage cache (a stage's
settings in, its saved result out), the inputs (the parent's tokenizer, the token shards), the
BLD library on disk, and the tables and plots each stage prints and saves.

What puzzle.py writes under --out_dir (out_paths):
    library.json + library.safetensors   the BLD library: per-candidate losses, trained weights
    bld.txt, bld_loss.png                its table and training curve
    scores.json, costs.json, mip.json    replace-1-block scores, measured costs, MIP solutions
    child/, homogeneous/, child_hf/      checkpoint folders (the child, the control, a DeciLM export)
    layout.txt, layout.png               the child's layer layout beside the parent's
    assemble.json                        written last: it marks the run done
    metrics.jsonl                        every stage's rows
Each result file carries an "id" and the "settings" it was made from, its inputs' ids among them;
`--stage=all` reuses a result whose settings match and redoes the others. Every file is written
atomically (configurator.atomic_write), a checkpoint folder beside its old self and then swapped in
(configurator.atomic_dir): a killed run leaves the previous results whole.
"""
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from checkpoint import load_model, save_model
from configurator import ConfigError, atomic_dir, atomic_write, read_json_object, write_json
from data import load_token_shards, load_tokenizer
from evaluate import bench_calmest
from runtime import plot_curves, read_metrics

STAGES = ("library", "score", "cost", "mip", "assemble")
# What each stage's result depends on: its flags and the ids of the results it read. A saved
# result whose settings differ is stale: --stage=all redoes it.
INPUTS = {"library": (), "score": ("library",), "cost": (), "mip": ("score", "cost"), "assemble": ("mip",)}


def out_paths(out_dir):
    j = lambda *p: os.path.join(out_dir, *p)
    return {"library": j("library.json"), "library_weights": j("library.safetensors"), "bld_table": j("bld.txt"),
            "bld_plot": j("bld_loss.png"), "score": j("scores.json"), "cost": j("costs.json"), "mip": j("mip.json"),
            "assemble": j("assemble.json"), "child": j("child"), "control": j("homogeneous"),
            "child_hf": j("child_hf"), "layout": j("layout.txt"), "layout_png": j("layout.png"),
            "metrics": j("metrics.jsonl")}


def stage_settings(name, cfg, pcfg, space, state):
    """What stage `name`'s result depends on: its flags, the parent and the ids of its inputs."""
    parent = {"parent": os.path.abspath(cfg.parent), "parent_config": pcfg.to_dict(), "space": space}
    data = lambda which: os.path.abspath(which if os.path.isabs(which) else os.path.join(cfg.data_dir, which))
    own = {
        "library": {**parent, "train_data": data(cfg.train_data), "val_data": data(cfg.val_data), "seed": cfg.seed,
                    **{k: getattr(cfg, k) for k in ("seq_len", "bld_tokens", "bld_batch_size", "bld_lr",
                                                     "bld_warmup_steps", "bld_min_lr_frac", "bld_grad_clip",
                                                     "linear_init", "calib_tokens", "bld_eval_tokens")}},
        "score": {"val_data": data(cfg.val_data), "seed": cfg.seed, "seq_len": cfg.seq_len,
                  "score_tokens": cfg.score_tokens},
        "cost": {**parent, **{k: getattr(cfg, k) for k in ("compile", "cost_batch_size", "cost_prompt_len",
                                                            "cost_new_tokens", "cost_repeats", "seed")},
                 "device": cfg.device, "threads": torch.get_num_threads()},
        "mip": {k: getattr(cfg, k) for k in ("target_speedup", "max_memory_bytes", "n_solutions", "diversity",
                                             "bytes_per_element")},
        "assemble": {k: getattr(cfg, k) for k in ("export_hf", "ffn_fusion", "fusion_threshold", "score_tokens",
                                                  "seq_len", "seed")},
    }[name]
    own["inputs"] = {i: state[i]["id"] for i in INPUTS[name]}
    return json.loads(json.dumps(own))


class StageCache:
    """The saved stage results in --out_dir and the rule for reusing them. With --stage=all a
    result is reused when its settings equal this run's (--force=True redoes every stage); with
    --stage=NAME the stages before NAME must be saved and consistent, NAME and after are redone."""

    def __init__(self, cfg, paths, master):
        self.cfg, self.paths, self.master = cfg, paths, master
        self.first = 0 if cfg.stage == "all" else STAGES.index(cfg.stage)

    def load(self, name):
        """A stage's saved result, or None when it is absent."""
        path = self.paths[name]
        if not os.path.isfile(path):
            return None
        redo = f"delete it or redo the stage with --stage={name}"
        res = read_json_object(path, expected=f"the {name} stage's result object", hint=f"; {redo}")
        for key, typ in (("id", str), ("settings", dict)):
            if not isinstance(res.get(key), typ):
                raise ConfigError(f"{path}: field {key!r} missing or not a {typ.__name__} (not a {name} result "
                                  f"puzzle.py wrote); {redo}")
        if name == "assemble" and not os.path.isdir(self.paths["child"]):
            return None
        return res

    def reuse(self, name, want, state):
        """The saved result of stage `name` if this run reuses it (checked against `state`, the
        results of the stages before), else None: the stage runs."""
        cfg, saved = self.cfg, self.load(name)
        if cfg.stage == "all":
            redo = cfg.force or saved is None or saved.get("settings") != want
            if saved is not None and redo and not cfg.force and self.master:
                before = saved.get("settings") or {}
                changed = sorted(k for k in set(want) | set(before) if want.get(k) != before.get(k))
                print(f"[puzzle] {name}: the saved result was made with other settings ({', '.join(changed)}): "
                      f"redoing it", file=sys.stderr)
        else:
            redo = STAGES.index(name) >= self.first
        if redo:
            return None
        if saved is None:
            raise ConfigError(f"--stage={cfg.stage} needs the {name} stage's results, which are not in "
                              f"{cfg.out_dir}: run --stage=all first")
        for inp in INPUTS[name]:
            if (saved.get("settings") or {}).get("inputs", {}).get(inp) != state[inp]["id"]:
                raise ConfigError(f"{self.paths[name]} was made from another {inp} result than the one in "
                                  f"{cfg.out_dir}: redo it with --stage={name}")
        if name == "library":
            saved["tensors"] = load_library_tensors(self.paths, saved)
        if name == "cost" and saved["settings"].get("space") != state["library"]["space"]:
            raise ConfigError(f"{self.paths['cost']} measured another search space than the library's: "
                              f"redo it with --stage=cost")
        if self.master:
            print(f"[puzzle] {name}: using the saved result in {cfg.out_dir}", file=sys.stderr)
        return saved


# ------------------------------------------------------------------------------------------------
# Inputs: the parent's tokenizer and the token shards BLD trains on and scoring holds out.

def parent_tokenizer(cfg, pcfg):
    """The parent's own tokenizer (a Hugging Face folder brings one), else the data's."""
    for where in (cfg.parent, cfg.data_dir):
        try:
            tok = load_tokenizer(where)
        except FileNotFoundError:
            continue
        if tok.n_vocab > pcfg.vocab_size:
            raise ConfigError(f"the tokenizer in {where} has {tok.n_vocab} tokens but the parent's vocabulary "
                              f"is {pcfg.vocab_size}")
        return tok
    raise ConfigError(f"no tokenizer.model in --parent={cfg.parent} or --data_dir={cfg.data_dir}")


def load_data(cfg, pcfg, tok):
    out = {"bos_id": tok.bos_id}
    for key, name in (("train", cfg.train_data), ("val", cfg.val_data)):
        folder = name if os.path.isabs(name) else os.path.join(cfg.data_dir, name)
        arr = load_token_shards(folder, n_vocab=pcfg.vocab_size)
        index = read_json_object(os.path.join(folder, "index.json"))
        if index["bos_id"] != tok.bos_id:
            raise ConfigError(f"{folder} was tokenized with another tokenizer (bos_id {index['bos_id']}, the "
                              f"parent's tokenizer has {tok.bos_id})")
        if len(arr) < cfg.seq_len + 2:
            raise ConfigError(f"{folder} holds {len(arr)} tokens, fewer than one window of --seq_len={cfg.seq_len}")
        out[key] = arr
    return out


# ------------------------------------------------------------------------------------------------
# The library on disk: library.json (space, per-candidate losses) + library.safetensors (weights,
# keyed "layers.{l}.{sub}.{name}.{param}", the same keys lib["tensors"] holds in memory).

def library_key(l, sub, name):
    """The prefix of candidate `name`'s tensors for sub-block `sub` of layer `l`."""
    return f"layers.{l}.{sub}.{name}."


def trained_candidates(lib):
    """(layer, sub, name, record) of every candidate BLD trained, in the library's order."""
    return [(l, sub, name, r) for sub, rows in lib["candidates"].items() for l, row in enumerate(rows)
            for name, r in row.items() if r["trained"]]


def save_library(paths, lib, tensors, log, bld_steps):
    from safetensors.torch import save_file
    atomic_write(paths["library_weights"], lambda p: save_file(tensors, p, {"library_id": lib["id"]}))
    write_json(paths["library"], lib)
    atomic_write(paths["bld_table"], bld_table(lib) + "\n")
    for l, sub, name, r in trained_candidates(lib):
        log.log(stage="library", layer=l, sub=sub, candidate=name, init_loss=r["init_loss"], final_loss=r["final_loss"])
    rows = [r for r in read_metrics(log.path) if r.get("stage") == "library" and "bld_train_loss" in r]
    rows = rows[-bld_steps:] if bld_steps else []
    if rows:
        plot_curves(paths["bld_plot"], rows, ["bld_train_loss", "bld_train_loss_max"],
                    title="BLD: normalised MSE per step (mean / max over candidates)")
    print(bld_table(lib))


def load_library_tensors(paths, lib):
    from safetensors import SafetensorError, safe_open
    f = paths["library_weights"]
    if not os.path.isfile(f):
        raise ConfigError(f"{f} is missing (library.json is there): redo the library with --stage=library")
    try:
        with safe_open(f, framework="pt") as sf:
            if (sf.metadata() or {}).get("library_id") != lib["id"]:
                raise ConfigError(f"{f} does not belong to {paths['library']} (another run wrote it): "
                                  f"redo the library with --stage=library")
            return {k: sf.get_tensor(k) for k in sf.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{f}: truncated or not a safetensors file ({str(e).strip()[:160]}): redo the library "
                          f"with --stage=library") from None


def save_checkpoint_folder(model, folder, tok, fmt="native"):
    """model + tokenizer into `folder`, all at once: written beside it and swapped in by renames."""
    def write(tmp):
        save_model(model, tmp, fmt=fmt)
        tok.save(tmp)
    atomic_dir(folder, write)


# ------------------------------------------------------------------------------------------------
# Tables and plots.

def bld_table(lib):
    lines = [f"{'layer':>5} {'sub-block':<9} {'candidate':<12} {'init':>8} {'final':>8}"]
    trained = trained_candidates(lib)
    for l, sub, name, r in trained:
        lines.append(f"{l:>5} {sub:<9} {name:<12} {r['init_loss']:>8.4f} {r['final_loss']:>8.4f}")
    lower = sum(r["final_loss"] < r["init_loss"] for *_, r in trained)
    lines.append(f"normalised MSE (held out) lowered by BLD for {lower} of {len(trained)} candidates")
    return "\n".join(lines)


def score_table(space, scores):
    lines = []
    for sub in space:
        names = [s["name"] for s in space[sub]]
        lines.append(f"replace-1-block KL of the {sub} candidates (nats per token):")
        lines.append(f"{'layer':>5} " + " ".join(f"{n:>11}" for n in names))
        for l, row in enumerate(scores[sub]):
            lines.append(f"{l:>5} " + " ".join(f"{row[n]:>11.5f}" for n in names))
    return "\n".join(lines)


def cost_table(costs, space):
    L = len(costs["settings"]["parent_config"]["block_configs"])
    lines = [f"decode costs on {costs['device']} ({costs['path']}, {costs['dtype']}, {costs['threads']} threads), "
             f"batch {costs['batch_size']}, {costs['prompt_len']}-token prompts + {costs['new_tokens']} new tokens:",
             f"  fixed (embedding, final norm, LM head, sampling, loop): {1e3 * costs['fixed']['decode_step_s']:.3f} "
             f"ms/step",
             f"  {'sub-block':<9} {'candidate':<12} {'ms/step/layer':>13} {'params':>10} {'KV elem/token':>13}"]
    for sub in space:
        for spec in space[sub]:
            r = costs["candidates"][sub][spec["name"]]
            lines.append(f"  {sub:<9} {spec['name']:<12} {1e3 * r['decode_step_s']:>13.4f} {r['params']:>10,} "
                         f"{r['kv_elements_per_token']:>13}")
    p = costs["parent"]
    lines.append(f"  parent ({L} layers): measured {1e3 * p['measured_decode_step_s']:.3f} ms/step, predicted "
                 f"{1e3 * p['predicted_decode_step_s']:.3f} (ratio {p['measured_decode_step_s'] / p['predicted_decode_step_s']:.3f})")
    t = costs["time"]
    lines.append(f"  cost stage: {t['total_s']:.1f} s = compile {t['compile_s']:.1f} s + timing {t['timing_s']:.1f} s")
    return "\n".join(lines)


def mip_report(res, n_asked):
    solutions = res["solutions"]
    lines = [f"MIP ({res['solve_s']:.2f} s): {len(solutions)} solution(s)"
             + (f" of the {n_asked} asked (no other meets the diversity cut)" if len(solutions) < n_asked else "")]
    for i, s in enumerate(solutions):
        lines.append(f"  #{i}: score {s['score']:.5f}, predicted speed-up {s['predicted_speedup']:.3f}x, memory "
                     f"{s['memory_bytes']:,} B; attention {' '.join(s['attention'])}; ffn {' '.join(s['ffn'])}")
    return "\n".join(lines)


def assemble_summary(res, parent_pred):
    """The lines under the layout table: the child, the homogeneous control, FFN Fusion."""
    sol, pc = res["child"], parent_pred
    lines = [f"Puzzle child: predicted decode speed-up {sol['predicted_speedup']:.3f}x, measured "
             f"{sol['measured_speedup']:.3f}x "
             f"({1e3 * sol['decode_step_s']:.3f} vs {1e3 * pc['decode_step_s']:.3f} ms/step), predicted memory "
             f"{sol['memory_bytes']:,} B (parent {pc['memory_bytes']:,}), params {sol['params']:,} "
             f"(parent {pc['params']:,}), summed score {sol['score']:.5f}, measured KL to the parent "
             f"{sol['kl']:.5f}"]
    c = res["control"]
    if c is not None:
        lines.append(f"homogeneous control ({c['attention'][0]} + {c['ffn'][0]} in every layer): predicted "
                     f"speed-up {c['predicted_speedup']:.3f}x, memory {c['memory_bytes']:,} B, summed score "
                     f"{c['score']:.5f}, measured KL {c['kl']:.5f}")
    else:
        lines.append("homogeneous control: no uniform pair is predicted as fast as the child")
    if "fusion" in res:
        f = res["fusion"]
        lines.append(f"FFN Fusion: {len(f['groups'])} run(s) fused {f['groups']} -> {f['layers']} layers, "
                     f"KL {f['kl']:.5f}")
    return lines


def layout_rows(mcfg):
    rows = []
    for i, b in enumerate(mcfg.block_configs):
        attn = f"gqa kv{mcfg.kv_heads(i)}" if b.attention == "gqa" else b.attention
        ffn = f"swiglu {mcfg.ffn_width(i)}" if b.ffn == "swiglu" else b.ffn
        rows.append((attn, ffn))
    return rows


def layout_table(models, summary):
    """Per layer: attention kind / KV heads and FFN width of each model, side by side."""
    cols = [(title, layout_rows(m)) for title, m in models]
    n = max(len(r) for _, r in cols)
    w = 22
    lines = [f"{'layer':>5} | " + " | ".join(f"{t:<{w}}" for t, _ in cols),
             f"{'':>5} | " + " | ".join(f"{'attention':<10} {'ffn':<11}" for _ in cols)]
    for i in range(n):
        cells = [f"{r[i][0]:<10} {r[i][1]:<11}" if i < len(r) else " " * w for _, r in cols]
        lines.append(f"{i:>5} | " + " | ".join(cells))
    return "\n".join(lines + summary)


def draw_layout(path, models, pcfg, titles_extra):
    """PNG: per layer, attention kind (coloured cell, KV heads) and FFN width (bar), models side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"gqa": "#2b6cb0", "gqa_fewer": "#90cdf4", "linear": "#ed8936", "no_op": "#e2e8f0"}
    W = pcfg.ffn_width(0)
    L = max(m.num_hidden_layers for _, m in models)
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 0.45 * L + 1.6), sharey=True)
    for ax, (title, m), extra in zip(np.atleast_1d(axes), models, titles_extra):
        for i, b in enumerate(m.block_configs):
            kind = b.attention if b.attention != "gqa" else ("gqa" if m.kv_heads(i) >= pcfg.kv_heads(0) else "gqa_fewer")
            ax.add_patch(plt.Rectangle((0, i - 0.4), 0.9, 0.8, color=colors[kind]))
            label = {"gqa": f"kv{m.kv_heads(i)}", "gqa_fewer": f"kv{m.kv_heads(i)}", "linear": "lin", "no_op": "-"}[kind]
            ax.text(0.45, i, label, ha="center", va="center", fontsize=8)
            width = m.ffn_width(i) / W if b.ffn == "swiglu" else (0.05 if b.ffn == "linear" else 0)
            ax.barh(i, 3 * width, left=1.1, height=0.8, color="#38a169" if b.ffn == "swiglu" else colors["linear"])
            ax.text(1.15 + 3 * width, i, {"swiglu": str(m.ffn_width(i)), "linear": "lin", "no_op": "-"}[b.ffn],
                    va="center", fontsize=8)
        ax.set_xlim(0, 4.9)
        ax.set_ylim(L - 0.5, -0.5)
        ax.set_xticks([0.45, 2.6], ["attention", "FFN width"])
        ax.set_title(f"{title}\n{extra}", fontsize=9)
    np.atleast_1d(axes)[0].set_ylabel("layer")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def check_library_space(cfg, name, state, space):
    """Never silently reuse a library made for other flags: the MIP would solve another space."""
    if name in ("mip", "assemble") and "library" in state and state["library"]["space"] != space:
        raise ConfigError(f"--stage={cfg.stage}: the saved library in {cfg.out_dir} was built for another search "
                          f"space than --kv_heads={cfg.kv_heads} --ffn_fractions={cfg.ffn_fractions} "
                          f"--ffn_round={cfg.ffn_round} --linear={cfg.linear} --no_op={cfg.no_op} give "
                          f"({describe_space_diff(state['library']['space'], space)}); pass the flags it was made "
                          f"with, or redo it with --stage=library (or --stage=all)")


def describe_space_diff(saved, wanted):
    names = lambda sp, sub: [c.get("name", str(c)) for c in sp.get(sub, [])] if isinstance(sp, dict) else []
    parts = []
    for sub in ("attention", "ffn"):
        a, b = names(saved, sub), names(wanted, sub)
        if a != b:
            parts.append(f"{sub}: saved {a}, flags {b}")
    return "; ".join(parts) or "the candidates differ"


def library_record(space, init_loss, final_loss, n_layers):
    """Per layer and sub-block: {name: {"init_loss", "final_loss"}} for every candidate
    (the parent's own: 0, a no_op: exactly 1, both untrained)."""
    rec = {}
    for sub in space:   # attention, ffn
        rec[sub] = []
        for l in range(n_layers):
            row = {space[sub][0]["name"]: {"init_loss": 0.0, "final_loss": 0.0, "trained": False}}
            for spec in space[sub][1:]:
                k = (l, sub, spec["name"])
                if k in init_loss:
                    row[spec["name"]] = {"init_loss": init_loss[k], "final_loss": final_loss[k], "trained": True}
                else:
                    row[spec["name"]] = {"init_loss": 1.0, "final_loss": 1.0, "trained": False}
            rec[sub].append(row)
    return rec


@dataclass
class Run:
    """What every stage reads: the flags, the parent's config and search space, the processes,
    the log and the output paths; the parent, its tokenizer and the token data are loaded when
    the first stage that needs them runs (a re-solved MIP needs none of them)."""
    cfg: object
    pcfg: object
    space: dict
    dist: object
    log: object
    paths: dict
    parent: object = None
    tok: object = None
    data: dict = None

    def load_inputs(self):
        if self.parent is None:
            self.parent = load_model(self.cfg.parent, device=self.dist.device).eval().requires_grad_(False)
            self.tok = parent_tokenizer(self.cfg, self.pcfg)
            self.data = load_data(self.cfg, self.pcfg, self.tok)

    def publish(self, stage, res, rows=(), text=None):
        """A stage's result: its JSON file, its metrics.jsonl rows, its table on stdout (the
        master process only)."""
        if self.dist.master:
            write_json(self.paths[stage], res)
            for row in rows:
                self.log.log(stage=stage, **row)
            if text is not None:
                print(text)


def measure_probes(cfg, models):
    """The cost probes timed together (evaluate.bench_calmest: interleaved repeats, medians; a
    probe whose spread exceeds --cost_max_spread is measured again, up to --cost_retries times, and
    the calmest measurement kept). Returns (result, its largest spread, every attempt's largest spread)."""
    return bench_calmest(models, cfg.cost_batch_size, cfg.cost_prompt_len, cfg.cost_new_tokens, cfg.compile,
                         cfg.cost_repeats, cfg.cost_max_spread, cfg.cost_retries, what="cost probe",
                         flag="--cost_max_spread", desc="cost probes (compile, then timing)")


def save_assembly(run, res, child, control, models, extras, parent_pred):
    """The assemble stage's outputs: the checkpoint folders first (child, homogeneous control,
    DeciLM export), then the layout table and picture, and assemble.json, which marks the stage
    done, last."""
    cfg, paths = run.cfg, run.paths
    save_checkpoint_folder(child, paths["child"], run.tok)
    if control is not None:
        save_checkpoint_folder(control, paths["control"], run.tok)
    if cfg.export_hf:
        save_checkpoint_folder(child, paths["child_hf"], run.tok, fmt="hf")
    table = layout_table(models, assemble_summary(res, parent_pred))
    atomic_write(paths["layout"], table + "\n")
    draw_layout(paths["layout_png"], models, run.pcfg, extras)
    write_json(paths["assemble"], res)
    run.log.log(stage="assemble", child_kl=res["child"]["kl"], child_score=res["child"]["score"],
                child_predicted_speedup=res["child"]["predicted_speedup"],
                child_measured_speedup=res["child"]["measured_speedup"],
                control_kl=res["control"]["kl"] if control is not None else None,
                control_score=res["control"]["score"] if control is not None else None)
    print(table)
    print(f"child -> {paths['child']}" + (f", control -> {paths['control']}" if control is not None else "")
          + (f", DeciLM export -> {paths['child_hf']}" if cfg.export_hf else ""))
