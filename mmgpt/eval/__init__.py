"""Benchmark metrics for `mmgpt eval`: VQAv2/OK-VQA accuracy, A-OKVQA, OCR-VQA, COCO captions."""
from mmgpt.eval.metrics import (aokvqa_da_accuracy, aokvqa_da_mean, aokvqa_mc_accuracy,
                                caption_scores, ocrvqa_exact_match, ocrvqa_normalize, vqa_accuracy,
                                vqa_accuracy_mean)
from mmgpt.eval.vqa_normalize import vqa_normalize

__all__ = ["aokvqa_da_accuracy", "aokvqa_da_mean", "aokvqa_mc_accuracy", "caption_scores",
           "ocrvqa_exact_match", "ocrvqa_normalize", "vqa_accuracy", "vqa_accuracy_mean",
           "vqa_normalize"]
