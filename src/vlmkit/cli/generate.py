"""The CLI of the generative models: `vlmkit caption`, `vlmkit chat`, `vlmkit generate` (Flamingo),
`vlmkit eval captioning|vqa|fewshot` and `vlmkit data tasks`. Thin wrappers over `vlmkit.inference.generate.VLMPipeline` and `vlmkit.eval.vqa`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmkit.cli.common import add_precision_arg
from vlmkit.errors import VlmkitError

_MODEL_HELP = "a model folder: a vlmkit CoCa / LLaVA run or checkpoint, or a Hugging Face LLaVA folder"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_precision_arg(p)


def _generation_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = greedy or sampling)")
    g.add_argument(
        "--temperature", type=float, default=0.0, help="> 0 samples with this temperature; 0 = greedy"
    )
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")


def _generation(args) -> dict:
    sampling = args.temperature > 0
    return {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "do_sample": sampling,
        "temperature": args.temperature if sampling else 1.0,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "stop_strings": list(args.stop),
        "seed": args.seed,
    }


def _pipeline(args):
    from vlmkit.cli.common import device_of
    from vlmkit.inference import VLMPipeline

    return VLMPipeline.from_pretrained(args.model, device=device_of(args.device), precision=args.precision)


def _check_images(paths: list[str]) -> None:
    from vlmkit.data.transforms import ImageDecodeError, check_image_file

    for p in paths:
        try:
            check_image_file(p)
        except ImageDecodeError as e:
            raise VlmkitError(str(e)) from None


def cmd_caption(args) -> None:
    _check_images(args.image)
    vlm = _pipeline(args)
    captions = vlm.caption(
        args.image, **({"prompt": args.prompt} if args.prompt else {}), **_generation(args)
    )
    for path, caption in zip(args.image, captions):
        print(f"{path}\t{caption}" if len(args.image) > 1 else caption)


def cmd_chat(args) -> None:
    """Several turns about one image or more (LLaVA, Flamingo; CoCa reads one); each answer streams as it is
    generated. The images come in order at the start of the first turn."""
    from vlmkit.data.chat import image_markers
    from vlmkit.models.generation import TextStreamer

    _check_images(args.image)
    if args.json_schema:
        return _chat_json(args)
    vlm = _pipeline(args)
    if len(args.image) > 1 and vlm.family == "coca":
        raise VlmkitError(f"{args.model} is a CoCa model, which reads one image; give one --image")
    config = vlm.generation_config(**_generation(args))
    streamer = TextStreamer(vlm.tokenizer, on_text=lambda piece: print(piece, end="", flush=True))
    scripted = list(args.message or [])
    interactive = not scripted
    if interactive:
        print(f"chatting about {', '.join(args.image)} (an empty line or Ctrl-D ends)", file=sys.stderr)
    conversation: list[dict] = []
    while True:
        if scripted:
            message = scripted.pop(0)
            print(f"user: {message}")
        elif interactive:
            try:
                message = input("user: ").strip()
            except EOFError:
                break
            if not message:
                break
        else:
            break
        text = message if conversation else image_markers(len(args.image), args.image_label or None) + message
        conversation.append({"from": "human", "value": text})
        print("assistant: ", end="", flush=True)
        reply = vlm.generate([args.image], [conversation], config, streamer=streamer)[0]
        print(flush=True)
        conversation.append({"from": "gpt", "value": reply})


def _chat_json(args) -> None:
    """`vlmkit chat --json-schema`: each --message answered in JSON valid under the schema, printed with how it
    was obtained."""
    from vlmkit.inference.structured import load_schema, structured_answers

    if not args.message:
        raise VlmkitError("--json-schema answers the --message turns; give at least one --message")
    schema = load_schema(args.json_schema)
    vlm = _pipeline(args)
    for message in args.message:
        a = structured_answers(vlm, [args.image], [message], schema, retries=args.retries,
                               max_new_tokens=args.max_new_tokens)[0]  # fmt: skip
        print(f"user: {message}")
        print(json.dumps(a.value))
        print(f"# {a.how} after {a.attempts} attempt(s); valid: {a.valid}", file=sys.stderr)


def cmd_generate(args) -> None:
    """Flamingo: an interleaved prompt whose <image> placeholders the --image files fill in order; the
    continuation streams."""
    import torch

    from vlmkit.cli.common import device_of
    from vlmkit.convert import load_pretrained
    from vlmkit.data.transforms import ImageTransform, load_image
    from vlmkit.models.generation import GenerationConfig, TextStreamer

    images = list(args.image or [])
    _check_images(images)
    pt = load_pretrained(args.model, device=device_of(args.device))
    model, tok = pt.model, pt.tokenizer
    if not hasattr(model, "gated_cross_attn_layers"):
        raise VlmkitError(
            f"{args.model} is not a Flamingo-style model; for CoCa / LLaVA use `vlmkit caption` or `vlmkit chat`"
        )
    if tok is None:
        raise VlmkitError(f"{args.model} has no tokenizer.json; generation needs one")
    ids = ([tok.sot_token_id] if tok.sot_token_id is not None else []) + tok.encode(args.prompt)
    placeholders = ids.count(model.cfg.image_token_id)
    if placeholders != len(images):
        raise VlmkitError(
            f"the prompt has {placeholders} <image> placeholders but {len(images)} --image files were given; "
            "give one image per <image>, in order"
        )
    if len(ids) >= model.cfg.decoder.max_seq_len:
        raise VlmkitError(
            f"the prompt is {len(ids)} tokens; the model's context is {model.cfg.decoder.max_seq_len}"
        )
    transform = ImageTransform(pt.preprocess)
    device = next(model.parameters()).device
    pixels = torch.stack([transform(load_image(p)) for p in images])[None].to(device) if images else None
    d = model.cfg.decoder
    options = _generation(args)
    options["max_new_tokens"] = min(options["max_new_tokens"], d.max_seq_len - len(ids))
    config = GenerationConfig(eos_token_id=[d.eos_token_id, model.cfg.chunk_token_id], pad_token_id=d.pad_token_id,
                              **options)  # fmt: skip
    streamer = TextStreamer(tok, on_text=lambda piece: print(piece, end="", flush=True))
    streamer = streamer if args.num_beams == 1 else None
    new = model.generate(
        torch.tensor([ids], device=device), pixels, config=config, tokenizer=tok, streamer=streamer
    )
    if streamer is None:
        print(tok.decode(new[0].tolist()), end="")
    print(flush=True)


def cmd_eval_fewshot(args) -> None:
    from vlmkit.cli.common import device_of
    from vlmkit.convert import load_pretrained
    from vlmkit.eval.fewshot import FewShot, evaluate_fewshot, plot_fewshot

    data = Path(args.data) if args.data else None
    defaults = {"classify": ("train_classify", "val_episodes"), "caption": ("train_captions", "val_captions"),
                "vqa": ("train_vqa", "val_vqa")}[args.task]  # fmt: skip
    support = args.support or (data / f"{defaults[0]}.jsonl" if data else None)
    queries = args.queries or (data / f"{defaults[1]}.jsonl" if data else None)
    if support is None or queries is None:
        raise VlmkitError("pass --data (a folder from `vlmkit data tasks`) or both --support and --queries")
    pt = load_pretrained(args.model, device=device_of(args.device))
    if pt.tokenizer is None:
        raise VlmkitError(f"{args.model} has no tokenizer.json; few-shot evaluation needs one")
    fs = FewShot(pt.model, pt.tokenizer, pt.preprocess, next(pt.model.parameters()).device, args.batch_size)
    result = evaluate_fewshot(fs, args.task, args.shots, args.demos, support=support, queries=queries,
                              limit=args.limit, seed=args.seed)  # fmt: skip
    result["model"] = args.model
    key = "cider" if args.task == "caption" else "accuracy"
    for k, r in result["results"].items():
        v = r[key]
        print(f"{args.task} {k} shots ({args.demos}): {key} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
              f" on {r['num_queries']}")  # fmt: skip
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"fewshot_{args.task}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        plot_fewshot(result, out / f"fewshot_{args.task}.png")
        print(f"wrote {out / f'fewshot_{args.task}.json'} and the plot beside it")


def _emit(result: dict, output: str | None) -> None:
    from vlmkit.eval.features import save_results

    if output:
        save_results(result, output)
        print(f"wrote {output}")
    print(json.dumps(result["metrics"], indent=2))


def cmd_eval_vqa(args) -> None:
    from vlmkit.eval.vqa import evaluate_vqa

    vlm = _pipeline(args)
    config = {"max_new_tokens": args.max_new_tokens}
    result = evaluate_vqa(
        lambda images, questions: vlm.answer(images, questions, **config),
        args.data,
        batch_size=args.batch_size,
        limit=args.limit,
        out_dir=args.out,
        model_name=args.model,
    )
    _emit(result, args.output)


def cmd_eval_prompts(args) -> None:
    from vlmkit.inference.prompting import evaluate_prompt_variants, read_prompt_variants

    variants = read_prompt_variants(args.prompts)
    vlm = _pipeline(args)
    result = evaluate_prompt_variants(
        vlm, variants, args.data, limit=args.limit, batch_size=args.batch_size, model_name=args.model,
        out_dir=args.out, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    width = max(len(r["name"]) for r in result["metrics"]["variants"])
    for r in result["metrics"]["variants"]:
        types = "  ".join(f"{t} {a:.3f}" for t, a in sorted(r["by_type"].items()))
        print(f"{r['name']:>{width}}: {r['accuracy']:.3f}  ({types})")
    if args.out:
        print(f"report: {args.out}/report.html")


def cmd_eval_captioning(args) -> None:
    from vlmkit.eval.vqa import evaluate_captioning

    vlm = _pipeline(args)
    config = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    result = evaluate_captioning(
        lambda images: vlm.caption(images, **config),
        args.data,
        batch_size=args.batch_size,
        limit=args.limit,
        out_dir=args.out,
        model_name=args.model,
    )
    _emit(result, args.output)


def cmd_data_tasks(args) -> None:
    from vlmkit.data.vqa import write_tasks

    if not (Path(args.data) / "train.jsonl").is_file():
        raise VlmkitError(
            f"{args.data} holds no train.jsonl; write the dataset first: vlmkit data synth --out DIR"
        )
    paths = write_tasks(
        args.data,
        seed=args.seed,
        questions_per_image=args.questions_per_image,
        multi_object_chats=args.multi_object_chats,
    )
    for key, path in paths.items():
        print(f"{key}: {path}")


def register(sub, eval_sub, data_sub) -> None:
    """Add the generative subcommands to the `vlmkit`, `vlmkit eval` and `vlmkit data` parsers."""
    p = sub.add_parser("caption", help="caption images with a CoCa or LLaVA model")
    _model_args(p)
    p.add_argument("--image", nargs="+", required=True, help="image files")
    p.add_argument("--prompt", help="the instruction for LLaVA models (default: 'Describe the image.')")
    _generation_args(p, 40)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser(
        "chat",
        help="talk about one image or several with a LLaVA or Flamingo (or CoCa) model; answers stream",
    )
    _model_args(p)
    p.add_argument(
        "--image",
        action="append",
        required=True,
        help="an image the conversation is about (repeatable, in order)",
    )
    p.add_argument(
        "--message",
        action="append",
        help="a user turn (repeatable); without it, read turns from the terminal",
    )
    p.add_argument("--image-label", default="Image {}: ",
                   help="with several images, the label before each ({} is its number; '' for none)")  # fmt: skip
    p.add_argument("--json-schema", metavar="FILE",
                   help="answer each --message in JSON valid under this JSON Schema (retried, then constrained)")  # fmt: skip
    p.add_argument(
        "--retries", type=int, default=2, help="--json-schema: sampled retries before constraining"
    )
    _generation_args(p, 128)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "generate", help="continue an interleaved prompt with a Flamingo model; images fill <image> in order"
    )
    _model_args(p)
    p.add_argument(
        "--prompt", required=True, help='e.g. "<image>Output: a red circle<|endofchunk|><image>Output:"'
    )
    p.add_argument("--image", action="append", default=[], help="an image for the next <image> (repeatable)")
    _generation_args(p, 32)
    p.set_defaults(func=cmd_generate)

    p = eval_sub.add_parser("fewshot", help="few-shot accuracy / CIDEr of a Flamingo model against shots")
    _model_args(p)
    p.add_argument("--task", required=True, choices=["classify", "caption", "vqa"])
    p.add_argument("--shots", type=int, nargs="+", default=[0, 4, 8])
    p.add_argument("--demos", choices=["random", "similar"], default="random",
                   help="demonstrations at random or by image similarity (RICES, the most similar last)")  # fmt: skip
    p.add_argument(
        "--data", help="a folder from `vlmkit data tasks` (support and queries by the task's names)"
    )
    p.add_argument("--support", help="the demonstrations' file (classify: train_classify.jsonl)")
    p.add_argument("--queries", help="the queries' file (classify: val_episodes.jsonl)")
    p.add_argument("--limit", type=int, help="the first N queries only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for fewshot_<task>.json and its plot")
    p.set_defaults(func=cmd_eval_fewshot)

    for task, func, tokens, data_help in (
        (
            "vqa",
            cmd_eval_vqa,
            16,
            "a questions file (LLaVA-format JSONL, e.g. val_vqa.jsonl from vlmkit data tasks)",
        ),
        (
            "captioning",
            cmd_eval_captioning,
            40,
            "a captions file (val_captions.jsonl) or an image-caption manifest",
        ),
    ):
        what = "VQA accuracy by question type" if task == "vqa" else "BLEU-4 and CIDEr"
        p = eval_sub.add_parser(task, help=f"{what} of a generative model")
        _model_args(p)
        p.add_argument("--data", required=True, help=data_help)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--limit", type=int, help="evaluate the first N only")
        p.add_argument("--max-new-tokens", type=int, default=tokens)
        if task == "captioning":
            p.add_argument("--num-beams", type=int, default=1)
        p.add_argument("--out", help="folder for the JSON results, plots and report.html")
        p.add_argument("--output", help="results JSON (default: print)")
        p.set_defaults(func=func)

    p = eval_sub.add_parser(
        "prompts", help="VQA accuracy of prompt variants (system prompts, templates) side by side"
    )
    _model_args(p)
    p.add_argument(
        "--prompts", required=True, help="JSON list or JSONL of {name, template with {question}, system}"
    )
    p.add_argument("--data", required=True, help="a questions file (val_vqa.jsonl from vlmkit data tasks)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="the first N questions only")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--out", help="folder for prompts.json, prompts.png, report.html and each variant's predictions"
    )
    p.set_defaults(func=cmd_eval_prompts)

    p = data_sub.add_parser(
        "tasks", help="caption and question files (VQA) from a `vlmkit data synth` folder"
    )
    p.add_argument("--data", required=True, help="the synthetic dataset folder")
    p.add_argument("--questions-per-image", type=int, default=3)
    p.add_argument(
        "--multi-object-chats",
        type=int,
        default=1,
        help="conversations per training scene of several objects in train_chat.jsonl (fresh questions each)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_tasks)
