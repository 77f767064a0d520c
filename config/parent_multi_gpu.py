# The same parent on N GPUs / nodes. The global batch is fixed in tokens, so 8 GPUs run 1
# micro-step where 1 GPU runs 8 and both see the same stream of sequences (same result).
#   torchrun --standalone --nproc_per_node=8 distill.py config/parent_multi_gpu.py
#   torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 distill.py config/parent_multi_gpu.py
out_dir = "out/parent_multi"
n_layer = 8
n_embd = 512
n_head = 8
n_kv_head = 2
ffn_hidden = 1536
seq_len = 1024
device_batch_size = 64
total_batch_size = 524288  # 64 seqs x 1024 tokens x 8 GPUs x 1 micro-step
max_steps = 2000
lr = 2e-3
warmup_steps = 100
compile = True
device = "cuda"
eval_interval = 250
ckpt_interval = 500
