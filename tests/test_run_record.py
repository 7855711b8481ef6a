"""Resume compares what a checkpoint was trained with to the new run: safe changes are listed
with what takes effect, every other difference is one refusal naming the field, and it all
happens in `TrainRecipe.validate` (before any process group or model build). The configs are the README
demo's (configs/demo_tiny.yaml) over `mmgpt data sample` data; the record is written by the writer
checkpoints use. Real 2-rank resumes: tests/test_launch.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmgpt.train.config import TrainConfig
from mmgpt.data.sample import write_sample
from mmgpt.run_layout import TRAINED_WITH, CheckpointError
from mmgpt.train import run_record
from mmgpt.train.checkpointing import MANIFEST, CheckpointManager, tag_for, write_manifest
from mmgpt.train.recipe import RunOptions, TrainRecipe

REPO = Path(__file__).resolve().parent.parent
STEP = 5


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    return write_sample(tmp_path_factory.mktemp("data"), records=40, max_length=512)


def validate(cfg: TrainConfig, resume: bool, allow_unverified: bool = False):
    return TrainRecipe(cfg, RunOptions(resume=resume, allow_unverified=allow_unverified)).validate()


def config(out: Path, mixture: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.load(REPO / "configs" / "demo_tiny.yaml",
                            [f"mixture={mixture}", f"output_dir={out}", *overrides])


@pytest.fixture
def trained(tmp_path, mixture, monkeypatch) -> Path:
    """A run dir whose latest checkpoint (step 5) records the demo config on 2 ranks."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config(tmp_path, mixture)
    ds, mixture_cfg = validate(cfg, resume=False)
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    step_dir = manager.prepare(tag_for(STEP))
    run_record.write(step_dir, run_record.build(cfg, mixture_cfg, ds, world=2))
    write_manifest(step_dir)
    manager.commit(tag_for(STEP))
    return tmp_path


def test_unchanged_resume_has_no_changes(trained, mixture):
    validate(config(trained, mixture), resume=True)
    record = run_record.read(trained / "checkpoints" / tag_for(STEP))
    assert record["fields"]["world"] == 2 and len(record["config_hash"]) == 64
    assert {"schedule.lr", "model.preset", "model.lora", "mixture.seed", "mixture.sources",
            "deepspeed.zero_stage"} <= record["fields"].keys()


def test_safe_changes_are_listed_with_what_takes_effect(trained, mixture):
    cfg = config(trained, mixture, "schedule.lr=0.05", "schedule.max_steps=30", "save_every=2", "data_workers=0")
    ds, mixture_cfg = validate(cfg, resume=True)
    step_dir = trained / "checkpoints" / tag_for(STEP)
    record, changes = run_record.resume(step_dir, run_record.build(cfg, mixture_cfg, ds, 2), STEP)
    assert [(c["field"], c["old"], c["new"]) for c in changes] == [
        ("data_workers", 1, 0), ("save_every", 25, 2), ("schedule.lr", 5e-3, 0.05), ("schedule.max_steps", None, 30)]
    assert changes[2]["effect"] == "the new peak lr applies from the next step, at the schedule's current position"
    assert record["changes"] == changes and all(c["step"] == STEP for c in changes)
    run_record.write(step_dir, record)  # a later resume keeps the history and adds its own
    again, _ = run_record.resume(step_dir, run_record.build(cfg, mixture_cfg, ds, 2), 9)
    assert again["changes"] == changes


def edited_mixture(mixture: Path, name: str, edit) -> str:
    """An override pointing at a copy of the mixture file changed by `edit(data)`."""
    data = yaml.safe_load(mixture.read_text())
    edit(data)
    (mixture.parent / name).write_text(yaml.safe_dump(data))
    return f"mixture={mixture.parent / name}"


@pytest.mark.parametrize("change, world, message", [
    ([], 1, "world was 2 when it was trained, now 1: each rank's data position is stored (sample i goes to rank "
            "i mod world): resume with the same number of ranks"),
    (["model.lora=default"], 2, "model.lora was 'paper' when it was trained, now 'default': the checkpoint's "
                                "weights belong to the model and LoRA it was trained with"),
    (["schedule.grad_accum=1"], 2, "schedule.grad_accum was 2 when it was trained, now 1: it changes the samples "
                                   "of a step: the saved data position would be applied to a different sample order"),
    (["packing.seed=3"], 2, "packing.seed was 0 when it was trained, now 3: it changes how the data pack into rows: "
                            "the saved data position would be applied to a different sample order"),
    (["schedule.betas=[0.9, 0.95]"], 2, "schedule.betas was [0.9, 0.999] when it was trained, now [0.9, 0.95]: "
                                        "the restored Adam state keeps the old value"),
    (["eval.holdout=2"], 2, "eval.holdout was 0.05 when it was trained, now 2: it changes which records are held "
                            "out of training: the saved data position would be applied to a different sample order"),
])
def test_refused_changes_are_one_line_naming_the_field(trained, mixture, monkeypatch, change, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(CheckpointError) as err:
        validate(config(trained, mixture, *change), resume=True)
    text = str(err.value)
    assert "\n" not in text
    assert text == (f"checkpoint {tag_for(STEP)}: {message}; refusing to resume (restore the old value, or start "
                    "a new output_dir)")


def test_a_new_mixture_seed_is_refused(trained, mixture):
    seed = yaml.safe_load(mixture.read_text())["seed"]
    override = edited_mixture(mixture, "reseeded.yaml", lambda data: data.update(seed=seed + 1))
    with pytest.raises(CheckpointError) as err:
        validate(config(trained, mixture, "schedule.lr=0.05", override), resume=True)
    assert str(err.value) == (f"checkpoint {tag_for(STEP)}: mixture.seed was {seed} when it was trained, now "
                              f"{seed + 1}: it is the data order seed: the saved data position would be applied "
                              "to a different sample order; refusing to resume (restore the old value, or start a "
                              "new output_dir)")


def test_fewer_sources_are_refused_naming_them(trained, mixture):
    gone = [src["name"] for src in yaml.safe_load(mixture.read_text())["sources"][-2:]]
    override = edited_mixture(mixture, "fewer.yaml", lambda data: data.update(sources=data["sources"][:-2]))
    with pytest.raises(CheckpointError) as err:
        validate(config(trained, mixture, override), resume=True)
    assert str(err.value) == (f"checkpoint {tag_for(STEP)}: mixture sources changed (removed {gone}): the mixture's "
                              "sources changed: the saved data position would be applied to a different sample "
                              "order; refusing to resume")


def test_missing_manifest_is_refused_before_any_model_build_unless_asked(trained, mixture):
    (trained / "checkpoints" / tag_for(STEP) / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=rf"^checkpoint {tag_for(STEP)} has no manifest.json, so its bytes "
                                              r"cannot be verified; .*no earlier checkpoint is verified"):
        validate(config(trained, mixture), resume=True)
    validate(config(trained, mixture), resume=True, allow_unverified=True)


@pytest.mark.parametrize("text, problem", [("{", "is unreadable"), ("[]", "has no `fields` mapping")])
def test_a_damaged_record_is_one_line(trained, mixture, text, problem):
    path = trained / "checkpoints" / tag_for(STEP) / TRAINED_WITH
    path.write_text(text)
    with pytest.raises(CheckpointError, match=rf"^{path} {problem}.*; refusing to resume$"):
        validate(config(trained, mixture), resume=True)
