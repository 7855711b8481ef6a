"""The model card (README.md with YAML metadata) that `mmgpt export` writes, hub-ready.

It says what the model is (base models, LoRA, media-attention mode), what it was trained on (the
run's data report: kept samples per source), how far (steps, final losses read back from the
run's TensorBoard events), eval results when a report is given, and how to load it — including
why the adapter needs mmgpt's model: its module paths include the cross-attention wrappers
(`layers.{i}.decoder_layer.*`, `layers.{i}.gated_cross_attn_layer.*`) a plain LLaMA lacks.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mmgpt.models.builder import ModelConfig
from mmgpt.run_layout import DATA_REPORT, TENSORBOARD_DIR, TRAIN_CONFIG

TRAIN_SCALARS = ("train/loss", "train/loss_language", "train/loss_vl")


def find_run_dir(path: Path) -> Path | None:
    """The training output directory `path` is, or lies in (adapter, checkpoint tag, ...)."""
    for candidate in [path, *list(path.resolve().parents)[:3]]:
        if (candidate / TRAIN_CONFIG).is_file():
            return candidate
    return None


def training_summary(run: Path | None) -> dict[str, Any]:
    """Steps, final losses and kept samples per source of a training run ({} without one)."""
    if run is None:
        return {}
    summary: dict[str, Any] = {}
    report = run / DATA_REPORT
    if report.is_file():
        sources = json.loads(report.read_text())["sources"]
        summary["data"] = {name: src["kept"] for name, src in sources.items()}
    events = sorted((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        last: dict[str, tuple[int, float]] = {}
        for path in events:
            acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in set(TRAIN_SCALARS) & set(acc.Tags()["scalars"]):
                event = acc.Scalars(tag)[-1]
                if tag not in last or event.step >= last[tag][0]:
                    last[tag] = (event.step, float(event.value))
        if last:
            summary["steps"] = max(step for step, _ in last.values())
            summary["final_loss"] = {tag.split("/", 1)[1]: round(value, 4) for tag, (_, value) in sorted(last.items())}
    return summary


def render(model: ModelConfig, lora: dict[str, Any], merged: bool, dtype: str, summary: dict[str, Any],
           evals: dict[str, Any] | None = None) -> str:
    """README.md text: YAML front matter (hub metadata) and a short body."""
    base = model.llama_path or f"mmgpt preset {model.preset} (random weights)"
    meta: dict[str, Any] = {
        "library_name": "peft",
        "base_model": base,
        "pipeline_tag": "image-text-to-text",
        "tags": ["multimodal-gpt", "openflamingo", "lora", "mmgpt"],
        "mmgpt": {
            "preset": model.preset,
            "media_attention": model.media_attention,
            "openflamingo_checkpoint": model.openflamingo_checkpoint,
            "lora": {"r": lora.get("r"), "alpha": lora.get("lora_alpha"), "dropout": lora.get("lora_dropout"),
                     "target_modules": lora.get("target_modules")},
            "merged": merged,
            "dtype": dtype,
        },
    }
    if summary:
        meta["mmgpt"]["training"] = summary
    if evals:
        meta["mmgpt"]["eval"] = evals
    body = f"""
# MultiModal-GPT ({model.preset}), exported by mmgpt

OpenFlamingo (CLIP ViT → Perceiver resampler → gated cross-attention in LLaMA) fine-tuned with LoRA
on the unified MultiModal-GPT instruction template. Media attention: `{model.media_attention}`.

## Load

```bash
mmgpt chat --model THIS_DIR --image picture.jpg
```

The adapter (`adapter/`) adapts layers inside mmgpt's Flamingo wrappers
(`layers.{{i}}.decoder_layer.*`, `layers.{{i}}.gated_cross_attn_layer.*`), which a plain
`LlamaForCausalLM` does not have, so it loads onto the model mmgpt builds:

```python
from mmgpt.inference.model_dir import load_model, resolve_source
built = load_model(resolve_source("THIS_DIR"))  # .model, .tokenizer, .transform, .media_attention
```
"""
    if merged:
        body += """
`language_model/` is a plain HF LLaMA directory (the text path, LoRA merged): it opens with
`LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`. `openflamingo/` holds the
perceiver and merged cross-attention in OpenFlamingo's checkpoint layout.
"""
    body += """
## Prompt format

The tokenizer's `chat_template` renders conversations exactly as training tokenised them
(`tokenizer.apply_chat_template(messages)`; the first user message may carry `{"type": "image"}`
parts, one `<image>` each).
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body


def update_eval(readme: Path, task: str, results: dict[str, Any]) -> None:
    """Record `results` under the card's `mmgpt.eval.<task>` metadata (`mmgpt eval --update-card`),
    keeping the rest of the card and other tasks' results; written through a temporary file so an
    interrupted update leaves the old card."""
    text = readme.read_text(encoding="utf-8")
    end = text.find("\n---\n", 4)
    if not text.startswith("---\n") or end < 0:
        raise ValueError(f"{readme}: no YAML front matter (--- ... ---) to put the results in")
    meta = yaml.safe_load(text[4:end]) or {}
    meta.setdefault("mmgpt", {}).setdefault("eval", {})[task] = results
    staged = readme.with_name(readme.name + ".partial")
    staged.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + text[end + 1:], encoding="utf-8")
    staged.replace(readme)
