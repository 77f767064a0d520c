"""
tools/bench_serve.py: requests/s and tokens/s of serve.py for 1 client against 32 concurrent
clients, measured side by side in one run (the rounds interleave, so a change of the machine's load
slows both alike), with the ratio. Not a test: it prints numbers.

    python tools/bench_serve.py                         # out/parent if it exists, else a fresh tiny model
    python tools/bench_serve.py --ckpt=out/child --max_tokens=64 --rounds=3 --compile=False

Starts `python serve.py` on a free loopback port as a subprocess, warms it up (the compiled decode
step is built once per batch size), then per round: --requests_1 requests one after the other,
then --clients concurrent clients sending --requests_32 requests in all, each greedy with
--max_tokens new tokens. tokens/s counts the completion tokens the server reports (usage).
The fresh model (when there is no checkpoint) is the nano parent's shape (6 layers, hidden 128,
4 query / 2 KV heads, SwiGLU 384, context 256) with random weights and a byte-level tokenizer.
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import check_positive, run_main  # noqa: E402


@dataclass
class BenchConfig:
    ckpt: str = ""             # default: out/parent if it exists, else a fresh tiny model
    clients: int = 32          # concurrent clients of the batched measurement
    requests_1: int = 8        # requests per round with one client
    requests_32: int = 64      # requests per round with --clients clients
    max_tokens: int = 64       # new tokens per request (greedy; fewer if the model stops)
    rounds: int = 2            # interleaved rounds; the medians are printed
    compile: bool = True       # serve.py --compile

    def validate(self):
        check_positive(self, "clients", "requests_1", "requests_32", "max_tokens", "rounds")


def fresh_checkpoint(folder):
    import torch

    from data import LLAMA3_SPECIAL_TOKENS, Tokenizer
    from model import ModelConfig, Transformer
    from checkpoint import save_model
    tok = Tokenizer({bytes([i]): i for i in range(256)}, {t: 256 + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)})
    torch.manual_seed(0)
    model = Transformer(ModelConfig.llama(6, vocab_size=tok.n_vocab, hidden_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=384, max_position_embeddings=256))
    save_model(model.eval(), folder)
    tok.save(folder)
    return folder


def post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data}")
    return data["usage"]["completion_tokens"]


def measure(port, clients, n_requests, max_tokens):
    """n_requests greedy requests by `clients` threads -> (requests/s, tokens/s)."""
    tokens, lock, next_i = [0], threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= n_requests:
                    return
                next_i[0] += 1
            body = {"messages": [{"role": "system", "content": "detailed thinking off"},
                                 {"role": "user", "content": f"Add mod 10: {i % 10}+{(3 * i) % 10}+4"}],
                    "max_tokens": max_tokens, "temperature": 0}
            n = post(port, body)
            with lock:
                tokens[0] += n
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    return n_requests / dt, tokens[0] / dt


def main(cfg):
    ckpt = cfg.ckpt or (os.path.join(ROOT, "out", "parent") if os.path.isdir(os.path.join(ROOT, "out", "parent"))
                        else None)
    tmp = tempfile.TemporaryDirectory()
    if ckpt is None:
        ckpt = fresh_checkpoint(os.path.join(tmp.name, "tiny"))
        print(f"[no out/parent: a fresh nano-parent-shaped model with random weights in {ckpt}]", file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANO_API_KEY")}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}", "--port=0",
                             f"--max_batch={max(cfg.clients, 1)}", f"--compile={cfg.compile}"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        port = None
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("[serving"):
                port = int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
                break
        if port is None:
            raise SystemExit(f"serve.py exited with status {proc.wait()}")
        threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stderr], daemon=True).start()
        t0 = time.perf_counter()
        measure(port, 1, 2, cfg.max_tokens)  # warm-up: compiles the step for the batch sizes used
        measure(port, cfg.clients, cfg.clients * 2, cfg.max_tokens)
        print(f"[warm-up {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
        one, many = [], []
        for r in range(cfg.rounds):
            one.append(measure(port, 1, cfg.requests_1, cfg.max_tokens))
            many.append(measure(port, cfg.clients, cfg.requests_32, cfg.max_tokens))
            print(f"[round {r + 1}: 1 client {one[-1][0]:.2f} req/s {one[-1][1]:.1f} tok/s; {cfg.clients} clients "
                  f"{many[-1][0]:.2f} req/s {many[-1][1]:.1f} tok/s]", file=sys.stderr)
        med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
        print(f"clients_1_requests_per_s: {med(one, 0):.2f}")
        print(f"clients_1_tokens_per_s: {med(one, 1):.1f}")
        print(f"clients_{cfg.clients}_requests_per_s: {med(many, 0):.2f}")
        print(f"clients_{cfg.clients}_tokens_per_s: {med(many, 1):.1f}")
        print(f"ratio_requests_per_s: {med(many, 0) / med(one, 0):.2f}")
        print(f"ratio_tokens_per_s: {med(many, 1) / med(one, 1):.2f}")
        print(f"[{ckpt}, greedy, max_tokens {cfg.max_tokens}, compile {cfg.compile}, medians of {cfg.rounds} "
              f"interleaved rounds]", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()


if __name__ == "__main__":
    run_main(main, BenchConfig)
