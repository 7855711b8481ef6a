"""TrainConfig IO, DeepSpeed JSON validation/filling, hostfile + launch_check: one clear line each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmgpt.train.config import DS_CONFIG_DIR, ConfigError, TrainConfig
from mmgpt.train import launch_check
from mmgpt.train.ds_config import DSConfigError, fill_optimizer, load_ds_config, resolve_batch
from mmgpt.train.launch_check import LaunchError, parse_hostfile, world_size

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


DOLLY = json.dumps({"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"})


def write_mixture(folder: Path, extra: str = "", records: int = 3) -> Path:
    """A mixture launch_check accepts: one dolly source with `records` usable records."""
    write(folder / "d.jsonl", "".join(DOLLY + "\n" for _ in range(records)))
    return write(folder / "mixture.yaml", f"{extra}sources:\n- {{name: d, type: dolly, path: d.jsonl}}\n")


# ---------------------------------------------------------------- TrainConfig


def test_config_roundtrip_resolves_paths_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    cfg_file = write(tmp_path / "cfg" / "run.yaml", (
        "mixture: ../data/mixture.yaml\noutput_dir: out\n"
        "schedule: {lr: 1e-5, grad_accum: 4}\nmodel: {preset: tiny, lora: paper}\n"))
    cfg = TrainConfig.load(cfg_file, ["schedule.max_steps=7", "output_dir=elsewhere", "packing.max_tokens=256"])
    assert cfg.mixture == str(tmp_path / "data" / "mixture.yaml")  # relative to the config file
    assert cfg.output_dir == str(tmp_path / "elsewhere")  # CLI override: relative to the cwd
    assert cfg.schedule.lr == 1e-5 and isinstance(cfg.schedule.lr, float)  # YAML reads 1e-5 as a string
    assert (cfg.schedule.max_steps, cfg.schedule.grad_accum, cfg.packing.max_tokens) == (7, 4, 256)
    assert cfg.model.lora == "paper"
    assert cfg.deepspeed == str(DS_CONFIG_DIR / "zero2.json")
    cfg.save(tmp_path / "resolved.yaml")
    assert TrainConfig.load(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("body, message", [
    ("schedule: {lr: abc}", "schedule: lr: expected a number, got 'abc'"),
    ("modle: {}", "unknown key(s) ['modle']"),
    ("packing: {max_tokens: 0}", "packing: PackingConfig.max_tokens must be >= 1"),
    ("schedule: {epochs: 0}", "schedule: schedule.epochs and schedule.grad_accum must be >= 1"),
    ("save_every: true", "save_every: expected an integer, got True"),
    ("model: {preset: tiny, dropout: 0.1}", "model: unknown key(s) ['dropout']"),
    ("schedule: {betas: [0.9]}", "schedule: betas: expected 2 values, got 1"),
    # issue 22: `lr: .inf` trained an all-NaN adapter with rc 0, `lr: nan` crashed after the model build
    ("schedule: {lr: .inf}", "schedule: lr: expected a finite number, got inf"),
    ("schedule: {lr: nan}", "schedule: lr: expected a finite number, got nan"),
    ("schedule: {lr: .nan}", "schedule: lr: expected a finite number, got nan"),
    ("schedule: {weight_decay: -0.1}", "schedule.weight_decay must be a finite number >= 0, got -0.1"),
    ("schedule: {betas: [0.9, 1.0]}", "schedule.betas must both be in [0, 1), got [0.9, 1.0]"),
    ("schedule: {warmup_steps: -1}", "schedule.warmup_steps must be >= 0 or null"),
    ("cpu_peak_flops: 0", "cpu_peak_flops must be a finite number > 0, got 0.0"),
    ("peak_flops: -.inf", "peak_flops: expected a finite number, got -inf"),
    ("eval: {holdout: .nan}", "eval: holdout: expected a finite number, got nan"),
])
def test_config_errors_name_file_and_key(tmp_path, body, message):
    path = write(tmp_path / "bad.yaml", f"mixture: m.yaml\noutput_dir: o\n{body}\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.load(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_config_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['mixture'\]"):
        TrainConfig.load(write(tmp_path / "a.yaml", "output_dir: o\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.load(write(tmp_path / "b.yaml", "mixture: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        TrainConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        TrainConfig.load(write(tmp_path / "c.yaml", "mixture: m\noutput_dir: o\n"), ["schedule.lr"])


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = TrainConfig.load(path)
        assert Path(cfg.deepspeed).is_file(), path


# ---------------------------------------------------------------- DeepSpeed JSON


@pytest.mark.parametrize("name", ["zero2.json", "zero2_offload.json"])
def test_shipped_ds_configs(name):
    ds = load_ds_config(REPO / "ds_configs" / name)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert ("offload_optimizer" in zero) == ("offload" in name)


@pytest.mark.parametrize("text, message", [
    ('{"bf16": {"enabled": true},\n "zero_optimization": {"stage": 2,}}', ":2:35: invalid JSON"),
    ('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 3}}', "zero_optimization.stage=3 is not supported"),
    ('{"zero_optimization": {"stage": 2}}', "enable exactly one of bf16 and fp16"),
    ('{"bf16": {"enabled": true}, "fp16": {"enabled": true}}', "enable exactly one of bf16 and fp16"),
    ('{"bf16": {"enabled": true, "check_grad_overflow": false}}', "check_grad_overflow must stay true"),
    ('{"bf16": {"enabled": true}, "train_batch_size": 0}', "train_batch_size must be a positive integer"),
    ('[1, 2]', "expected a JSON object"),
    ('{"bf16": {"enabled": true}, "data_types": {"grad_accum_dtype": "fp32"},'
     ' "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}', "every later step is skipped"),
])
def test_ds_config_errors(tmp_path, text, message):
    path = write(tmp_path / "ds.json", text)
    with pytest.raises(DSConfigError) as err:
        load_ds_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_resolve_batch_fills_auto_and_checks_explicit():
    ds = load_ds_config(REPO / "ds_configs" / "zero2.json")
    filled = resolve_batch(ds, micro=1, accum=16, world=8)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"]) == (1, 16, 128)
    assert ds["train_batch_size"] == "auto"  # the input is not modified
    explicit = dict(ds, train_batch_size=128, gradient_accumulation_steps=16)
    assert resolve_batch(explicit, 1, 16, 8)["train_batch_size"] == 128
    with pytest.raises(DSConfigError, match=r"train_batch_size=256 does not match .* = 128"):
        resolve_batch(dict(ds, train_batch_size=256), 1, 16, 8, where="x.json")
    with pytest.raises(DSConfigError, match=r"gradient_accumulation_steps=8 does not match schedule.grad_accum"):
        resolve_batch(dict(ds, gradient_accumulation_steps=8), 1, 16, 8)


def test_fill_optimizer():
    ds = load_ds_config(REPO / "ds_configs" / "zero2.json")
    filled = fill_optimizer(ds, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.1, total_steps=100,
                            warmup_steps=0, min_lr_ratio=0.1, cpu=True)
    assert filled["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-8,
                                             "weight_decay": 0.1, "torch_adam": True}
    sched = filled["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"], sched["cos_min_ratio"]) == (100, 1, 0.1)
    offload = load_ds_config(REPO / "ds_configs" / "zero2_offload.json")
    filled = fill_optimizer(offload, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0, total_steps=10,
                            warmup_steps=1, min_lr_ratio=0.0, cpu=True)
    assert "torch_adam" not in filled["optimizer"]["params"]  # offload needs DeepSpeed's CPU Adam
    on_gpu = fill_optimizer(ds, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0, total_steps=10,
                            warmup_steps=1, min_lr_ratio=0.0, cpu=False)["optimizer"]["params"]
    assert on_gpu["torch_adam"] is True and on_gpu["fused"] is True  # torch's fused AdamW: no nvcc
    ds["optimizer"]["params"]["eps"] = "auto"
    with pytest.raises(DSConfigError, match=r"optimizer.params.eps"):
        fill_optimizer(ds, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0, total_steps=10,
                       warmup_steps=1, min_lr_ratio=0.0, cpu=False)


@pytest.mark.parametrize("key, written", [("lr", 3e-4), ("betas", [0.9, 0.95]), ("weight_decay", 0.1)])
def test_ds_json_values_that_disagree_with_the_schedule_are_refused(key, written):
    ds = load_ds_config(REPO / "ds_configs" / "zero2.json")
    ds["optimizer"]["params"][key] = written
    kwargs = dict(lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0, total_steps=10, warmup_steps=1,
                  min_lr_ratio=0.0, cpu=True)
    with pytest.raises(DSConfigError, match=rf"optimizer.params.{key} = .* disagrees .* schedule.{key}"):
        fill_optimizer(ds, **kwargs)
    ds["optimizer"]["params"][key] = kwargs[key] if key != "betas" else [0.9, 0.999]  # the same value is fine
    assert fill_optimizer(ds, **kwargs)["optimizer"]["params"][key] == ds["optimizer"]["params"][key]


# ---------------------------------------------------------------- hostfile + launch_check


def test_hostfile_parsing_blank_and_comments(tmp_path):
    path = write(tmp_path / "hosts", "# cluster\n\nnode-a slots=8\nnode-b slots=4  # small one\n")
    hosts = parse_hostfile(path)
    assert [(h.name, h.slots, h.line) for h in hosts] == [("node-a", 8, 3), ("node-b", 4, 4)]
    assert world_size(path, None, None) == 12
    assert world_size(path, 4, None) == 8
    assert world_size(path, 8, 1) == 8
    assert parse_hostfile(REPO / "launch" / "hostfile.example")


@pytest.mark.parametrize("text, args, message", [
    ("node-a slots=8\nnode-a slots=8\n", (None, None), "hosts:2: host 'node-a' is listed twice (first on line 1)"),
    ("node-a 8\n", (None, None), "hosts:1: expected 'HOST slots=N', got 'node-a 8'"),
    ("node-a slots=0\n", (None, None), "hosts:1: slots must be a positive integer, got '0'"),
    ("node-a slots=four\n", (None, None), "hosts:1: slots must be a positive integer, got 'four'"),
    ("# only comments\n\n", (None, None), "no hosts"),
    ("node-a slots=8\nnode-b slots=4\n", (8, None), "hosts:2: 8 GPUs per node requested but host 'node-b' has slots=4"),
    ("node-a slots=8\n", (None, 2), "2 nodes requested but the hostfile lists 1"),
])
def test_hostfile_errors(tmp_path, text, args, message):
    path = write(tmp_path / "hosts", text)
    with pytest.raises(LaunchError) as err:
        world_size(path, *args)
    assert message in str(err.value)


def test_launch_check_cli_one_line_and_exit_code(tmp_path, capsys):
    mixture = write_mixture(tmp_path)
    cfg = write(tmp_path / "run.yaml", f"mixture: {mixture}\noutput_dir: out\nschedule: {{grad_accum: 4}}\n")
    hosts = write(tmp_path / "hosts", "a slots=2\nb slots=2\n")
    assert launch_check.main(["--config", str(cfg), "--hostfile", str(hosts)]) == 0
    assert "global batch 1 row(s) x accumulation 4 x 4 ranks = 16 rows per step" in capsys.readouterr().out

    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["train_batch_size"] = 32
    ds_file = write(tmp_path / "ds.json", json.dumps(ds))
    cases = [
        (["--config", str(cfg), "--ds-config", str(ds_file), "--num-gpus", "2"], "train_batch_size=32 does not match"),
        (["--config", str(cfg), "--hostfile", str(tmp_path / "missing")], "hostfile not found"),
        (["--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["--ds-config", str(write(tmp_path / "broken.json", "{"))], "invalid JSON"),
        (["--config", str(write(tmp_path / "nomix.yaml", "mixture: nope.yaml\noutput_dir: o\n"))],
         "mixture file not found"),
        (["--num-gpus", "0"], "--num-gpus must be >= 1"),
    ]
    for argv, message in cases:
        assert launch_check.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("launch_check: error: ") and message in err, err


# ---------------------------------------------------------------- `mmgpt train` refuses bad input before starting


def test_launch_check_refuses_a_run_without_a_usable_sample(tmp_path, capsys):
    """Issue 22: `sample: 0` everywhere, or max_length below every sample, exited 0 with an
    untrained adapter and data_report.json showing kept 0, dropped {}; now rc 2 before the launcher,
    the line saying why; one usable sample is enough."""
    cases = {
        "nothing sampled": ("", "sample: 0", "no usable sample: 0 selected"),
        "all too long": ("max_length: 4\n", "sample: all", "no usable sample: 3 selected, dropped at tokenisation "
                                                             "{'too_long': 3} (max_length 4)"),
    }
    for name, (top, sample, message) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        mixture = write_mixture(folder, top)
        mixture.write_text(mixture.read_text().replace("d.jsonl}", f"d.jsonl, {sample}}}"))
        cfg = write(folder / "run.yaml", f"mixture: {mixture}\noutput_dir: out\n")
        assert launch_check.main(["--config", str(cfg)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (name, err)
    one = write_mixture(tmp_path, "max_length: 512\n", records=1)
    cfg = write(tmp_path / "one.yaml", f"mixture: {one}\noutput_dir: out\n")
    assert launch_check.main(["--config", str(cfg)]) == 0, capsys.readouterr().err


def test_train_cli_rejects_bad_input_with_one_line(tmp_path, capsys, monkeypatch):
    from mmgpt.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    mixture = write(tmp_path / "mixture.yaml", "max_length: 512\nsources:\n- {name: d, type: dolly, path: d.jsonl}\n")
    stage3 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    stage3["zero_optimization"]["stage"] = 3
    wrong_batch = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    wrong_batch["train_batch_size"] = 8
    busy = tmp_path / "busy"
    (busy / "checkpoints" / "step_00000004").mkdir(parents=True)
    (busy / "checkpoints" / "latest").write_text("step_00000004\n")
    base = f"mixture: {mixture}\noutput_dir: {tmp_path / 'out'}\npacking: {{max_tokens: 512}}\n"
    cases = {
        "stage 3": (f"deepspeed: {write(tmp_path / 's3.json', json.dumps(stage3))}\n", "stage=3 is not supported"),
        "batch": (f"deepspeed: {write(tmp_path / 'b.json', json.dumps(wrong_batch))}\n",
                  "train_batch_size=8 does not match rows_per_batch x grad_accum x world = 2"),
        "rows too short": ("packing: {max_tokens: 256}\n", "max_length 512 > packing.max_tokens 256"),
        "no mixture": (f"mixture: {tmp_path / 'missing.yaml'}\n", "missing.yaml"),
        "restart over a run": (f"output_dir: {busy}\n", "already has checkpoints (latest step_00000004): pass --resume auto"),
        "typo": ("schedule: {lr: fast}\n", "schedule: lr: expected a number, got 'fast'"),
    }
    for name, (extra, message) in cases.items():
        config = write(tmp_path / f"{name.replace(' ', '_')}.yaml", base + extra)
        assert main(["train", "--config", str(config)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("mmgpt train: error: ") and err.count("\n") == 1 and message in err, (name, err)


def test_deepspeed_env_file(tmp_path, capsys):
    good = write(tmp_path / "good_env", "OMP_NUM_THREADS=8\nHF_HOME=/data/hf cache\n")
    assert launch_check.main(["--deepspeed-env", str(good)]) == 0
    assert "2 variable(s)" in capsys.readouterr().out
    for text, line in (("A=1\n\nB=2\n", 2), ("# exported\nA=1\n", 1), ("A=1\nbad name=2\n", 2)):
        bad = write(tmp_path / "bad_env", text)
        assert launch_check.main(["--deepspeed-env", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"bad_env:{line}: expected NAME=VALUE" in err and err.count("\n") == 1
