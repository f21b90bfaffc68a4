"""Top answers for one image and question, or the answer to every question of a CSV, from a trained run (LoRA
merged: no adapter overhead).

    python -m vqa.predict --run RUN_DIR --image IMG --question "How many circles are there?"
    python -m vqa.predict --run RUN_DIR --csv questions.csv --out predictions.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import lora

from .cli import at_least, run_tool, user_path
from .data import VQADataset, build_transform, check_images, chunks, load_image, read_csv
from .errors import VQAError
from .evaluate import autocast, evaluate, make_loader, pick_device
from .predictions import check_out, predictions_table, write_predictions
from .text import QUESTION_TYPES, infer_question_type

__all__ = ["predict"]


@torch.no_grad()
def predict(model, tokenizer, answers, transform, image: Path, question: str, top_k: int = 5,
            type_head: bool = True, precision: str = "auto"):
    """Returns ``([(answer, probability), ...], question_type)``, most likely first. The type is the model's
    type head's guess, or with ``type_head=False`` (a run without the type loss, whose head never trained)
    the one the wording gives (``infer_question_type``). ``precision``: the run's, as evaluation runs it."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    pixels = transform(load_image(image)).unsqueeze(0)  # (1, 3, H, W)
    ids = torch.tensor([tokenizer.encode(question)])  # (1, L)
    device = next(model.parameters()).device
    with lora.merged(model), autocast(device, precision):  # as evaluation runs the model, so the two agree
        out = model(pixels.to(device), ids.to(device), torch.ones_like(ids).to(device))
    probs = out.logits.float().softmax(-1)[0]
    top = probs.topk(min(top_k, probs.numel()))
    ranked = [(answers.itos[i], float(p)) for p, i in zip(top.values, top.indices)]
    return ranked, QUESTION_TYPES[int(out.type_logits.argmax(-1))] if type_head else infer_question_type(question)


def main(argv: list[str] | None = None) -> int:
    from .run_files import CHECKPOINT_HELP, load_run

    parser = argparse.ArgumentParser(prog="python -m vqa.predict", description="Answer a question about an image, or "
                                     "every question of a CSV, with a trained run.")
    parser.add_argument("--run", required=True, type=user_path, help="run folder written by train.py")
    parser.add_argument("--image", type=user_path, help="image file (any format Pillow reads)")
    parser.add_argument("--question", help='the question, quoted: "How many circles are there?"')
    parser.add_argument("--top_k", "--top-k", type=at_least(1), help="answers to list (default 5)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--checkpoint_path", "--checkpoint-path", type=user_path, metavar="PATH", help=CHECKPOINT_HELP)
    many = parser.add_argument_group("every question of a CSV, in place of --image and --question")
    many.add_argument("--csv", type=user_path, help="CSV with image and question columns (an answer column is "
                                                    "not needed; python -m vqa.evaluate scores one)")
    many.add_argument("--out", type=user_path, help="the CSV to write: row, image, question, question_type, "
                                                    "prediction, probability, a row per question (replacing only an "
                                                    "earlier such file)")
    many.add_argument("--batch_size", "--batch-size", type=at_least(1), help="images per batch (default 32)")
    many.add_argument("--num_workers", "--num-workers", type=at_least(0),
                      help="loader processes decoding images (default 0: in this process)")
    many.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true",
                      help="leave out rows with a missing or unreadable image, or a bad field, and count them")
    many.add_argument("--allow_outside_paths", "--allow-outside-paths", action="store_true",
                      help="let image paths leave the CSV's folder (absolute or ../); also on where the run "
                           "trained with it")
    args = parser.parse_args(argv)
    csv_only = [name for name in ("batch_size", "num_workers", "skip_bad_rows", "allow_outside_paths")
                if getattr(args, name) not in (None, False)]
    if args.csv or args.out:
        if not (args.csv and args.out) or args.image or args.question is not None:
            parser.error("--csv and --out go together, in place of --image and --question")
        if args.top_k is not None:
            parser.error("--top_k lists one question's answers; with --csv each question gets its most likely one")
    elif not (args.image and args.question is not None):
        parser.error("give --image and --question (one question), or --csv and --out (a file of them)")
    elif csv_only:
        parser.error(f"--{csv_only[0]} is for --csv (a file of questions); one question takes --image and --question")
    try:
        if args.csv:
            return predict_csv(args, parser.prog)
        if not args.question.strip():
            raise VQAError("--question is empty; ask something, e.g. --question 'What color is the circle?'")
        model, tokenizer, answers, cfg = load_run(args.run, pick_device(args.device),
                                                  checkpoint_path=args.checkpoint_path, tool=parser.prog)
        transform = build_transform(model.backbone, cfg.model.img_size)
        ranked, qtype = predict(model, tokenizer, answers, transform, args.image, args.question, args.top_k or 5,
                                type_head=cfg.train.use_type_loss, precision=cfg.train.precision)
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    said = f"type head: {qtype}" if cfg.train.use_type_loss else f"type: {qtype}, from its wording"
    print(f"question: {args.question}  ({said})")
    for answer, p in ranked:
        print(f"{p:7.2%}  {answer}")
    return 0


def predict_csv(args: argparse.Namespace, tool: str) -> int:
    """``--csv``: the run's answer to every question of the CSV, in batches, written to ``--out``."""
    from .run_files import load_run

    check_out(args.out, "--out", args.csv)
    device = pick_device(args.device)
    model, tokenizer, answers, cfg = load_run(args.run, device, checkpoint_path=args.checkpoint_path, tool=tool)
    data = read_csv(args.csv, require_answer=False, skip_bad_rows=args.skip_bad_rows,
                    allow_outside_paths=args.allow_outside_paths or cfg.data.allow_outside_paths)
    data = check_images(data, args.skip_bad_rows)
    if data.skipped:
        print(data.skipped_note())  # now: the prediction may take a while
    dataset = VQADataset(data.rows, build_transform(model.backbone, cfg.model.img_size), tokenizer, answers)
    loader = make_loader(dataset, chunks(list(range(len(dataset))), args.batch_size or 32), args.num_workers or 0,
                         pin_memory=device.type == "cuda")
    collected: list = []
    evaluate(model, loader, device, predictions=collected, precision=cfg.train.precision)
    write_predictions(args.out, predictions_table(data, dataset, collected, answers, with_answers=False), "--out")
    print(f"wrote the {len(data.rows)} predictions ({len(dataset)} images) to {args.out}")
    if data.skipped:
        print(f"skipped {len(data.skipped)} bad row(s) (--skip_bad_rows)")
    return 0


if __name__ == "__main__":
    run_tool(main)
