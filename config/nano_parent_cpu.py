# The nano parent of the CPU recipe (distill.py's defaults, spelled out, but for 256-token windows: the
# defaults would take the longest document rounded up, 512): a 1.4M-parameter Llama,
# 6 layers, hidden 128, 4 query / 2 KV heads, SwiGLU 384, on the built-in corpus from data.py.
#   python distill.py config/nano_parent_cpu.py
out_dir = "out/parent"
data_dir = "out/data"
n_layer = 6
n_embd = 128
n_head = 4
n_kv_head = 2
ffn_hidden = 384
seq_len = 256
total_batch_size = 8192    # 16 seqs x 256 tokens x 2 micro-steps
device_batch_size = 16
lr = 3e-3
warmup_steps = 30
device = "cpu"
max_steps = 300            # 2.5M tokens, ~3 min at ~14k tokens/s on 2 cores
