"""`vlmkit video probe|frames`, `vlmkit data synth-video|video-shards`, `vlmkit eval video-temporal|video-qa`; `vlmkit eval
retrieval|zeroshot` come here for video data (`is_video_data`)."""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.cli.common import add_model_arg, device_of, emit, load_dual_encoder, precision_of


def register(sub, ev, data) -> None:
    video = sub.add_parser("video", help="look inside video files: frame counts, sampling, timestamps")
    vsub = video.add_subparsers(dest="video_command", required=True, metavar="CMD")
    p = vsub.add_parser(
        "probe", help="frames (counted by decoding where the container does not say), rate, codec"
    )
    p.add_argument("files", nargs="+", help="video files")
    p.set_defaults(func=cmd_video_probe)
    p = vsub.add_parser(
        "frames", help="the frames a sampling picks, with their timestamps, as a contact sheet"
    )
    p.add_argument("file", help="a video file")
    add_sampling_args(p)
    p.add_argument("--out", help="PNG contact sheet of the sampled frames (default: only print)")
    p.set_defaults(func=cmd_video_frames)

    p = data.add_parser("synth-video", help="write the synthetic 'moving shapes' videos (lossless ffv1 .mkv)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-val", type=int, default=400)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=16, help="frames per clip (default 16, at --fps)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--per-class", type=int, default=40, help="clips per class of the zero-shot folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--more-questions", action="store_true",
                   help="a second question per clip in vqa/: the shape's colour, or which colour appeared last")  # fmt: skip
    p.set_defaults(func=cmd_synth_video)
    p = data.add_parser(
        "video-shards", help="a video manifest into WebDataset shards (videos stored as they are)"
    )
    p.add_argument("--manifest", required=True, help="JSONL/CSV of video, caption")
    p.add_argument("--out", required=True, help="folder for 00000.tar, ...")
    p.add_argument("--shard-size", type=int, default=1000)
    p.set_defaults(func=cmd_video_shards)

    p = ev.add_parser(
        "video-temporal",
        help="multiple-choice questions answered by time (direction, order, entering/leaving, counts) beside "
        "the controls: mean pool, single frame, shuffled and reversed clips",
    )
    add_model_arg(p)
    p.add_argument(
        "--data",
        required=True,
        help="rows with video, choices, choice_captions, answer (synth-video val.jsonl)",
    )
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly per clip (default 8)")
    p.add_argument("--out", required=True, help="folder for temporal.json, temporal.md and temporal.png")
    p.set_defaults(func=cmd_eval_temporal)
    p = ev.add_parser(
        "video-qa",
        help="a LLaVA video model's answers per kind of question, beside the controls (mean pool, single frame, "
        "shuffled, reversed)",
    )
    add_model_arg(p)
    p.add_argument("--data", required=True, help="video question rows (synth-video's vqa/val.jsonl)")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly per clip (default 8)")
    p.add_argument("--limit", type=int, help="the first N questions only")
    p.add_argument("--out", required=True, help="folder for temporal.json, temporal.md and temporal.png")
    p.set_defaults(func=cmd_eval_video_qa)


def add_sampling_args(p) -> None:
    p.add_argument("--num-frames", type=int, default=8, help="frames to sample (the most, for fps/keyframes)")
    p.add_argument("--sampling", choices=["uniform", "fps", "keyframes"], default="uniform")
    p.add_argument("--fps", type=float, help="frames per second kept with --sampling fps")


def cmd_video_probe(args) -> None:
    from vlmkit.data.video import VideoDecodeError, probe

    for f in args.files:
        try:
            info = probe(f)
        except VideoDecodeError as e:
            print(f"{f}: unreadable ({e.reason})")
            continue
        how = "counted by decoding" if info.counted else "as the container says"
        print(f"{f}: {info.num_frames} frames ({how}), {info.fps:g} fps, {info.duration:.2f} s, "
              f"{info.width}x{info.height}, {info.codec}, keyframes at {info.keyframes[:12]}"
              f"{' ...' if len(info.keyframes) > 12 else ''}")  # fmt: skip


def cmd_video_frames(args) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    from vlmkit.data.video import read_clip

    clip = read_clip(args.file, args.num_frames, args.sampling, args.fps)
    for i, t in zip(clip.indices, clip.timestamps):
        print(f"frame {i:6d}  t={t:8.3f} s")
    if args.out:
        tiles = []
        for frame, t in zip(clip.frames, clip.timestamps):
            im = Image.fromarray(frame)
            scale = max(1, 128 // max(im.size))
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            ImageDraw.Draw(im).text((2, 2), f"{t:.2f}s", fill=(0, 0, 0))
            tiles.append(np.asarray(im))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(tiles, axis=1)).save(args.out)
        print(f"wrote {args.out}")


def cmd_synth_video(args) -> None:
    from vlmkit.data.synthetic_video import generate

    out = generate(args.out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
                   num_frames=args.num_frames, fps=args.fps, num_classification=args.per_class, seed=args.seed,
                   more_questions=args.more_questions)  # fmt: skip
    print(f"wrote {out}/{{train,val}}.jsonl, {out}/vqa/, {out}/classification/val/")


def cmd_video_shards(args) -> None:
    from vlmkit.data.video import read_video_manifest, write_video_shards

    samples, bad = read_video_manifest(args.manifest)
    for b in bad:
        print(f"skipped {b}")
    stats = write_video_shards(samples, args.out, args.shard_size)
    print(f"wrote {len(samples)} videos into {len(stats)} shards in {args.out} ({len(bad)} rows skipped)")


def is_video_data(spec: str) -> bool:
    """Whether `--data` names video: a manifest with a video column, a folder tree of video files, or shards
    whose first sample is a video."""
    from vlmkit.data.shards import expand_shards, is_shard_spec
    from vlmkit.data.video import is_video_manifest
    from vlmkit.eval.video import is_video_folder

    if is_shard_spec(spec):
        import tarfile

        from vlmkit.data.video import is_video

        try:
            with tarfile.open(expand_shards(spec)[0]) as tar:
                first = tar.next()
                return first is not None and is_video(first.name)
        except (OSError, tarfile.TarError):
            return False
    return is_video_folder(spec) if Path(spec).is_dir() else is_video_manifest(spec)


def cmd_eval_video(args, kind: str) -> None:
    """`vlmkit eval retrieval|zeroshot` on video data."""
    from vlmkit.eval.templates import load_templates
    from vlmkit.eval.video import evaluate_video_retrieval, evaluate_video_zeroshot

    device = device_of(args.device)
    pt = load_dual_encoder(args.model, device, f"vlmkit eval {kind} on video")
    model, tokenizer, preprocess = pt.model, pt.tokenizer, pt.preprocess
    common = dict(num_frames=args.num_frames, device=device, model_name=args.model,
                  bf16=precision_of(args, device).bf16)  # fmt: skip
    if kind == "retrieval":
        results = evaluate_video_retrieval(model, tokenizer, preprocess, args.data, **common)
    else:
        out_dir = Path(args.output).parent if args.output else None
        results = evaluate_video_zeroshot(model, tokenizer, preprocess, args.data, load_templates(args.templates),
                                          args.classes, args.positional_classes, out_dir=out_dir, **common)  # fmt: skip
    emit(results, args.output)


def cmd_eval_temporal(args) -> None:
    from vlmkit.eval.video import evaluate_temporal, format_temporal_table

    device = device_of(args.device)
    pt = load_dual_encoder(args.model, device, "vlmkit eval video-temporal")
    model, tokenizer, preprocess = pt.model, pt.tokenizer, pt.preprocess
    res = evaluate_temporal(model, tokenizer, preprocess, args.data, num_frames=args.num_frames, device=device,
                            model_name=args.model, bf16=precision_of(args, device).bf16, out_dir=args.out)  # fmt: skip
    print(format_temporal_table(res))
    print(json.dumps({k: v for k, v in res["metrics"].items() if k != "table"}))
    print(f"wrote {args.out}/temporal.json, temporal.md, temporal.png")


def cmd_eval_video_qa(args) -> None:
    from vlmkit.eval.video import evaluate_video_qa, format_temporal_table
    from vlmkit.inference import VLMPipeline

    device = device_of(args.device)
    vlm = VLMPipeline.from_pretrained(args.model, device, precision=precision_of(args, device).name)
    res = evaluate_video_qa(
        vlm, args.data, args.num_frames, args.batch_size, args.limit, args.model, out_dir=args.out
    )
    print(format_temporal_table(res))
    print(f"wrote {args.out}/temporal.json, temporal.md, temporal.png")
