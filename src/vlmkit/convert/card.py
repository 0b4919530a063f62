"""The model card (README.md) of an exported dual encoder: the Hub's metadata (library, pipeline tag, tags,
model-index with vlmkit's evaluation results) through huggingface_hub's `ModelCardData` / `EvalResult`, and
sections on usage, training data, evaluation, intended use, limitations and bias."""

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


def model_card(
    name: str, cfg: CLIPConfig, layout: str, tokenizer: Tokenizer, source_dir: str | Path | None = None
) -> str:
    """README.md for an exported model: Hugging Face YAML front matter (library_name, pipeline_tag,
    model-index from vlmkit's evaluations) and sections on usage, training data, evaluation, intended use,
    limitations and bias."""
    from huggingface_hub import ModelCard, ModelCardData

    results = eval_results(source_dir)
    family = "SigLIP" if layout == "siglip" else "CLIP"
    data = ModelCardData(
        library_name="vlmkit",
        pipeline_tag="zero-shot-image-classification",
        tags=["vlmkit", layout, "vision-language", "zero-shot-image-classification"],
        model_name=name,
        eval_results=results or None,
    )
    v, t = cfg.vision, cfg.text
    arch = "\n".join(
        f"| {k} | {val} |"
        for k, val in [
            ("Image size / patch size", f"{v.image_size} / {v.patch_size}"),
            ("Image tower (width, layers, heads)", f"{v.width}, {v.layers}, {v.heads}"),
            ("Text tower (width, layers, heads)", f"{t.width}, {t.layers}, {t.heads}"),
            ("Context length / vocabulary", f"{t.context_length} / {t.vocab_size}"),
            ("Embedding dimension", cfg.embed_dim),
            ("Activation", f"{v.act} (image), {t.act} (text)"),
        ]
    )
    if results:
        rows = [
            f"| {r.dataset_name} | {r.task_name} | {r.metric_name} | {r.metric_value:.4f} |" for r in results
        ]
        evaluation = "| Dataset | Task | Metric | Value |\n|---|---|---|---|\n" + "\n".join(rows)
    else:
        evaluation = "No vlmkit evaluation results (`eval/*.json`) were found for this model."
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
Pad text to the full `max_length`, as above: that is how the model was trained and evaluated."""
    body = f"""# {name}

A {family} image-text dual encoder, exported by vlmkit {vlmkit.__version__} in the Hugging Face transformers
format (`{cls}`, tokenizer, image processor).

| Architecture | |
|---|---|
{arch}

## Usage

{usage}

## Training data

{_training_section(source_dir)}

## Evaluation

{evaluation}

## Intended use

Research, teaching and prototyping: zero-shot image classification, image-text retrieval and image or
text embeddings (search, deduplication, data curation) on data that resembles the training data. Check
accuracy on your own labelled sample before relying on it; the numbers above hold only for the datasets
named there.

## Limitations

- The model recognises only what its training captions describe; on other images and words its scores
  are unreliable, and it does not say when it is outside what it knows.
- Zero-shot accuracy depends on the wording of the labels and prompt templates.
- The tokenizer cuts text after {t.context_length - 2} tokens.
- Small models and small or synthetic training sets give representations far weaker than published
  CLIP/SigLIP models; compare against one before choosing this model.

## Bias, risks and fairness

Image-text models learn the associations in their training pairs, including stereotypes about gender,
age, skin tone, culture and occupation, and they can perform unevenly across groups of people. This
card records no fairness evaluation. Do not use the model to make decisions about people (hiring,
policing, surveillance, credit); before any use on images of people, measure its accuracy separately
for the groups concerned.

## License

No license was recorded at export; add one (`license:` in the front matter) before publishing.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
