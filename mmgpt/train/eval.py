"""Evaluation during training: held-out loss (sharded, summed exactly) and sample generations.

The held-out records (`Mixture.holdout()`: chosen before sampling by a seeded hash, never trained
on) are packed in-process with the run's Packer settings and go through the same packed forward as
training, without grad and in eval mode. Rank r takes held-out positions r, r+w, ...; each rank
sums token losses and supervised tokens per source and per kind (language / VL), and ONE
all-reduce gives the global sums, so `eval/loss` is the mean over every held-out supervised token
whatever the world size or the packing. Rank 0 then decodes a few held-out prompts greedily, for
TensorBoard text (and each image once), and logs the mean answer length per source. For the
sources named in `eval.accuracy` it answers every held-out one-image question (batched greedy
decoding) and scores exact matches, once with each question's own image and once with the images
moved one question along: the second is the control (chance level when the answers come from the
pictures, as high as the first when the model guesses from the text).

It must not perturb training (a run with eval on trains bitwise like one with it off): no
gradients, no optimizer or DeepSpeed engine call (the bare module runs), the RNG states are forked
and restored, every module's train/eval flag is restored, and the training stream is never read.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from mmgpt.train.config import EvalConfig
from mmgpt.contracts import PackedBatch
from mmgpt.data.conversation import encode_prompt
from mmgpt.image_transform import CLIP_MEAN, CLIP_STD
from mmgpt.data.mixture import Mixture
from mmgpt.data.packing import Packer, PackingConfig
from mmgpt.eval.batched import generate_batch
from mmgpt.eval.metrics import ocrvqa_exact_match
from mmgpt.inference.generation import generate
from mmgpt.inference.generation_config import GenerationConfig
from mmgpt.media import splitmix64
from mmgpt.models.builder import BuiltModel
from mmgpt.train.engine import DistInfo
from mmgpt.train.loss import packed_loss

log = logging.getLogger("mmgpt.train")

KINDS = ("language", "vl")


@dataclass
class EvalLoss:
    """Sums of one evaluation (global once reduced): (token-loss sum, supervised tokens) per group."""

    by_source: dict[str, tuple[float, int]]
    by_kind: dict[str, tuple[float, int]]  # KINDS

    @property
    def loss(self) -> float:
        """Mean over every held-out supervised token."""
        total, count = (sum(v) for v in zip(*self.by_kind.values()))
        return total / count if count else float("nan")

    def scalars(self) -> dict[str, float]:
        """TensorBoard tags: `eval/loss`, `eval/loss/<source>`, `eval/loss_language`, `eval/loss_vl`."""
        values = {"eval/loss": self.loss}
        values.update({f"eval/loss/{name}": s / n for name, (s, n) in self.by_source.items() if n})
        values.update({f"eval/loss_{kind}": s / n for kind, (s, n) in self.by_kind.items() if n})
        return values


@dataclass
class Answer:
    """One sample generation: the held-out record's prompt, its reference answer and the model's."""

    position: int  # in the held-out epoch
    source: str
    question: str
    reference: str
    answer: str
    tokens: int
    images: list[torch.Tensor]  # CLIP-normalised, as the model saw them


class Evaluator:
    """Evaluates `model` on `holdout` every `cfg.every` steps and at the end; rank 0 writes to
    `writer` (a SummaryWriter, None elsewhere)."""

    def __init__(self, cfg: EvalConfig, built: BuiltModel, holdout: Mixture, packing: PackingConfig,
                 dist_info: DistInfo, writer: Any = None):
        self.cfg = cfg
        self.built = built
        self.model = built.model
        self.tokenizer = built.tokenizer
        self.holdout = holdout
        self.packing = packing
        self.dist = dist_info
        self.writer = writer
        self.sources = [src.name for src in holdout.cfg.sources]
        unknown = sorted(set(cfg.accuracy) - set(self.sources))
        if unknown:
            raise ValueError(f"eval.accuracy names {unknown}, not sources of the mixture ({self.sources})")
        self.prompts = self._pick_prompts(cfg.samples) if dist_info.is_rank0 else []
        self.last_step: int | None = None
        self._questions: dict[str, int] = {}  # per accuracy source, at the last evaluation
        self._images_logged = False

    def _pick_prompts(self, n: int) -> list[int]:
        """The first `n` usable held-out positions taken source by source in turn, so that language
        and VL sources both show (and each source's answer length is tracked)."""
        by_source: dict[str, list[int]] = {}
        for i in range(len(self.holdout)):
            by_source.setdefault(self.holdout.conversation(i).source, []).append(i)
        turns = itertools.chain.from_iterable(itertools.zip_longest(*by_source.values()))
        usable = (i for i in turns if i is not None and self.holdout.load(i) is not None)
        return list(itertools.islice(usable, n))

    def due(self, step: int) -> bool:
        return self.cfg.every is not None and step % self.cfg.every == 0

    def finish(self, step: int) -> None:
        """The evaluation at the end of training, unless `step` was just evaluated."""
        if self.last_step != step:
            self.run(step)

    def run(self, step: int) -> EvalLoss:
        """Loss on the held-out data (collective), sample generations (rank 0), logged at `step`."""
        start = time.perf_counter()
        loss = self.loss()
        loss_time = time.perf_counter() - start
        answers = self.generations()
        accuracy = self.accuracy() if self.dist.is_rank0 else {}
        seconds = time.perf_counter() - start
        self.last_step = step
        if self.writer is not None:
            self._write(step, loss, answers, seconds)
            for tag, value in accuracy.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        per_source = ", ".join(f"{k.removeprefix('eval/loss/')} {v:.4f}" for k, v in loss.scalars().items()
                               if k.startswith("eval/loss/"))
        log.info("eval at step %d: loss %.4f (%s) on %d held-out samples; %.1fs (loss %.1fs, %d generations)",
                 step, loss.loss, per_source, len(self.holdout), seconds, loss_time, len(answers))
        for name in self.cfg.accuracy:
            if f"eval/accuracy/{name}" in accuracy:
                per_question = ", ".join(f"{tag.rsplit('/', 1)[1]} {value:.3f}" for tag, value in accuracy.items()
                                         if tag.startswith(f"eval/accuracy/{name}/"))
                log.info("eval at step %d: accuracy %s %.3f (%s), with shuffled images %.3f (exact match, %d "
                         "held-out questions)", step, name, accuracy[f"eval/accuracy/{name}"], per_question,
                         accuracy[f"eval/accuracy_shuffled/{name}"], self._questions[name])
        return loss

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """No grad, every module in eval mode, and on exit the RNG states and each module's own
        train/eval flag exactly as they were (a frozen part kept in eval mode stays so)."""
        modes = [(module, module.training) for module in self.model.modules()]
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self.model.eval()
            try:
                yield
            finally:
                for module, training in modes:
                    module.training = training

    def _batches(self) -> Iterator[PackedBatch]:
        """This rank's share of the held-out epoch, packed like training data (dropped samples skipped)."""
        side = self.built.image_size
        packer = Packer(self.packing, self.built.image_token_id, (side, side),
                        media_attention=self.built.media_attention, media_seed=splitmix64(self.packing.seed, 0))
        samples = (self.holdout.load(i) for i in range(self.dist.rank, len(self.holdout), self.dist.world))
        return packer.pack(s for s in samples if s is not None)

    def loss(self) -> EvalLoss:
        """The global sums: every rank's, in one all-reduce (collective when a process group is up;
        without one, this rank's own)."""
        sums = self._sum_batches()
        if dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return self._to_loss(sums)

    def _sum_batches(self) -> torch.Tensor:
        """[sources + 2 kinds, 2] float64: (loss sum, supervised tokens) per source, then language, VL."""
        sums = torch.zeros(len(self.sources) + len(KINDS), 2, dtype=torch.float64, device=self.dist.device)
        with self._evaluating():
            for batch in self._batches():
                on_device = batch.to(self.dist.device)
                out = packed_loss(self.model, self.model.lm_head, on_device)
                per_sample = torch.stack([out.sample_loss_sum.double(), out.sample_count.double()], dim=1)
                rows = torch.tensor([self.sources.index(s) for s in batch.sources], device=self.dist.device)
                sums.index_add_(0, rows, per_sample)
                sums.index_add_(0, len(self.sources) + on_device.is_vl.long(), per_sample)
        return sums

    def _to_loss(self, sums: torch.Tensor) -> EvalLoss:
        pairs = [(s, int(n)) for s, n in sums.tolist()]
        return EvalLoss(by_source=dict(zip(self.sources, pairs)), by_kind=dict(zip(KINDS, pairs[len(self.sources):])))

    def generations(self) -> list[Answer]:
        """Greedy answers to this rank's sample prompts (rank 0's; none elsewhere)."""
        answers = []
        generation = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens)
        device = self.dist.device
        with self._evaluating():
            for i in self.prompts:
                sample = self.holdout.load(i)
                if sample is None:  # it loaded when picked: its files changed since
                    continue
                conv = self.holdout.conversation(i)
                latents = self.model.encode_images(torch.stack(sample.images).to(device)) if sample.images else None
                new = generate(self.built, encode_prompt(conv, self.tokenizer), latents, generation)
                last = conv.rounds[-1]
                answers.append(Answer(i, conv.source, "\n".join(filter(None, (last.instruction, last.input))),
                                      last.response, self.tokenizer.decode(new, skip_special_tokens=True).strip(),
                                      len(new), sample.images))
        return answers

    def accuracy(self) -> dict[str, float]:
        """`eval/accuracy/<source>` and `eval/accuracy_shuffled/<source>` of each `eval.accuracy`
        source with held-out one-image questions, and the same per question (`.../<source>/<slug>`,
        e.g. `what_color_is_the_shape`) so an easy and a hard question are not averaged away
        (rank 0; no collective)."""
        values: dict[str, float] = {}
        with self._evaluating():
            for name, (prompts, images, references, questions) in self._accuracy_items().items():
                latents = self.model.encode_images(torch.stack(images).to(self.dist.device))
                for tag, shown in (("accuracy", latents), ("accuracy_shuffled", latents.roll(1, dims=0))):
                    new = generate_batch(self.built, prompts, shown, self.cfg.max_new_tokens)
                    hits = [ocrvqa_exact_match(self.tokenizer.decode(ids, skip_special_tokens=True), reference)
                            for ids, reference in zip(new, references)]
                    values[f"eval/{tag}/{name}"] = sum(hits) / len(hits)
                    for question in sorted(set(questions)):
                        mine = [h for h, q in zip(hits, questions) if q == question]
                        values[f"eval/{tag}/{name}/{_slug(question)}"] = sum(mine) / len(mine)
                self._questions[name] = len(prompts)
        return values

    def _accuracy_items(self) -> dict[str, tuple[list[list[int]], list[torch.Tensor], list[str], list[str]]]:
        """Per `eval.accuracy` source: the prompts, images, reference answers and questions of its
        held-out records with exactly one image (the last round is the question)."""
        items: dict[str, tuple[list[list[int]], list[torch.Tensor], list[str], list[str]]] = {}
        for i in range(len(self.holdout)):
            conv = self.holdout.conversation(i)
            if conv.source not in self.cfg.accuracy or len(conv.images) != 1:
                continue
            sample = self.holdout.load(i)
            if sample is None:
                continue
            prompts, images, references, questions = items.setdefault(conv.source, ([], [], [], []))
            prompts.append(encode_prompt(conv, self.tokenizer))
            images.append(sample.images[0])
            references.append(conv.rounds[-1].response)
            questions.append(conv.rounds[-1].instruction)
        return items

    def _write(self, step: int, loss: EvalLoss, answers: list[Answer], seconds: float) -> None:
        for tag, value in loss.scalars().items():
            self.writer.add_scalar(tag, value, step)
        self.writer.add_scalar("eval/time_s", seconds, step)
        lengths: dict[str, list[int]] = {}
        for k, a in enumerate(answers):
            lengths.setdefault(a.source, []).append(a.tokens)
            self.writer.add_text(f"eval/sample_{k}", f"**{a.source}** ({self.holdout.conversation(a.position).origin})"
                                 f"\n\n**question:** {a.question}\n\n**reference:** {a.reference}"
                                 f"\n\n**answer:** {a.answer}", step)
            if not self._images_logged:
                for m, image in enumerate(a.images):
                    self.writer.add_image(f"eval/sample_{k}/image_{m}", _viewable(image), step)
        self._images_logged = True
        for source, counts in lengths.items():
            self.writer.add_scalar(f"eval/answer_tokens/{source}", sum(counts) / len(counts), step)
        self.writer.flush()


def _slug(question: str) -> str:
    """A TensorBoard tag part for a question: `What color is the shape?` -> `what_color_is_the_shape`."""
    return re.sub(r"[^a-z0-9]+", "_", question.lower()).strip("_")


def _viewable(image: torch.Tensor) -> torch.Tensor:
    """A CLIP-normalised [3, H, W] image back in [0, 1], for TensorBoard."""
    mean, std = (torch.tensor(v).reshape(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (image.float().cpu() * std + mean).clamp(0, 1)
