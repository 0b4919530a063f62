"""Model cards (Mitchell et al. 2019) for any vlmkit model folder: `vlmkit card`, and the README.md of
`vlmkit export`. The Hub's metadata (library, pipeline tag, tags, model-index with vlmkit's evaluation and
bias-audit results) goes through huggingface_hub's `ModelCardData` / `EvalResult`; the sections are Mitchell
et al.'s: model details, intended use, factors, metrics, evaluation data, training data, quantitative analyses
(disaggregated, with intervals), ethical considerations, caveats and recommendations. What the card cannot
know from the folder it says so ("[More Information Needed]") instead of inventing it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import vlmkit
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.models.clip import CLIPConfig

log = logging.getLogger(__name__)


# CLIP_benchmark task -> (Hugging Face task type, task name)
_TASKS = {
    "zeroshot_classification": ("zero-shot-image-classification", "Zero-shot image classification"),
    "zeroshot_retrieval": ("zero-shot-image-retrieval", "Zero-shot image-text retrieval"),
    "linear_probe": ("image-classification", "Linear probe on frozen image features"),
}
_METRICS = {"acc1": ("accuracy", "top-1 accuracy"), "acc5": ("accuracy", "top-5 accuracy")}
_METRICS["mean_per_class_recall"] = ("recall", "mean per-class recall")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("model card: skipping %s (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None


def eval_results(source_dir: str | Path | None) -> list:
    """vlmkit evaluation results (`eval/*.json`, CLIP_benchmark form) as the Hub's `EvalResult`s, one per
    metric."""
    from huggingface_hub import EvalResult

    if source_dir is None or not (Path(source_dir) / "eval").is_dir():
        return []
    results = []
    for path in sorted((Path(source_dir) / "eval").glob("*.json")):
        data = _read_json(path)
        if not data or not isinstance(data.get("metrics"), dict) or "task" not in data:
            continue
        task = str(data["task"])
        task_type, task_name = _TASKS.get(task, (task.replace("_", "-"), task.replace("_", " ")))
        dataset = str(data.get("dataset") or path.stem)
        for key, value in data["metrics"].items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or key.startswith("num_"):
                continue
            kind, label = _METRICS.get(key, ("recall" if "recall@" in key else key, key.replace("_", " ")))
            results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=dataset,
                    dataset_name=dataset,
                    metric_type=kind,
                    metric_name=label,
                    metric_value=round(float(value), 4),
                )
            )
    return results


def _setting(train: dict, path: str, flat: str):
    """A field of a saved TrainConfig tree ("data.train"), or its flat name in runs saved before the tree."""
    section, _, name = path.partition(".")
    value = train.get(section)
    return value.get(name) if isinstance(value, dict) else train.get(flat)


def _training_section(source_dir: str | Path | None) -> str:
    file = Path(source_dir) / "train_config.json" if source_dir else None
    meta = _read_json(file) if file is not None and file.is_file() else None
    train = meta.get("train") if meta else None
    if not isinstance(train, dict):
        return (
            "Not recorded: the exported folder has no vlmkit `train_config.json` (the model was not trained "
            "by vlmkit, or only its weights were kept). Describe the training data here before publishing."
        )
    summary = (
        _read_json(Path(source_dir) / "summary.json")
        if (Path(source_dir) / "summary.json").is_file()
        else None
    )
    rows = [
        ("Training data", _setting(train, "data.train", "train_data")),
        ("Validation data", _setting(train, "data.val", "val_data")),
        ("Zero-shot evaluation data", _setting(train, "data.zeroshot", "zeroshot_data")),
        ("Model preset", _setting(train, "model.name", "model")),
        ("Global batch size", train.get("batch_size")),
        ("Epochs", train.get("epochs")),
        ("Optimizer steps", (summary or {}).get("step")),
        ("Learning rate", _setting(train, "optim.lr", "lr")),
        (
            "Tokenizer",
            _setting(train, "model.tokenizer", "tokenizer")
            or "byte-level BPE trained on the training captions",
        ),
    ]
    table = "\n".join(f"| {k} | `{v}` |" for k, v in rows if v not in (None, ""))
    return (
        "Trained with vlmkit (`vlmkit train`); the full settings are in the run's `train_config.json`.\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        "The captions and images of that data are all the model knows: it has seen nothing else."
    )


MORE = "[More Information Needed]"
# family -> (pipeline tag, what it is, what it is for)
_FAMILIES = {
    "clip": (
        "zero-shot-image-classification",
        "an image-text dual encoder",
        "zero-shot image classification, image-text retrieval and image or text embeddings (search, "
        "deduplication, data curation)",
    ),
    "coca": (
        "image-to-text",
        "a contrastive captioner (CoCa)",
        "image captioning, and embeddings from its towers",
    ),
    "llava": (
        "image-text-to-text",
        "a LLaVA-style vision-language model",
        "answering questions about an image, captioning",
    ),
    "fusion": (
        "zero-shot-image-classification",
        "a fusion encoder (ALBEF/BLIP style)",
        "image-text matching and retrieval (ITC, reranked by ITM)",
    ),
}


AUDIT_TASKS = {"audit": "zero-shot-image-classification", "audit_captions": "image-to-text"}


def read_audit(path: str | Path) -> dict:
    """An `audit.json` of `vlmkit audit` (a dual encoder's, or a captioning model's: task `audit_captions`);
    ConfigError naming the file otherwise."""
    from vlmkit.errors import ConfigError

    data = _read_json(Path(path)) if Path(path).is_file() else None
    if not data or data.get("task") not in AUDIT_TASKS or not isinstance(data.get("metrics"), dict):
        raise ConfigError(f"{path} is not an audit.json written by `vlmkit audit`")
    return data


def audit_results(audits: list[dict]) -> list:
    """The headline numbers of each audit as the Hub's `EvalResult`s."""
    from huggingface_hub import EvalResult

    results = []
    for a in audits:
        dataset = Path(a["dataset"]).parent.name or a["dataset"]
        for key in ("accuracy", "worst_group_accuracy", "gap", "demographic_parity_difference"):
            if key in a["metrics"]:
                results.append(
                    EvalResult(
                        task_type=AUDIT_TASKS[a["task"]],
                        task_name=f"Bias audit ({a['attribute']})",
                        dataset_type=dataset,
                        dataset_name=dataset,
                        metric_type=key,
                        metric_name=key.replace("_", " "),
                        metric_value=round(float(a["metrics"][key]["value"]), 4),
                    )
                )
    return results


def _architecture(cfg) -> str:
    rows = []
    v, t = getattr(cfg, "vision", None), getattr(cfg, "text", None)
    if v is not None:
        rows.append(("Image size / patch size", f"{v.image_size} / {v.patch_size}"))
        rows.append(("Image tower (width, layers, heads)", f"{v.width}, {v.layers}, {v.heads}"))
    if t is not None and hasattr(t, "width"):
        rows.append(("Text tower (width, layers, heads)", f"{t.width}, {t.layers}, {t.heads}"))
        rows.append(("Context length / vocabulary", f"{t.context_length} / {t.vocab_size}"))
    if hasattr(cfg, "embed_dim"):
        rows.append(("Embedding dimension", cfg.embed_dim))
    if not rows:
        return MORE
    return "| Architecture | |\n|---|---|\n" + "\n".join(f"| {k} | {val} |" for k, val in rows)


def _interval(e: dict) -> str:
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def _values(a: dict) -> list[str]:
    """The attribute values an audit saw, from its (label, attribute) groups."""
    return sorted({g.split(" | ")[-1] for g in a["per_group"]})


def _audit_section(a: dict) -> str:
    m, k = a["metrics"], a["settings"].get("k")
    by_captions = a["task"] == "audit_captions"
    head = [f"### Bias audit: `{a['attribute']}` on `{a['dataset']}` ({a['counts']['images']} images)", ""]
    head.append(
        "Every number with its 95% bootstrap interval; settings (templates, queries, k, targets, seed) in the audit's JSON."
        if not by_captions
        else "From the model's own captions (right when a caption names the label); every number with its 95% "
        "bootstrap interval; the prompt, decoding and seed in the audit's JSON."
    )
    head += ["", "| Measure | Value [95% interval] |", "|---|---|"]
    for key in ("accuracy", "average_group_accuracy", "worst_group_accuracy", "gap", "demographic_parity_difference",
                "equalized_odds_difference", "conflict_gap", f"max_skew@{k}/uniform", f"ndkl@{k}/uniform", "leakage/image",
                "leakage/text", "attribute_named", "majority_named_on_conflicting", "majority_named_on_aligned"):  # fmt: skip
        if key in m:
            head.append(f"| {key} | {_interval(m[key])} |")
    kind = "Caption accuracy" if by_captions else "Zero-shot accuracy"
    head += ["", f"| Group (label, attribute) | {kind} [95% interval] |", "|---|---|"]
    head += [
        f"| {g.replace(' | ', ', ')} | {_interval(e)} |" for g, e in a["per_group"].items()
    ]  # no "|" in a cell
    for name, after in (a.get("mitigations") or {}).items():
        head.append(
            f"\nMitigation `{name}`: gap {_interval(after['metrics']['gap'])}, cost in average accuracy "
            f"{after['accuracy_cost']:+.3f}; worse: {', '.join(after['worse']) or 'none'}."
        )
    return "\n".join(head)


def build_model_card(
    name: str,
    cfg,
    family: str,
    source_dir: str | Path | None = None,
    audits: list[dict] | None = None,
    usage: str | None = None,
) -> str:
    """A Mitchell et al. model card (README.md with Hub front matter) for a model of `family`: evaluation
    results from `source_dir/eval/*.json`, bias audits from `audits` (read with `read_audit`)."""
    from huggingface_hub import ModelCard, ModelCardData

    audits = audits or []
    pipeline, what, uses = _FAMILIES.get(family, (None, f"a {family} model", MORE))
    evals = eval_results(source_dir)
    results = evals + audit_results(audits)
    data = ModelCardData(
        library_name="vlmkit",
        pipeline_tag=pipeline,
        tags=["vlmkit", family, "vision-language"],
        model_name=name,
        eval_results=results or None,
        license=None,
    )
    if evals:
        evaluation = "| Dataset | Task | Metric | Value |\n|---|---|---|---|\n" + "\n".join(
            f"| {r.dataset_name} | {r.task_name} | {r.metric_name} | {r.metric_value:.4f} |" for r in evals
        )
    else:
        evaluation = "No vlmkit evaluation results (`eval/*.json`) were found for this model."
    datasets = sorted({r.dataset_name for r in evals} | {a["dataset"] for a in audits})
    factors = (
        "Audited: "
        + ", ".join(f"`{a['attribute']}` ({', '.join(_values(a))})" for a in audits)
        + ". Other factors (image quality, domain, language of the prompts) were not measured: "
        + MORE
        if audits
        else f"No bias audit was recorded for this model (`vlmkit audit`, then `vlmkit card --audit`). {MORE}"
    )
    if audits:
        gaps = "; ".join(
            f"on `{a['attribute']}` the worst group ({a['worst_group']}) is {a['metrics']['gap']['value']:.3f} below the "
            f"group average [{a['metrics']['gap']['low']:.3f}, {a['metrics']['gap']['high']:.3f}]"
            for a in audits
        )
        ethics = f"The audits below found: {gaps}. "
    else:
        ethics = "This card records no fairness evaluation. "
    ethics += (
        "Image-text models learn the associations in their training pairs, including stereotypes, and can "
        "perform unevenly across groups of people. Do not use the model to make decisions about people "
        "(hiring, policing, surveillance, credit); before any use on images of people, measure its accuracy "
        "separately for the groups concerned."
    )
    analyses = (
        "\n\n".join(_audit_section(a) for a in audits) or f"No disaggregated evaluation was recorded. {MORE}"
    )
    metrics_text = (
        "Top-1 zero-shot accuracy and mean per-class recall (classification), recall@k (retrieval)"
        + (
            "; for bias: accuracy per (label, attribute) group, the worst group and its gap to the average, "
            "demographic-parity and equalized-odds differences, MaxSkew@k and NDKL@k of neutral queries, and "
            "attribute leakage of a linear probe, each with a 95% bootstrap interval"
            if audits
            else ""
        )
        + "."
    )
    body = f"""# {name}

## Model details

{what[0].upper() + what[1:]}, trained or exported with vlmkit {vlmkit.__version__}.

{_architecture(cfg)}

- License: {MORE}
- Developed by / contact: {MORE}
- Citation: {MORE}

{("## Usage" + chr(10) + chr(10) + usage + chr(10) + chr(10)) if usage else ""}## Intended use

Primary uses: {uses}, for research, teaching and prototyping, on data that resembles the training data.
Check accuracy on your own labelled sample before relying on it.

Out of scope: decisions about people; any use on data unlike the training data without measuring it first.

## Factors

{factors}

## Metrics

{metrics_text}

## Evaluation data

{", ".join(f"`{d}`" for d in datasets) if datasets else MORE}

## Training data

{_training_section(source_dir)}

## Quantitative analyses

{evaluation}

{analyses}

## Ethical considerations

{ethics}

## Caveats and recommendations

- The model recognises only what its training captions describe; elsewhere its scores are unreliable, and it
  does not say when it is outside what it knows.
- Zero-shot accuracy depends on the wording of the labels and prompt templates.
- Small models and small or synthetic training sets give representations far weaker than published models.
- License: none was recorded; add one (`license:` in the front matter) before publishing.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def model_card(
    name: str, cfg: CLIPConfig, layout: str, tokenizer: Tokenizer, source_dir: str | Path | None = None,
    audits: list[dict] | None = None,
) -> str:  # fmt: skip
    """README.md of an exported dual encoder: the model card with a usage section for transformers."""
    t = cfg.text
    cls = "SiglipModel" if layout == "siglip" else "CLIPModel"
    usage = f"""```python
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, {cls}

model = {cls}.from_pretrained("PATH")  # this folder, or the Hub repository it is uploaded to
tokenizer = AutoTokenizer.from_pretrained("PATH")
processor = AutoImageProcessor.from_pretrained("PATH")
text = tokenizer(["a photo of a cat", "a photo of a dog"], padding="max_length", truncation=True,
                 max_length={t.context_length}, return_tensors="pt")
pixels = processor(images=[Image.open("cat.jpg")], return_tensors="pt")
logits_per_image = model(input_ids=text["input_ids"], pixel_values=pixels["pixel_values"]).logits_per_image
```

or with vlmkit, which reads this folder directly: `vlmkit classify --model PATH --image cat.jpg --labels cat dog`.
Pad text to the full `max_length`, as above: that is how the model was trained and evaluated. The tokenizer
cuts text after {t.context_length - 2} tokens."""
    return build_model_card(name, cfg, "clip", source_dir, audits, usage)
