# Knowledge distillation from a local Hugging Face Llama download (config.json + safetensors; no
# downloads at run time) into a smaller student with the same tokenizer.
#   1. tokenize a local corpus with the teacher's tokenizer:
#        python data.py --tokenize_text=corpus.jsonl --tokenizer=/models/Llama-3.2-3B --out_dir=out/llama_data
#   2. python distill.py config/distill_hf_llama.py
# A Puzzle child keeps its parent's width and depth, and then Puzzle's loss applies as is
# (cosine_weight = 1, lm_weight = 0). Here the student is Llama-3.2-1B (hidden 2048, 16 layers)
# under Llama-3.2-3B (hidden 3072, 28 layers): hidden states of different widths cannot be
# compared, so only the KL on logits is used.
teacher = "/models/Llama-3.2-3B"
init_from = "/models/Llama-3.2-1B"
data_dir = "out/llama_data"
out_dir = "out/llama_1b_kd"
seq_len = 2048
device_batch_size = 4
total_batch_size = 65536              # 4 seqs x 2048 tokens x 8 micro-steps on 1 GPU
vocab_chunk = 2048                    # 2048 x 128,256 fp32 = 1 GB per chunk and model
kd_weight = 1.0
cosine_weight = 0.0
lm_weight = 0.0
lr = 1e-4
warmup_steps = 50
max_steps = 1000
device = "cuda"
eval_interval = 100
ckpt_interval = 200
