"""Top answers for one image and question, from a trained run (LoRA merged: no adapter overhead).

    python -m vqa.predict --run RUN_DIR --image IMG --question "How many circles are there?"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import lora

from .cli import run_tool, user_path
from .data import build_transform, load_image
from .errors import VQAError
from .evaluate import at_least, autocast, pick_device
from .text import QUESTION_TYPES, infer_question_type

__all__ = ["predict"]


@torch.no_grad()
def predict(model, tokenizer, answers, transform, image: Path, question: str, top_k: int = 5,
            type_head: bool = True):
    """Returns ``([(answer, probability), ...], question_type)``, most likely first. The type is the model's
    type head's guess, or with ``type_head=False`` (a run without the type loss, whose head never trained)
    the one the wording gives (``infer_question_type``)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    pixels = transform(load_image(image)).unsqueeze(0)  # (1, 3, H, W)
    ids = torch.tensor([tokenizer.encode(question)])  # (1, L)
    device = next(model.parameters()).device
    with lora.merged(model), autocast(device):  # as evaluation runs the model (bf16 on CUDA), so the two agree
        out = model(pixels.to(device), ids.to(device), torch.ones_like(ids).to(device))
    probs = out.logits.float().softmax(-1)[0]
    top = probs.topk(min(top_k, probs.numel()))
    ranked = [(answers.itos[i], float(p)) for p, i in zip(top.values, top.indices)]
    return ranked, QUESTION_TYPES[int(out.type_logits.argmax(-1))] if type_head else infer_question_type(question)


def main(argv: list[str] | None = None) -> int:
    from .run_files import CHECKPOINT_HELP, load_run

    parser = argparse.ArgumentParser(prog="python -m vqa.predict",
                                     description="Answer a question about an image with a trained run.")
    parser.add_argument("--run", required=True, type=user_path, help="run folder written by train.py")
    parser.add_argument("--image", required=True, type=user_path, help="image file (any format Pillow reads)")
    parser.add_argument("--question", required=True, help='the question, quoted: "How many circles are there?"')
    parser.add_argument("--top_k", "--top-k", type=at_least(1), default=5, help="answers to list (default 5)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--checkpoint_path", "--checkpoint-path", type=user_path, metavar="PATH", help=CHECKPOINT_HELP)
    args = parser.parse_args(argv)
    try:
        if not args.question.strip():
            raise VQAError("--question is empty; ask something, e.g. --question 'What color is the circle?'")
        model, tokenizer, answers, cfg = load_run(args.run, pick_device(args.device),
                                                  checkpoint_path=args.checkpoint_path, tool=parser.prog)
        transform = build_transform(model.backbone, cfg.model.img_size)
        ranked, qtype = predict(model, tokenizer, answers, transform, args.image, args.question, args.top_k,
                                type_head=cfg.train.use_type_loss)
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    said = f"type head: {qtype}" if cfg.train.use_type_loss else f"type: {qtype}, from its wording"
    print(f"question: {args.question}  ({said})")
    for answer, p in ranked:
        print(f"{p:7.2%}  {answer}")
    return 0


if __name__ == "__main__":
    run_tool(main)
