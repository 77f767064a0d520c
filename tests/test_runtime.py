"""runtime.py: configuration, LR schedule, batch bookkeeping."""
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from configurator import ConfigError, parse_config, read_preset
from runtime import doc_ids_and_positions, grad_accum_steps, lr_at


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    lr: float = 1e-3
    flag: bool = False
    maybe: float | None = None


def test_flags_presets_and_types(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text('"""a preset"""\n# comment\nsteps = 20\nlr = 3e-4\nname = "from-file"\n')
    cfg = parse_config(Cfg, [str(preset), "--steps=1e2", "--flag=True", "--name=1.50", "--maybe=0.5"])
    assert cfg == Cfg(name="1.50", steps=100, lr=3e-4, flag=True, maybe=0.5)  # flags win over presets
    assert parse_config(Cfg, ["--maybe=None", "--name='a b'"]) == Cfg(name="a b")
    with pytest.raises(ConfigError, match="unknown key 'step'; valid keys: flag, lr, maybe, name, steps"):
        parse_config(Cfg, ["--step=3"])
    with pytest.raises(ConfigError, match="flag --steps: steps=2.5 is not a valid int"):
        parse_config(Cfg, ["--steps=2.5"])
    with pytest.raises(ConfigError, match="flag --flag"):
        parse_config(Cfg, ["--flag=maybe"])
    with pytest.raises(ConfigError, match="use --key=value"):
        parse_config(Cfg, ["--flag"])


def test_presets_are_never_executed(tmp_path):
    bad = tmp_path / "evil.py"
    bad.write_text("import os\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"evil.py:1: only `name = literal` lines"):
        read_preset(str(bad))
    bad.write_text("steps = __import__('os').getpid()\n")
    with pytest.raises(ConfigError, match="evil.py:1: the value of steps is not a literal"):
        read_preset(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        read_preset(str(tmp_path / "nope.py"))


def test_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--help"])
    assert e.value.code == 0 and "--steps=10" in capsys.readouterr().out


def test_lr_schedule_endpoints():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)  # cosine to min at the last step
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_lr_schedule_is_cosine_between_the_endpoints():
    """The decay between warmup and the last step follows the half cosine, not a straight line
    (which shares the endpoints and the midpoint): values written out at a quarter and three
    quarters of the decay, and the warmup ramp step by step."""
    lr, warm, steps, floor = 2.0, 4, 25, 0.1       # decay over steps 4..24: progress (s - 4) / 20
    for s, progress in ((4, 0.0), (9, 0.25), (14, 0.5), (19, 0.75), (24, 1.0), (30, 1.0)):
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_at(s, steps, lr, warm, floor) == pytest.approx(lr * (floor + (1 - floor) * cosine), rel=1e-12), s
    assert lr_at(9, steps, lr, warm, floor) == pytest.approx(2.0 * (0.1 + 0.9 * 0.8535533905932737))  # not 0.775 * 2
    assert [lr_at(s, steps, lr, warm, floor) for s in range(warm)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lr_at(0, 10, 1.0, 0, 0.0) == pytest.approx(1.0)    # no warmup: the peak at step 0
    assert lr_at(9, 10, 1.0, 0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert [lr_at(s, 2, 1.0, 0, 0.1) for s in (0, 1)] == pytest.approx([1.0, 0.1])   # 2 steps: peak, floor


def test_grad_accum_from_global_batch():
    assert grad_accum_steps(8192, 16, 256, 1) == 2
    assert grad_accum_steps(8192, 16, 256, 2) == 1
    with pytest.raises(ConfigError, match="multiple of"):
        grad_accum_steps(8192, 16, 256, 3)


def test_doc_ids_and_positions_restart_at_bos():
    x = torch.tensor([[7, 1, 5, 7, 2, 7, 3, 4]])
    doc, pos = doc_ids_and_positions(x, bos_id=7)
    assert doc.tolist() == [[1, 1, 1, 2, 2, 3, 3, 3]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    doc, pos = doc_ids_and_positions(torch.tensor([[4, 5, 7, 6]]), bos_id=7)  # window starts mid-document
    assert doc.tolist() == [[0, 0, 1, 1]] and pos.tolist() == [[0, 1, 0, 1]]


def test_gradients_are_reduced_only_on_the_last_micro_step(tmp_path):
    """DDP (one gloo process is enough to count its all-reduces) with grad_sync: 3 micro-steps
    run 1 reduction, and the accumulated gradient is the sum of the 3."""
    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel as DDP
    from runtime import grad_sync
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        model = DDP(net)
        calls = []

        def counting_hook(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        model.register_comm_hook(None, counting_hook)
        xs = torch.randn(3, 5, 4)
        for m in range(3):
            with grad_sync(model, m == 2):
                model(xs[m]).sum().backward()
        assert len(calls) == 1
        expected = torch.autograd.grad(net(xs.reshape(15, 4)).sum(), net.weight)[0]
        assert torch.allclose(net.weight.grad, expected, atol=1e-6)
        net.zero_grad()
        calls.clear()
        for m in range(3):  # without no_sync every micro-step would reduce
            with grad_sync(model, True):
                model(xs[m]).sum().backward()
        assert len(calls) == 3
    finally:
        td.destroy_process_group()


def test_every_preset_parses(tmp_path):
    """Every preset parses and validates; its input folders are replaced by existing ones (validate
    checks that inputs exist, and the presets name folders of other machines)."""
    import glob
    import os
    from dataclasses import replace
    from distill import DistillConfig
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    presets = sorted(glob.glob(os.path.join(root, "config", "*.py")))
    assert len(presets) >= 4
    inputs = tmp_path / "in"            # inputs and outputs apart: a stage never writes into its inputs
    inputs.mkdir()
    here = [f"--data_dir={inputs}"]
    for p in presets:
        keys = read_preset(p)
        if "_sft_" in os.path.basename(p):   # an sft.py preset: its keys are SFTConfig's, with their types
            import dataclasses
            from sft import SFTConfig        # (the smoke speedrun runs it: tests/test_speedrun.py)
            fields = {f.name: f.type for f in dataclasses.fields(SFTConfig)}
            assert keys and set(keys) <= set(fields), (p, set(keys) - set(fields))
            assert all(isinstance(v, fields[k]) for k, v in keys.items()), (p, keys)
            continue
        extra = [f"--{k}={inputs}" for k in ("init_from", "teacher") if keys.get(k, "scratch") not in ("", "scratch")]
        parse_config(DistillConfig, [p, *here, *extra, f"--out_dir={tmp_path / 'out'}"])
    nano = parse_config(DistillConfig, [os.path.join(root, "config", "nano_parent_cpu.py"), *here,
                                        f"--out_dir={tmp_path / 'parent'}"])
    # the preset spells out the defaults: eval_interval resolved from the run length, seq_len=0 and
    # total_batch_size=0 as distill.py resolves them for a scratch model (on any data: a 4,096-token
    # batch of 16 rows caps a row at 256 tokens, here documents of 300 and 1,000 tokens)
    import numpy as np
    from distill import resolve_lengths
    defaults = DistillConfig(device="cpu")
    assert (defaults.seq_len, defaults.total_batch_size) == (0, 0)
    docs = np.concatenate([np.r_[0, np.ones(299)], np.r_[0, np.ones(999)]]).astype(np.uint16)
    resolve_lengths(defaults, docs, 0, [], 1)
    assert nano == replace(defaults, data_dir=str(inputs), out_dir=str(tmp_path / "parent"),
                           eval_interval=nano.eval_interval)
    assert (nano.seq_len, nano.total_batch_size) == (256, 4096)


def _tiny_checkpoint_parts(tmp_path):
    from data import train_tokenizer
    from model import ModelConfig, Transformer
    from runtime import make_optimizer
    tok = train_tokenizer("the cat sat on the mat. " * 50, 520, str(tmp_path / "tok"), progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.llama(num_layers=1, vocab_size=tok.n_vocab, hidden_size=16, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=16))
    return model, make_optimizer(model, 1e-3, 0.1), tok


def test_every_checkpoint_file_is_written_atomically(tmp_path, monkeypatch):
    """Each file of a checkpoint (weights, config.json, tokenizer files, trainer_state.pt,
    train_config.json; shards + index of a sharded save and of token shards) reaches its name by a
    rename from a `.tmp-*` file after an fsync; leftovers of a killed save are removed."""
    import os
    import numpy as np
    from data import write_token_shards
    from checkpoint import save_model
    from runtime import save_checkpoint
    model, opt, tok = _tiny_checkpoint_parts(tmp_path)
    renamed, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((os.path.basename(a), os.path.basename(b))),
                                                     real_replace(a, b))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / ".tmp-k1ll3d-model.safetensors").write_bytes(b"half a file")   # a save that was killed
    save_checkpoint(str(out), model, opt, 3, Cfg(), tok)
    files = sorted(os.listdir(out))
    assert files == ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_meta.json",
                     "train_config.json", "trainer_state.pt"]
    assert {b for a, b in renamed if a.startswith(".tmp-")} == set(files) and len(renamed) == len(files)
    assert len(synced) >= 2 * len(files)    # the file, then its folder
    renamed.clear()
    save_model(model, str(tmp_path / "sharded"), max_shard_bytes=4000)
    sharded = sorted(os.listdir(tmp_path / "sharded"))
    assert "model.safetensors.index.json" in sharded and len(sharded) > 3
    assert sorted(b for a, b in renamed if a.startswith(".tmp-")) == sharded
    renamed.clear()
    write_token_shards([[1, 5, 6], [1, 7]], str(tmp_path / "shards"), np.uint16, shard_tokens=3)
    assert sorted(b for a, b in renamed if a.startswith(".tmp-")) == ["index.json", "shard_000.bin", "shard_001.bin"]


def test_interrupted_save_keeps_the_old_state_and_resume_clears_leftovers(tmp_path, monkeypatch):
    import os
    from model import CheckpointError
    from runtime import load_trainer_state, save_checkpoint
    model, opt, tok = _tiny_checkpoint_parts(tmp_path)
    out = str(tmp_path / "ckpt")
    save_checkpoint(out, model, opt, 2, Cfg(), tok)
    before = open(os.path.join(out, "trainer_state.pt"), "rb").read()

    def killed(obj, path):   # the process dies halfway through writing trainer_state.pt
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, model, opt, 4, Cfg(), tok)
    monkeypatch.undo()
    assert open(os.path.join(out, "trainer_state.pt"), "rb").read() == before
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    # weights of step 4 beside the state of step 2: named, not loaded
    with pytest.raises(ConfigError, match="model.safetensors is from step 4 but trainer_state.pt from step 2"):
        load_trainer_state(out)
    save_checkpoint(out, model, opt, 4, Cfg(), tok)
    open(os.path.join(out, ".tmp-xyz-trainer_state.pt"), "wb").write(b"leftover of a kill -9")
    assert load_trainer_state(out)["step"] == 4
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    state = open(os.path.join(out, "trainer_state.pt"), "rb").read()
    open(os.path.join(out, "trainer_state.pt"), "wb").write(state[:len(state) // 2])
    with pytest.raises(CheckpointError, match="trainer_state.pt: truncated or not a trainer state"):
        load_trainer_state(out)


def test_atomic_write_and_writability_checks(tmp_path):
    import os
    from configurator import atomic_write, check_writable_dir
    p = tmp_path / "f.json"
    atomic_write(str(p), '{"a": 1}')
    atomic_write(str(p), b"new")
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.json"]
    with pytest.raises(ZeroDivisionError):
        atomic_write(str(p), lambda path: (open(path, "w").write("partial"), 1 / 0))
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.json"]
    check_writable_dir(str(tmp_path / "new" / "deeper"), "out_dir")     # may be created
    assert sorted(os.listdir(tmp_path)) == ["f.json"]                    # the probe leaves nothing
    with pytest.raises(ConfigError, match="--out_dir=.*exists and is not a folder"):
        check_writable_dir(str(p), "out_dir")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_writable_dir(str(p / "sub"), "out_dir")
    with pytest.raises(ConfigError, match="not writable"):
        check_writable_dir("/proc/nanonemotron/out", "out_dir")


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_in(tmp_path, monkeypatch):
    import os
    import configurator
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "w").write_text("old")

    def write(tmp, text):
        with open(os.path.join(tmp, "w"), "w") as f:
            f.write(text)
    with pytest.raises(ZeroDivisionError):   # the writer fails: nothing changes
        configurator.atomic_dir(str(folder), lambda tmp: (write(tmp, "half"), 1 / 0))
    assert (folder / "w").read_text() == "old" and os.listdir(tmp_path) == ["ckpt"]
    real, calls = os.rename, []

    def second_rename_fails(a, b):   # the old folder moved aside, then the new one cannot go in
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(a, b)
    monkeypatch.setattr(configurator.os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="disk went away"):
        configurator.atomic_dir(str(folder), lambda tmp: write(tmp, "new"))
    monkeypatch.setattr(configurator.os, "rename", real)
    assert (folder / "w").read_text() == "old" and os.listdir(tmp_path) == ["ckpt"]   # put back, no leftovers
    configurator.atomic_dir(str(folder), lambda tmp: write(tmp, "new"))
    assert (folder / "w").read_text() == "new" and os.listdir(tmp_path) == ["ckpt"]


def test_resolve_precision_follows_the_measured_cpu_speedup(monkeypatch):
    """auto: bf16 on a GPU; on a CPU bf16 only when a bf16 matmul is measured >= 1.3x faster."""
    import runtime
    assert runtime.resolve_precision("cuda", "auto") == "bf16"
    assert runtime.resolve_precision("cpu", "fp32") == "fp32" and runtime.resolve_precision("cpu", "bf16") == "bf16"
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 3.6)
    assert runtime.resolve_precision("cpu", "auto") == "bf16"
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.7)   # emulated bf16: slower
    assert runtime.resolve_precision("cpu", "auto") == "fp32"
    with pytest.raises(runtime.ConfigError, match="--precision='fp16'"):
        runtime.resolve_precision("cpu", "fp16")
    monkeypatch.undo()
    assert runtime.cpu_bf16_speedup(m=64, k=16, n=32, repeats=1) > 0   # the probe itself runs
    assert isinstance(runtime.autocast("cpu", "bf16"), torch.autocast)


def test_windows_apply_the_loss_mask():
    """Targets whose mask is 0 (prompts, first copies) and BOS targets are ignored (-100)."""
    from runtime import windows
    data = np.array([0, 5, 6, 7, 0, 8, 9, 10, 11], dtype=np.uint16)   # BOS = 0
    mask = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1], dtype=np.uint8)
    x, y, doc, pos = windows(data, [0], 8, 0, "cpu", mask)
    assert x.tolist() == [[0, 5, 6, 7, 0, 8, 9, 10]]
    assert y.tolist() == [[-100, 6, 7, -100, 8, -100, 10, 11]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    y_all = windows(data, [0], 8, 0, "cpu")[1]
    assert y_all.tolist() == [[5, 6, 7, -100, 8, 9, 10, 11]]
