# The nano parent of the CPU recipe: a 1.4M-parameter Llama, 6 layers, hidden 128, 4 query / 2 KV
# heads, SwiGLU 384, on the built-in corpus from data.py (40% copy exercises, 30% conversations,
# loss on their targets only: README, "The nano world"). distill.py's defaults, spelled out: its
# seq_len=0 / total_batch_size=0 resolve to these two for a model built from scratch (a 4,096-token
# batch of 16 rows caps a row at 256 tokens).
#   python distill.py config/nano_parent_cpu.py
out_dir = "out/parent"
data_dir = "out/data"
n_layer = 6
n_embd = 128
n_head = 4
n_kv_head = 2
ffn_hidden = 384
seq_len = 256
# Many small steps: the copy circuit (induction heads) forms after a number of tokens that grows
# with the batch (tokens per step); 300 steps of 8,192 tokens never formed it, 600 of 4,096 did.
total_batch_size = 4096    # 16 seqs x 256 tokens
device_batch_size = 16
lr = 3e-3
warmup_steps = 30
device = "cpu"
max_steps = 1200           # 4.9M tokens. At 800 steps seed 3's parent copied poorly (echo / list 49 / 41%,
                           # 77.1% on the 1,000 chat tasks); at 1,200 100 / 100% (98.4%), seed 2 94.5 -> 96.7%
