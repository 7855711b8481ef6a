"""`mmgpt eval --model DIR --task TASK ...`: a benchmark on local files in their original formats.

Tasks (readers in mmgpt.eval.tasks, metrics in mmgpt.eval.metrics):
  vqa           VQAv2 / OK-VQA (--questions, --annotations): VQA accuracy.
  aokvqa        A-OKVQA (--data): multiple choice by likelihood, direct answer by generation.
  ocrvqa        OCR-VQA dataset.json (--data, --split): exact match after normalisation.
  coco_caption  Karpathy split / COCO captions json (--data): CIDEr, BLEU-4, METEOR.
  llava         LLaVA-format questions (--data; e.g. `mmgpt data sample`'s shapes/shapes_val.json):
                exact match, no answer hint (the answers are the training's own one-word style).

--shots N (vqa, ocrvqa, coco_caption) puts N demonstrations from the train split before each item
in OpenFlamingo's eval-suite format (mmgpt.eval.fewshot), so numbers compare with its table.
With --shots 0 (the default) prompts are rendered by `encode_prompt`, the training rendering: one `<image>`,
the question as the instruction (captions: paper Table 3's first instruction, "Can you describe
the image?"). Question tasks add a short-answer hint as the template's `### Input:` field
(--answer-hint; "" leaves it out), since the training answers (e.g. A-OKVQA's "The answer is X.
Because ...") are sentences while the benchmarks score a word or phrase. Predictions are the
decoded greedy continuation, stripped and otherwise unchanged (the metrics normalise as their
official scripts do). A-OKVQA multiple choice ranks each choice by the model's log-likelihood of
the choice text, plus EOS, as the response to that same prompt (the EOS makes "red" and "red and
white" differ); the direct answer is generated.

Batches of --batch-size items run as left-padded rows (mmgpt.eval.batched). Sharding: RANK and
WORLD_SIZE come from the environment (torchrun, the deepspeed launcher); rank r evaluates items
i = r (mod world); with world > 1 the predictions are gathered through torch.distributed (nccl on
CUDA, gloo on CPU) and rank 0 scores them and writes the report. An image that is missing,
corrupt, over the pixel cap or outside --images is counted and skipped, never fatal; the metrics
are over the items evaluated and the report lists the skipped ones.

The JSON report (--output) holds the metrics, per-item predictions, the arguments and the
model's ModelConfig, sha256 of the model's weight files (an export's manifest.json when there
is one, else hashed here; base weights named by path in the config are not hashed) and timings.
--update-card records the metrics in an export's README.md under `mmgpt.eval.<task>` (the
manifest's hash of README.md then no longer matches; the weights' hashes do).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from mmgpt import model_card
from mmgpt.data.conversation import Conversation, Round, encode_prompt, tokenize
from mmgpt.data.images import load_image
from mmgpt.image_transform import Transform
from mmgpt.contracts import ENDOFCHUNK
from mmgpt.eval import fewshot, metrics
from mmgpt.eval.batched import answer_logprobs, generate_batch
from mmgpt.eval.tasks import EvalItem, read_aokvqa, read_captions, read_llava, read_ocrvqa, read_vqa
from mmgpt.export import versions
from mmgpt.inference.model_dir import DTYPES, ModelSource, load_model, resolve_source
from mmgpt.manifest import read_manifest, sha256
from mmgpt.names import TASK_NAMES
from mmgpt.run_layout import MANIFEST, MODEL_CARD
from mmgpt.models.builder import BuiltModel

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

Record = dict[str, Any]  # one item's prediction, as the report lists it


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark evaluation: the model, the task's files and the decoding (flags, defaults and
    their help: mmgpt/cli/eval.py); the report records it as `config.args`. Not the held-out loss
    of a training run (mmgpt.train.config.EvalConfig)."""

    model: str
    device: str
    dtype: str | None  # a key of DTYPES; None: bf16 on CUDA, fp32 on CPU
    verify: bool  # the export's files were checked against their sha256 before loading
    task: str  # a key of TASKS
    images: str
    questions: str | None
    annotations: str | None
    data: str | None
    split: str | None
    limit: int | None
    shots: int
    seed: int
    query_set_size: int
    demo_split: str
    demo_data: str | None
    demo_questions: str | None
    demo_annotations: str | None
    demo_images: str | None
    batch_size: int
    workers: int
    max_new_tokens: int | None  # None: the task's own budget
    answer_hint: str
    no_meteor: bool
    output: str | None  # None: eval_<task>.json
    update_card: bool


@dataclass(frozen=True)
class Task:
    """How a benchmark is read, prompted and scored."""

    read: Callable[[BenchmarkConfig], list[EvalItem]]
    score: Callable[[list[Record], BenchmarkConfig], dict[str, Any]]
    max_new_tokens: int  # default decoding budget: a phrase for questions, a sentence for captions
    hint: bool  # the short-answer hint applies
    fewshot: str | None  # OpenFlamingo's prompt format for --shots > 0 (mmgpt.eval.fewshot), None: zero-shot only
    choices: bool = False  # also rank the item's choices by likelihood


def _by_id(records: list[Record], key: str) -> dict[Any, Any]:
    return {r["id"]: r[key] for r in records}


def _aokvqa_records(records: list[Record]) -> dict[Any, dict[str, Any]]:
    return {r["id"]: {"choices": r["choices"], "correct_choice_idx": r["correct_choice"],
                      "direct_answers": r["answers"], "difficult_direct_answer": r["difficult"]} for r in records}


def _score_aokvqa(records: list[Record], args: BenchmarkConfig) -> dict[str, Any]:
    targets = _aokvqa_records(records)
    return {"mc_accuracy": metrics.aokvqa_mc_accuracy(_by_id(records, "choice_prediction"), targets),
            "da_accuracy": metrics.aokvqa_da_mean(_by_id(records, "prediction"), targets)}


def _score_exact(records: list[Record], args: BenchmarkConfig) -> dict[str, Any]:
    hits = [metrics.ocrvqa_exact_match(r["prediction"], r["answers"][0]) for r in records]
    return {"exact_match": sum(hits) / len(hits)}


def _need(args: BenchmarkConfig, *names: str) -> list[Path]:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        raise ValueError(f"--task {args.task} needs {' and '.join(missing)}")
    return [Path(getattr(args, n)) for n in names]


TASKS: dict[str, Task] = {
    "vqa": Task(read=lambda a: read_vqa(*_need(a, "questions", "annotations")),
                score=lambda r, a: {"accuracy": metrics.vqa_accuracy_mean(_by_id(r, "prediction"),
                                                                          _by_id(r, "answers"))},
                max_new_tokens=10, hint=True, fewshot="vqa"),
    "aokvqa": Task(read=lambda a: read_aokvqa(*_need(a, "data"), split=a.split or "val"),
                   score=_score_aokvqa, max_new_tokens=10, hint=True, fewshot=None, choices=True),
    "ocrvqa": Task(read=lambda a: read_ocrvqa(*_need(a, "data"), split=a.split or "test"),
                   score=_score_exact, max_new_tokens=16, hint=True, fewshot="vqa"),
    "llava": Task(read=lambda a: read_llava(*_need(a, "data")), score=_score_exact, max_new_tokens=10, hint=False,
                  fewshot=None),
    "coco_caption": Task(read=lambda a: read_captions(*_need(a, "data"), split=a.split or "test"),
                         score=lambda r, a: metrics.caption_scores(_by_id(r, "prediction"), _by_id(r, "answers"),
                                                                   meteor=not a.no_meteor),
                         max_new_tokens=30, hint=False, fewshot="caption"),
}
if tuple(sorted(TASKS)) != TASK_NAMES:  # the parser offers TASK_NAMES without importing this module
    raise RuntimeError(f"mmgpt/names.py lists {TASK_NAMES}, benchmark.TASKS has {tuple(sorted(TASKS))}")


def _demo_pool(task: Task, args: BenchmarkConfig) -> list[EvalItem]:
    """The train split the demonstrations come from: the --demo-* files, else the task's own files
    with --demo-split."""
    if task.fewshot is None:
        raise ValueError(f"--shots {args.shots}: --task {args.task} is not in OpenFlamingo's few-shot suite "
                         "(few-shot: vqa, ocrvqa, coco_caption)")
    demo_args = replace(args, split=args.demo_split, data=args.demo_data or args.data,
                        questions=args.demo_questions, annotations=args.demo_annotations)
    if args.task == "vqa" and (args.demo_questions is None or args.demo_annotations is None):
        raise ValueError("--task vqa --shots N needs --demo-questions and --demo-annotations (the train split)")
    return task.read(demo_args)


class _ImageFiles(Dataset):
    """(position, pixels [demonstrations + 1, 3, H, W] or the reason an image is unusable) per item,
    for a DataLoader; the demonstrations' images come first, as in the prompt."""

    def __init__(self, items: list[EvalItem], root: Path, transform: Transform,
                 demos: list[list[EvalItem]], demo_root: Path):
        self.items, self.root, self.transform = items, root, transform
        self.demos, self.demo_root = demos, demo_root

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        images = [(self.demo_root, d.image, "demonstration ") for d in self.demos[i]]
        pixels = []
        for root, image, what in [*images, (self.root, self.items[i].image, "")]:
            loaded = load_image(root, image, self.transform)
            if isinstance(loaded, str):
                return i, what + loaded
            pixels.append(loaded)
        return i, torch.stack(pixels)


def question_prompt(question: str, image: str, hint: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The zero-shot prompt ids: one image, the question as training rendered an instruction (also
    the prompt of mmgpt.eval.lmms, so both harnesses ask the same thing)."""
    return encode_prompt(Conversation(rounds=[Round(question, "", input=hint)], images=[image]), tokenizer)


def response_ids(question: str, image: str, hint: str, response: str, prompt: list[int],
                 tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """`response`'s training-tokenised ids (EOS included) after `prompt`; None when it cannot be a
    response (empty, or a token spanning the prompt boundary)."""
    conv = Conversation(rounds=[Round(question, response, input=hint)], images=[image])
    sample = tokenize(conv, tokenizer, max_length=1 << 30)
    ok = not isinstance(sample, str) and sample.input_ids[:len(prompt)] == prompt
    return sample.input_ids[len(prompt):] if ok else None


def _choice_ids(item: EvalItem, hint: str, prompt: list[int],
                tokenizer: PreTrainedTokenizerBase) -> list[list[int] | None]:
    return [response_ids(item.question, item.image, hint, choice, prompt, tokenizer) for choice in item.choices]


def _prompts(task: Task, items: list[EvalItem], demos: list[list[EvalItem]], hint: str,
             tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Zero-shot: the training rendering; with demonstrations: OpenFlamingo's format."""
    if not any(demos):
        return [question_prompt(item.question, item.image, hint, tokenizer) for item in items]
    return [fewshot.fewshot_ids(task.fewshot, d, item, tokenizer) for item, d in zip(items, demos)]


def _evaluate_batch(built: BuiltModel, task: Task, items: list[EvalItem], demos: list[list[EvalItem]],
                    pixels: torch.Tensor, hint: str, max_new_tokens: int) -> list[Record]:
    """Predictions for items whose images loaded (`pixels`: each item's demonstrations' images and
    its own, item after item)."""
    tokenizer = built.tokenizer
    latents = built.model.encode_images(pixels.to(built.device))
    prompts = _prompts(task, items, demos, hint, tokenizer)
    shots = any(demos)
    stops = {tokenizer.convert_tokens_to_ids(ENDOFCHUNK)} if shots else set()
    generated = generate_batch(built, prompts, latents, max_new_tokens, stop_ids=stops)
    post = fewshot.POSTPROCESS[task.fewshot] if shots else (lambda text: text)
    records = []
    for item, new, shown in zip(items, generated, demos):
        records.append({"id": item.id, "image": item.image, "question": item.question,
                        "prediction": post(tokenizer.decode(new, skip_special_tokens=True)).strip(),
                        "answers": item.answers, **({"demonstrations": [d.id for d in shown]} if shots else {})})
    if task.choices:
        rows, owners = [], []
        for b, (item, prompt) in enumerate(zip(items, prompts)):
            for k, answer in enumerate(_choice_ids(item, hint, prompt, tokenizer)):
                if answer is not None:
                    rows.append((prompt, answer))
                    owners.append((b, k))
        scores: list[list[float | None]] = [[None] * len(item.choices) for item in items]
        values = answer_logprobs(built, rows, latents, [b for b, _ in owners]) if rows else []
        for (b, k), value in zip(owners, values):
            scores[b][k] = value
        for item, record, row in zip(items, records, scores):  # an unscorable choice is never chosen
            scored = [k for k, v in enumerate(row) if v is not None]
            best = max(scored, key=row.__getitem__) if scored else None
            record.update(choices=item.choices, choice_scores=row,
                          choice_prediction=None if best is None else item.choices[best],
                          correct_choice=item.correct_choice, difficult=item.difficult)
    return records


def model_hashes(source: ModelSource) -> dict[str, Any]:
    """sha256 of the weight files that make this model: an export's manifest lists them (hashed at
    export time); a training run's adapter is hashed here."""
    if (source.path / MANIFEST).is_file():
        files = read_manifest(source.path)
        return {"from": MANIFEST, "files": {name: f.sha256 for name, f in sorted(files.items())
                                            if name.endswith(WEIGHT_SUFFIXES)}}
    root = source.adapter_dir or source.path
    return {"from": "hashed", "root": str(root.resolve()),
            "files": {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*"))
                      if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}}


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and the deepspeed launcher set them."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _gather(payload: Any, world: int) -> list[Any]:
    if world == 1:
        return [payload]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, payload)
    return gathered


def evaluate(args: BenchmarkConfig) -> dict[str, Any] | None:
    """Run the evaluation on this rank's share; rank 0 returns the report (others None)."""
    started = time.time()
    task = TASKS[args.task]
    rank, world, local_rank = _distributed()
    device = args.device
    if world > 1 and str(device).startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if args.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {args.shots}")
    items = task.read(args)[: args.limit]
    demos = (fewshot.draw_demos(_demo_pool(task, args), items, args.shots, args.seed, args.query_set_size)
             if args.shots else [[] for _ in items])
    source = resolve_source(args.model)
    dtype_name = args.dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
    built = load_model(source, device=device, dtype=DTYPES[dtype_name])
    loaded = time.time()
    hint = args.answer_hint if task.hint and not args.shots else ""  # few-shot prompts carry no hint
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    shard, shard_demos = items[rank::world], demos[rank::world]
    images = Path(args.images)
    loader = DataLoader(_ImageFiles(shard, images, built.transform, shard_demos,
                                    Path(args.demo_images) if args.demo_images else images),
                        batch_size=args.batch_size, collate_fn=list, num_workers=args.workers)
    records: list[Record] = []
    skipped: list[Record] = []
    with tqdm(total=len(shard), unit="item", desc=f"eval {args.task}", disable=rank != 0, file=sys.stderr) as bar:
        for batch in loader:
            good = [(i, px) for i, px in batch if not isinstance(px, str)]
            skipped += [{"id": shard[i].id, "image": shard[i].image, "reason": px}
                        for i, px in batch if isinstance(px, str)]
            if good:
                records += _evaluate_batch(built, task, [shard[i] for i, _ in good],
                                           [shard_demos[i] for i, _ in good], torch.cat([px for _, px in good]),
                                           hint, max_new_tokens)
            bar.update(len(batch))
    finished = time.time()
    parts = _gather((records, skipped), world)
    if rank != 0:
        return None
    records = [r for part, _ in parts for r in part]
    skipped = [s for _, part in parts for s in part]
    if not records:
        raise ValueError(f"nothing evaluated: all {len(skipped)} images were skipped "
                         f"({dict(Counter(s['reason'] for s in skipped))})")
    return {
        "task": args.task, "metrics": task.score(records, args), "n": len(records),
        "skipped": {"count": len(skipped), "reasons": dict(Counter(s["reason"] for s in skipped)), "items": skipped},
        "prompt": {"hint": hint, "max_new_tokens": max_new_tokens, "decoding": "greedy", "shots": args.shots,
                   **({"format": f"openflamingo_{task.fewshot}", "seed": args.seed} if args.shots else {})},
        "config": {"args": asdict(args), "model": asdict(source.model_config), "source_kind": source.kind,
                   "dtype": dtype_name, "world_size": world},
        "model_hashes": model_hashes(source), "versions": versions(),
        "timing": {"load_s": round(loaded - started, 3), "eval_s": round(finished - loaded, 3),
                   "items_per_s": round(len(shard) / max(finished - loaded, 1e-9), 3),
                   "finished": datetime.now(timezone.utc).isoformat()},
        "predictions": records,
    }


def _card_results(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers a model card keeps: the metrics (not the caption scorer's notes) and the size."""
    numbers = {k: round(v, 4) for k, v in report["metrics"].items() if isinstance(v, float)}
    return {**numbers, "n": report["n"], "skipped": report["skipped"]["count"]}


def run(args: BenchmarkConfig) -> int:
    """`mmgpt eval`: evaluate, write the report, print its summary line (and update the card)."""
    world = _distributed()[1]
    if world > 1:
        torch.distributed.init_process_group("nccl" if str(args.device).startswith("cuda") else "gloo")
    try:
        report = evaluate(args)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if report is None:
        return 0
    output = Path(args.output or f"eval_{args.task}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({"task": args.task, "n": report["n"], "skipped": report["skipped"]["count"],
                      "metrics": report["metrics"]}, default=str))
    if args.update_card:
        readme = Path(args.model) / MODEL_CARD
        if not readme.is_file():
            print(f"mmgpt eval: error: --update-card: {readme} not found (only exports have a card)", file=sys.stderr)
            return 1
        model_card.update_eval(readme, args.task, _card_results(report))
    return 0
