# The parent of config/parent_1gpu.py on N GPUs / nodes: give both presets, this one second (later
# presets and then --key=value flags override earlier ones). The global batch is fixed in tokens,
# so 8 GPUs run 1 micro-step where 1 GPU runs 8, over the same stream of sequences.
#   torchrun --standalone --nproc_per_node=8 distill.py config/parent_1gpu.py config/parent_multi_gpu.py
#   torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 \
#       distill.py config/parent_1gpu.py config/parent_multi_gpu.py
out_dir = "out/parent_multi"
total_batch_size = 524288  # 64 seqs x 1024 tokens x 8 GPUs x 1 micro-step
lr = 2e-3
