"""Evaluation during training: the held-out split never reaches a training stream (any world
size, any resume point); the eval loss is the global token mean of the held-out samples scored one
by one, sharded or not; evaluating leaves everything training depends on untouched and writes the
documented TensorBoard entries. The launcher runs (tests/test_launch.py) check that a run with
eval on trains bitwise like one with eval off."""
from __future__ import annotations

import json
import random

import pytest
import torch

from mmgpt.train.config import ConfigError, EvalConfig
from mmgpt.data.mixture import Mixture, MixtureConfig
from mmgpt.data.packing import PackingConfig, collate
from mmgpt.data.sample import write_sample
from mmgpt.media import splitmix64
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.train.data import RankStream
from mmgpt.train.engine import DistInfo
from mmgpt.train.eval import Evaluator
from mmgpt.train.loss import packed_loss
from model_helpers import open_gates, randomize_lora_b

PACKING = PackingConfig(max_tokens=256, max_images_per_row=8, buffer_size=6, rows_per_batch=1, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("data"), records=80, max_length=256)


@pytest.fixture(scope="module")
def model():
    built = build_model(ModelConfig(preset="tiny", seed=0))
    open_gates(built.model, 0.5)  # images change the loss
    randomize_lora_b(built.model)
    return built


def mixture(data, tokenizer, holdout=0.1) -> Mixture:
    return Mixture(MixtureConfig.load(data), tokenizer, preset_image_size("tiny"), holdout=holdout)


def drain_origins(stream: RankStream) -> list[str]:
    origins = []
    while (batch := stream.next_batch()) is not None:
        origins += [stream.mixture.conversation(i).origin for i in batch.sample_ids]
    return origins


def test_no_rank_stream_ever_yields_a_held_out_record(data, tiny_tokenizer, model):
    mix = mixture(data, tiny_tokenizer)
    held = {mix.holdout().conversation(i).origin for i in range(len(mix.holdout()))}
    assert len(held) >= len(mix.cfg.sources)
    for world in (1, 2, 3):
        trained = []
        for rank in range(world):
            first = RankStream(mix, PACKING, model, rank, world, epochs=2)
            head = [first.mixture.conversation(i).origin for _ in range(2) for i in first.next_batch().sample_ids]
            resumed = RankStream(mix, PACKING, model, rank, world, epochs=2,
                                 state=json.loads(json.dumps(first.state().to_dict())))
            trained += head + drain_origins(resumed)
        assert trained and not held & set(trained), world


def one_by_one(model, holdout: Mixture) -> dict[str, tuple[float, int]]:
    """Per source (loss sum, supervised tokens), each held-out sample alone in its own batch."""
    sums: dict[str, tuple[float, int]] = {}
    for i in range(len(holdout)):
        sample = holdout.load(i)
        if sample is None:  # dropped at load (the sample data has a few bad records): not evaluated either
            continue
        batch = collate([sample], image_token_id=model.image_token_id, media_seed=splitmix64(PACKING.seed, 0),
                        image_size=(preset_image_size("tiny"),) * 2)
        with torch.no_grad():
            out = packed_loss(model, model.lm_head, batch)
        s, n = sums.get(sample.source, (0.0, 0))
        sums[sample.source] = (s + float(out.loss_sum), n + out.num_supervised)
    return sums


def evaluator(built, holdout, rank=0, world=1, samples=0, writer=None) -> Evaluator:
    assert built.media_attention == "next" and built.image_size == preset_image_size("tiny")
    return Evaluator(EvalConfig(holdout=0.1, every=2, samples=samples, max_new_tokens=4), built, holdout,
                     PACKING, DistInfo(rank, world, rank, torch.device("cpu")), writer)


def test_eval_loss_is_the_token_mean_of_the_samples_scored_one_by_one(data, model):
    built = model
    model, tokenizer = built.model, built.tokenizer
    holdout = mixture(data, tokenizer).holdout()
    want = one_by_one(model, holdout)
    whole = evaluator(built, holdout).loss()
    shards = [evaluator(built, holdout, rank, 2).loss() for rank in range(2)]  # no process group: local
    for name, (s, n) in want.items():
        assert whole.by_source[name][1] == n == sum(shard.by_source[name][1] for shard in shards)
        assert whole.by_source[name][0] == pytest.approx(s, rel=1e-5)
        assert sum(shard.by_source[name][0] for shard in shards) == pytest.approx(s, rel=1e-5)
    total, count = sum(s for s, _ in want.values()), sum(n for _, n in want.values())
    assert whole.loss == pytest.approx(total / count, rel=1e-5)
    vl = {holdout.conversation(i).source: bool(holdout.conversation(i).images) for i in range(len(holdout))}
    for kind, is_vl in (("language", False), ("vl", True)):
        s = sum(v[0] for k, v in want.items() if vl[k] == is_vl)
        n = sum(v[1] for k, v in want.items() if vl[k] == is_vl)
        assert n > 0 and whole.by_kind[kind][1] == n and whole.by_kind[kind][0] == pytest.approx(s, rel=1e-5)
    scalars = whole.scalars()
    assert set(scalars) == {"eval/loss", "eval/loss_language", "eval/loss_vl"} | {f"eval/loss/{k}" for k in want}


class RecordingWriter:
    def __init__(self):
        self.calls: list[tuple[str, str, int]] = []

    def __getattr__(self, name):
        if name.startswith("add_"):
            return lambda tag, value, step: self.calls.append((name, tag, step))
        if name == "flush":
            return lambda: None
        raise AttributeError(name)


def test_evaluating_leaves_training_untouched_and_writes_tensorboard(data, model):
    built = model
    model, tokenizer = built.model, built.tokenizer
    holdout = mixture(data, tokenizer).holdout()
    model.train()
    model.vision_encoder.eval()  # a part kept in eval mode stays so
    modes = {name: m.training for name, m in model.named_modules()}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(123)
    rng, py_rng = torch.get_rng_state(), random.getstate()
    writer = RecordingWriter()
    ev = evaluator(built, holdout, samples=3, writer=writer)
    assert not ev.due(3) and ev.due(4)
    ev.run(4)
    ev.finish(4)  # just evaluated: nothing more
    ev.finish(5)
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(p, params[name]) and p.grad is None for name, p in model.named_parameters())
    sources = [holdout.conversation(i).source for i in ev.prompts]
    assert len(set(sources)) == 3  # one prompt per source in turn
    tags = {(kind, tag) for kind, tag, _ in writer.calls}
    assert {("add_scalar", "eval/loss"), ("add_scalar", "eval/time_s")} <= tags
    assert {("add_scalar", f"eval/answer_tokens/{s}") for s in sources} <= tags
    texts = [(tag, step) for kind, tag, step in writer.calls if kind == "add_text"]
    assert texts == [(f"eval/sample_{k}", step) for step in (4, 5) for k in range(3)]
    images = [(tag, step) for kind, tag, step in writer.calls if kind == "add_image"]
    with_images = [k for k, i in enumerate(ev.prompts) if holdout.conversation(i).images]
    assert images and {step for _, step in images} == {4} and {t.split("/")[1] for t, _ in images} == \
        {f"sample_{k}" for k in with_images}  # each image once, at the first evaluation


@pytest.mark.parametrize("bad, message", [({"holdout": 1.5}, "fraction must be in"), ({"holdout": 0}, "count >= 1"),
                                          ({"every": 0}, "eval.every"), ({"samples": -1}, "eval.samples")])
def test_eval_config_is_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**bad)
    assert not EvalConfig(holdout=0.1, enabled=False).active and not EvalConfig().active
