"""The whole chain at smoke size (SMOKE=1 bash speedrun.sh: every stage a few steps on a tiny world),
so a stage that breaks the chain fails CI; a failing stage stops the chain with its exit code, and a
rerun resumes after the last completed stage."""
import json
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("data", "parent", "puzzle", "kd", "sft", "grpo", "eval", "report")


# The stages run as a user runs them: PyTorch references on CPU, not the Triton interpreter that
# conftest.py switches on for the kernel tests (it would make the chain ~5x slower).
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def speedrun(out, **env):
    return subprocess.run(["bash", os.path.join(ROOT, "speedrun.sh")], capture_output=True, text=True, timeout=600,
                          env={**ENV, "SMOKE": "1", "OUT": str(out), "OMP_NUM_THREADS": "1", **env})


def test_smoke_chain_fails_loudly_and_resumes(tmp_path):
    out = tmp_path / "out"
    r = speedrun(out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for s in STAGES:
        assert (out / ".done" / s).exists(), s
    rep = json.load(open(out / "report.json"))
    for m in ("parent", "child"):
        assert {"params", "kv_bytes_per_token", "decode_tokens_per_s", "accuracy"} <= set(rep[m])
    assert "predicted_speedup" in rep["child"]
    for m in ("sft", "grpo"):
        assert {"accuracy_on", "accuracy_off", "think_rate_on", "think_rate_off"} <= set(rep[m])
    assert set(STAGES) - {"report"} <= set(rep["seconds"]) and rep["device"]
    md = open(out / "report.md").read()
    assert rep["n_problems"] == 6 and "| claim | holds |" in md
    # think rates carry two decimals: a 99.47% that fails the 99.5% check must not print as "99.5%"
    sft_row = next(line for line in md.splitlines() if line.startswith("| SFT |"))
    assert re.fullmatch(r"\| SFT \| [\d.]+ \| [\d.]+ \| \d+\.\d\d% \| \d+\.\d\d% \|", sft_row), sft_row
    # the SFT stage ran with the nano preset's position gaps (sft.py's own default is 0, the paper's)
    assert json.load(open(out / "sft" / "train_config.json"))["pos_gap"] == 24
    for png in ("accuracy_by_k.png", "curves.png", "puzzle/layout.png"):
        assert (out / png).stat().st_size > 0, png

    # A stage that fails stops the chain with its exit code (2: a clear one-line error) ...
    os.remove(out / ".done" / "report")
    os.remove(out / "report.json")
    bench = out / "eval" / "bench.json"
    shutil.move(bench, tmp_path / "bench.json")
    r = speedrun(out)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "== report FAILED with exit code 2" in r.stderr and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:") and "bench.json" in line]
    assert not (out / "report.json").exists() and not (out / ".done" / "report").exists()
    # ... and a rerun resumes there: the stages before are skipped, the rest run.
    shutil.move(tmp_path / "bench.json", bench)
    r = speedrun(out)
    assert r.returncode == 0, r.stderr[-3000:]
    for s in STAGES[:-1]:
        assert f"== {s}: done before, skipped" in r.stdout, s
    assert "== report: python" in r.stdout and (out / "report.json").exists()
