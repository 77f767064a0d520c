# Global KD of the nano Puzzle child from the nano parent (paper sec. 2.2; Puzzle's loss:
# cosine of every layer's hidden state + KL on the logits, no LM loss). The child starts from the
# BLD library's blocks, so it needs a gentler LR than pretraining from scratch and few steps.
#   python distill.py config/nano_kd_cpu.py --init_from=out/puzzle/child --teacher=out/parent --out_dir=out/child
init_from = "out/puzzle/child"
teacher = "out/parent"
out_dir = "out/child"
data_dir = "out/data"
kd_weight = 1.0
cosine_weight = 1.0
lm_weight = 0.0
seq_len = 256
total_batch_size = 8192    # 16 seqs x 256 tokens x 2 micro-steps
device_batch_size = 16
lr = 1e-3
warmup_steps = 10
max_steps = 300            # ~2.5M tokens. Seed 1337's child (1.53x) after 120 steps kept 90.2% of the
                           # parent on the 1,000 chat tasks ("next": 43 vs 77%), after 240 steps 95.3%
                           # ("next" 61%): the carry of "next" is the last skill to come back
eval_interval = 60
device = "cpu"
