"""runtime.py: configuration, LR schedule, batch bookkeeping."""
import math
from dataclasses import dataclass

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
    here = [f"--data_dir={tmp_path}"]
    for p in presets:
        keys = read_preset(p)
        extra = [f"--{k}={tmp_path}" for k in ("init_from", "teacher") if keys.get(k, "scratch") not in ("", "scratch")]
        parse_config(DistillConfig, [p, *here, *extra, f"--out_dir={tmp_path / 'out'}"])
    nano = parse_config(DistillConfig, [os.path.join(root, "config", "nano_parent_cpu.py"), *here])
    assert nano == replace(DistillConfig(device="cpu"), data_dir=str(tmp_path))  # the preset spells out the defaults
