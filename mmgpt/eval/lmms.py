"""An lmms-eval model `mmgpt`: an mmgpt export or training run inside the harness the field uses.

Registered through lmms-eval's documented plugin route, the entry-point group `lmms_eval.models`
(setup.py points it at `manifest`), so after `pip install -e .` beside `pip install lmms-eval`:
    python -m lmms_eval --model mmgpt --model_args pretrained=DIR --tasks mmgpt_shapes \
        --include_path mmgpt/eval/lmms_tasks
lmms_eval is imported here only (mmgpt imports and runs without it).

Prompts are `mmgpt eval`'s zero-shot ones (mmgpt.eval.benchmark.question_prompt: the task's text as the
instruction, one `<image>`, no answer hint), images go through mmgpt's CLIP transform, decoding is
greedy with mmgpt's batched generation, and likelihoods are mmgpt eval's answer likelihoods (the
continuation tokenised as the training response, EOS included), so the two harnesses score the
same items alike.
"""
from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mmgpt.eval.batched import answer_scores, generate_batch
from mmgpt.eval.benchmark import question_prompt, response_ids
from mmgpt.inference.model_dir import DTYPES, load_model, resolve_source

IMAGE = "image"  # the prompt's one image name (the name does not change the ids)
DEFAULT_MAX_NEW_TOKENS = 16


def manifest() -> ModelManifest:
    """The entry point's payload: lmms-eval loads the class by path only when `--model mmgpt` asks."""
    return ModelManifest(model_id="mmgpt", simple_class_path="mmgpt.eval.lmms.MMGPT")


class MMGPT(lmms):
    """`--model_args pretrained=DIR[,dtype=fp32]`; lmms-eval's --device and --batch_size arrive as
    keyword arguments too. Greedy only."""

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str | None = None, batch_size: int | str = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"mmgpt: unknown --model_args {sorted(kwargs)} (known: pretrained, dtype; "
                             "--device and --batch_size are lmms-eval's own flags)")
        if not str(batch_size).isdigit():
            raise ValueError(f"mmgpt: --batch_size must be a number, got {batch_size!r}")
        source = resolve_source(pretrained)
        dtype_name = dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
        self.built = load_model(source, device=device, dtype=DTYPES[dtype_name])
        self.tokenizer = self.built.tokenizer
        self.batch_size_per_gpu = int(batch_size)

    def _pixels(self, request: Instance) -> torch.Tensor:
        """The request's one image, as `mmgpt eval` transforms it."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            raise ValueError(f"mmgpt: task {task} doc {doc_id}: expected one image, got {len(visuals)} visuals "
                             "(the mmgpt model asks about exactly one image per prompt)")
        return self.built.transform(visuals[0].convert("RGB"))

    def _latents(self, requests: list[Instance]) -> torch.Tensor:
        pixels = torch.stack([self._pixels(r) for r in requests])
        return self.built.model.encode_images(pixels.to(self.built.device))

    def _batches(self, requests: list[Instance]) -> list[list[Instance]]:
        size = self.batch_size_per_gpu
        return [requests[i:i + size] for i in range(0, len(requests), size)]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy continuations, cut at the task's `until` strings, stripped as `mmgpt eval` does."""
        out: list[str] = []
        for batch in self._batches(requests):
            kwargs = batch[0].args[1]
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError("mmgpt: greedy decoding only (set do_sample: false, temperature: 0)")
            prompts = [question_prompt(r.args[0], IMAGE, "", self.tokenizer) for r in batch]
            max_new = int(kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
            for new, request in zip(generate_batch(self.built, prompts, self._latents(batch), max_new), batch):
                out.append(_cut(self.tokenizer.decode(new, skip_special_tokens=True),
                                request.args[1].get("until") or []).strip())
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(log p(continuation + EOS | prompt), is_greedy); -inf for a continuation that cannot be
        a response (mmgpt eval never chooses such a choice either).

        Each pair travels inside a GenerationResult: lmms-eval 0.7.3's evaluator
        (`unwrap_generation_output`) turns a bare (float, bool) into its str, which breaks every
        multiple_choice task; a GenerationResult's payload reaches process_results untouched."""
        out: list[GenerationResult] = []
        for batch in self._batches(requests):
            rows, owners = [], []
            for b, request in enumerate(batch):
                context, target, _, doc_id, task, split = request.args
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                answer = _answer_ids(context, continuation, self.tokenizer)
                if answer is not None:
                    rows.append(answer)
                    owners.append(b)
            results: list[tuple[float, bool]] = [(float("-inf"), False)] * len(batch)
            if rows:
                scored = answer_scores(self.built, rows, self._latents(batch), owners)
                for b, value in zip(owners, scored):
                    results[b] = value
            out += [GenerationResult(text=pair) for pair in results]  # type: ignore[arg-type]
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("mmgpt: multi-round generation is not supported; use generate_until tasks")


def _answer_ids(context: str, continuation: str,
                tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]] | None:
    prompt = question_prompt(context, IMAGE, "", tokenizer)
    answer = response_ids(context, IMAGE, "", continuation.strip(), prompt, tokenizer)
    return None if answer is None else (prompt, answer)


def _cut(text: str, until: list[str] | str) -> str:
    """The text before the first stop string (lmms-eval's `until`, applied after decoding)."""
    for stop in [until] if isinstance(until, str) else until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
