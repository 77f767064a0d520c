# A bigger parent on one GPU (bf16 autocast, torch.compile): 8 layers, hidden 512, 8 query / 2 KV
# heads (~30M parameters with a 768-token vocabulary; more with a real tokenizer).
#   python distill.py config/parent_1gpu.py
out_dir = "out/parent_gpu"
n_layer = 8
n_embd = 512
n_head = 8
n_kv_head = 2
ffn_hidden = 1536
seq_len = 1024
device_batch_size = 64
total_batch_size = 131072  # 64 seqs x 1024 tokens x 2 micro-steps on 1 GPU
max_steps = 2000
lr = 1e-3
warmup_steps = 100
compile = True
device = "cuda"
eval_interval = 250
ckpt_interval = 500
