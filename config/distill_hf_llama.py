# Puzzle's global KD (sec. 2.2) with a real parent: heal a child (e.g. a Puzzle child of the
# parent, saved by model.py in the native or DeciLM format) with a local Hugging Face Llama
# download (config.json + safetensors) as the teacher. Loss: per-layer cosine + KL, no LM loss.
# data_dir must hold that model's tokenizer.model and token shards written with it:
#   python data.py --tokenize_text=corpus.txt --tokenizer=/models/Llama-3.2-1B --out_dir=out/llama_data
#   python distill.py config/distill_hf_llama.py
teacher = "/models/Llama-3.2-1B"      # a local LlamaForCausalLM folder (no downloads at run time)
init_from = "out/child_llama"         # the student: same depth as the teacher (Puzzle child)
data_dir = "out/llama_data"
out_dir = "out/child_llama_kd"
seq_len = 2048
device_batch_size = 4
total_batch_size = 65536              # 4 seqs x 2048 tokens x 8 micro-steps on 1 GPU
vocab_chunk = 2048                    # 2048 x 128,256 fp32 = 1 GB per chunk and model
kd_weight = 1.0
cosine_weight = 1.0
lm_weight = 0.0
lr = 1e-4
warmup_steps = 50
max_steps = 1000
device = "cuda"
eval_interval = 100
ckpt_interval = 200
