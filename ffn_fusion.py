"""
ffn_fusion.py: FFN Fusion (arXiv 2503.18908). FFN sub-blocks with no attention between them,
h + F1(n1(h)), then + F2(n2(.)), ..., are replaced by one wider SwiGLU applied to the run's first
input:
  gate/up = the blocks' gate/up concatenated along the intermediate axis, each block's RMSNorm
  weight folded into its input columns (the fused norm's weight is 1); down = the blocks' down
  concatenated along its input axis;   so  fused(h) = sum_j F_j(n_j(h))  exactly.
What changes is only that block j sees the run's first input instead of its own; the paper's
dependency measure says where that is harmless: the cosine distance between a block's
contribution computed from its sequential input and from the run's first input.

puzzle.py applies it to the assembled child with --ffn_fusion=True (LN-Ultra: Puzzle, then FFN
Fusion); the tests check that a fused run computes the sum of its blocks exactly.
"""
import dataclasses

import torch
import torch.nn.functional as F

from model import Transformer, rope_cos_sin


def ffn_contribution(layer, h):
    """What an FFN sub-block adds to the residual stream: ffn(norm(h)); 0 without an FFN."""
    if layer.mlp is None:
        return torch.zeros_like(h)
    return layer.mlp(layer.post_attention_layernorm(h))


def ffn_runs(mcfg):
    """Maximal runs (layer indices, length >= 2) of SwiGLU FFNs with no attention between them:
    layer i's FFN and the FFNs of the following layers whose attention is a no_op (layers with
    both sub-blocks no_op are transparent; a linear FFN ends a run)."""
    runs, cur = [], []
    for i, b in enumerate(mcfg.block_configs):
        if b.attention != "no_op" or b.ffn == "linear":
            if len(cur) > 1:
                runs.append(cur)
            cur = []
        if b.ffn == "swiglu":
            cur.append(i)
    if len(cur) > 1:
        runs.append(cur)
    return runs


@torch.no_grad()
def ffn_inputs(model, batches):
    """Per batch: rope, doc_ids and each layer's input to its FFN sub-block (h after attention)."""
    out = []
    for x, doc, pos in batches:
        h = model.model.embed_tokens(x)
        rope = rope_cos_sin(model.inv_freq, pos, h.dtype)
        mids = []
        for layer in model.model.layers:
            h = layer.attention_block(h, rope, doc)
            mids.append(h)
            h = layer.ffn_block(h)
        out.append(mids)
    return out


@torch.no_grad()
def ffn_dependency(model, inputs, start, j):
    """1 - cos(F_j(x_j), F_j(x_start)), mean over tokens: how much block j's contribution changes
    when it reads the input of the run's first block instead of its own."""
    layer, tot, n = model.model.layers[j], 0.0, 0
    for mids in inputs:
        a = ffn_contribution(layer, mids[j])
        b = ffn_contribution(layer, mids[start])
        tot += float((1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).sum())
        n += a.shape[0] * a.shape[1]
    return tot / n


def choose_fusion_groups(model, batches, threshold):
    """Greedy along each run: a block joins the current group when its dependency on the group's
    first input is <= threshold, else it starts a new group. Groups of >= 2 blocks are fused."""
    inputs = ffn_inputs(model, batches)
    groups, deps = [], {}
    for run in ffn_runs(model.config):
        cur = [run[0]]
        for j in run[1:]:
            d = ffn_dependency(model, inputs, cur[0], j)
            deps[f"{cur[0]}->{j}"] = d
            if d <= threshold:
                cur.append(j)
            else:
                if len(cur) > 1:
                    groups.append(cur)
                cur = [j]
        if len(cur) > 1:
            groups.append(cur)
    return groups, deps


def fuse_ffns(model, groups):
    """A new model in which each group of FFN layers (first layer's attention kept) is one SwiGLU
    of the summed width; the group's other layers (attention no_op) disappear."""
    mcfg, layers = model.config, model.model.layers
    first = {g[0]: g for g in groups}
    dropped = {i for g in groups for i in range(g[0] + 1, g[-1] + 1)}
    blocks, state, new_i = [], {}, 0
    src = model.state_dict()
    for i, b in enumerate(mcfg.block_configs):
        if i in dropped:
            continue
        if i in first:
            g = first[i]
            gate = torch.cat([layers[j].mlp.gate_proj.weight * layers[j].post_attention_layernorm.weight for j in g])
            up = torch.cat([layers[j].mlp.up_proj.weight * layers[j].post_attention_layernorm.weight for j in g])
            down = torch.cat([layers[j].mlp.down_proj.weight for j in g], dim=1)
            blocks.append(dataclasses.replace(b, ffn="swiglu", ffn_mult=None, intermediate_size=gate.shape[0]))
            for k, v in src.items():
                if k.startswith(f"model.layers.{i}.") and ".mlp." not in k and "post_attention_layernorm" not in k:
                    state[k.replace(f"model.layers.{i}.", f"model.layers.{new_i}.", 1)] = v
            p = f"model.layers.{new_i}."
            state.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                          p + "mlp.down_proj.weight": down,
                          p + "post_attention_layernorm.weight": torch.ones_like(layers[i].post_attention_layernorm.weight)})
        else:
            blocks.append(b)
            for k, v in src.items():
                if k.startswith(f"model.layers.{i}."):
                    state[k.replace(f"model.layers.{i}.", f"model.layers.{new_i}.", 1)] = v
        new_i += 1
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        state[k] = src[k]
    cfg = dataclasses.replace(mcfg, block_configs=blocks)
    with torch.device("meta"):
        fused = Transformer(cfg)
    fused.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        fused.lm_head.weight = fused.model.embed_tokens.weight
    fused.reset_rope()
    return fused.eval()


def ffn_fusion(model, batches, threshold):
    groups, deps = choose_fusion_groups(model, batches, threshold)
    return fuse_ffns(model, groups), {"groups": groups, "dependency": deps, "threshold": threshold}
