"""Zero-shot image-text retrieval: recall@k in both directions over a captioned image set.

An image may have several captions (COCO has five). Text-to-image is a hit when the caption's own
image is in the top k; image-to-text is a hit when ANY of the image's captions is. Key names follow
CLIP_benchmark: "image_retrieval_recall@k" is text->image, "text_retrieval_recall@k" image->text.
"""

import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmkit.data.manifest import read_manifest
from vlmkit.data.shards import expand_shards, fetch_images, is_shard_spec
from vlmkit.data.transforms import ImageTransform, PreprocessConfig, load_image
from vlmkit.errors import ConfigError
from vlmkit.eval.features import (
    extract_image_features,
    extract_shard_features,
    extract_text_features,
    result_dict,
)
from vlmkit.eval.report import new_figure, save_figure, show_image

IMAGE_SKIPS = ("decode_error", "decompression_bomb")  # shard skips counted as num_skipped (images)

NUM_EXAMPLES = 4  # caption queries in retrieval_examples.png
CHUNK_SIZE = 1024  # queries per similarity block, so a (25k x 5k) matrix is never held at once


def _topk_indices(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (Nq, k) of the k keys most similar to each query, best first."""
    return torch.cat(
        [
            (queries[start : start + CHUNK_SIZE] @ keys.T).topk(k, dim=1).indices  # (chunk, k)
            for start in range(0, len(queries), CHUNK_SIZE)
        ]
    )


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """Recall@k for text->image and image->text retrieval.

    image_features (Ni, D) and text_features (Nt, D) need not be normalised; text_to_image (Nt,) is the
    index of each caption's image. Images without a caption are distractors for text->image and are
    not used as image->text queries. k larger than the gallery counts as the whole gallery.
    """
    image_features = F.normalize(image_features.float(), dim=-1)  # (Ni, D)
    text_features = F.normalize(text_features.float(), dim=-1)  # (Nt, D)
    text_to_image = text_to_image.long().to(image_features.device)  # (Nt,)
    num_images, num_texts = len(image_features), len(text_features)
    valid_shape = num_texts > 0 and text_to_image.shape == (num_texts,)
    if not valid_shape or text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(
            f"text_to_image must hold one image index in [0, {num_images}) per caption ({num_texts})"
        )
    max_k = max(ks)

    top_images = _topk_indices(text_features, image_features, min(max_k, num_images))  # (Nt, k)
    top_texts = _topk_indices(image_features, text_features, min(max_k, num_texts))  # (Ni, k)
    return recalls(top_images, top_texts, text_to_image, ks)


def recalls(
    top_images: torch.Tensor, top_texts: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int]
) -> dict:
    """Recall@k from ranked candidates: top_images (Nt, k) per caption and top_texts (Ni, k) per image, best
    first; images without a caption are not queries."""
    num_images = len(top_texts)
    t2i_hits = top_images == text_to_image[:, None]  # (Nt, k)
    image_ids = torch.arange(num_images, device=top_texts.device)  # (Ni,)
    i2t_hits = text_to_image[top_texts] == image_ids[:, None]  # (Ni, k)
    i2t_hits = i2t_hits[torch.bincount(text_to_image, minlength=num_images) > 0]  # (Ni_captioned, k)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = t2i_hits[:, :k].any(dim=1).double().mean().item()
    for k in ks:
        metrics[f"text_retrieval_recall@{k}"] = i2t_hits[:, :k].any(dim=1).double().mean().item()
    return metrics


@torch.no_grad()
def itm_rerank_metrics(
    model: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    text_to_image: torch.Tensor,
    k: int = 16,
    ks: Sequence[int] = (1, 5, 10),
    device: str | torch.device = "cpu",
    bf16: bool = False,
    batch_size: int = 256,
) -> dict:
    """Retrieval of a fusion model reranked by ITM, as BLIP: each query's k best candidates by ITC are
    scored again by the ITM head's match logit plus their ITC cosine; the rest keep their ITC order after
    them. images (Ni, 3, S, S) transformed, tokens (Nt, T); the image tokens of the whole gallery are held in
    memory. Returns the recalls under "itm_*" and the ITC ones under their usual names."""
    from vlmkit.eval.features import _autocast, eval_mode

    if not hasattr(model, "itm_logits"):
        raise ConfigError("ITM reranking needs a model with an ITM head (a fusion model)")
    device = torch.device(device)
    text_to_image = text_to_image.long()
    with eval_mode(model), _autocast(device, bf16):
        image_tokens = torch.cat(
            [model.encode_image_tokens(images[i : i + 64].to(device)) for i in range(0, len(images), 64)]
        )
        image_f = torch.cat(
            [model.image_embedding(image_tokens[i : i + 256]) for i in range(0, len(image_tokens), 256)]
        )
        text_f = torch.cat(
            [model.encode_text(tokens[i : i + 256].to(device)) for i in range(0, len(tokens), 256)]
        )
        sim = image_f.float() @ text_f.float().T  # (Ni, Nt) cosine

        def rerank(cand: torch.Tensor, image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
            """ITM match logit + cosine of (image_rows[i], text_rows[i]) pairs, in batches."""
            out = []
            for i in range(0, len(image_rows), batch_size):
                im, tx = image_rows[i : i + batch_size], text_rows[i : i + batch_size]
                logits = model.itm_logits(tokens[tx].to(device), image_tokens[im])
                out.append(logits[:, 1].float() + sim[im, tx])
            return torch.cat(out).view(cand.shape)

        kk = min(k, sim.shape[1])
        cand_t = sim.topk(kk, dim=1).indices  # (Ni, k) texts per image
        score_t = rerank(cand_t, torch.arange(len(sim)).repeat_interleave(kk), cand_t.reshape(-1))
        rest = sim.topk(
            min(max(ks) + kk, sim.shape[1]), dim=1
        ).indices  # the ITC order after the reranked head
        top_texts = torch.cat([cand_t.gather(1, score_t.argsort(dim=1, descending=True)), rest], dim=1)
        kk = min(k, sim.shape[0])
        cand_i = sim.T.topk(kk, dim=1).indices  # (Nt, k) images per text
        score_i = rerank(cand_i, cand_i.reshape(-1), torch.arange(sim.shape[1]).repeat_interleave(kk))
        rest = sim.T.topk(min(max(ks) + kk, sim.shape[0]), dim=1).indices
        top_images = torch.cat([cand_i.gather(1, score_i.argsort(dim=1, descending=True)), rest], dim=1)
    max_k = max(ks)
    reranked = recalls(_dedup(top_images, max_k), _dedup(top_texts, max_k), text_to_image, ks)
    itc = recalls(
        sim.T.topk(min(max_k, sim.shape[0]), dim=1).indices,
        sim.topk(min(max_k, sim.shape[1]), dim=1).indices,
        text_to_image,
        ks,
    )
    return {**itc, **{f"itm_{name}": value for name, value in reranked.items()}, "itm_rerank_k": k}


def _dedup(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """The first k distinct entries of each row (the reranked head, then the ITC order without repeats)."""
    rows = []
    for row in ranked.tolist():
        seen = list(dict.fromkeys(row))[:k]
        rows.append(seen)
    return torch.tensor(rows, dtype=torch.long)


def evaluate_retrieval(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    preprocess_cfg: PreprocessConfig,
    data: str | Path,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    model_name: str = "",
    out_dir: str | Path | None = None,
    bf16: bool = False,
    num_workers: int = 0,
    rerank: int = 0,
) -> dict:
    """Retrieval over a caption manifest or shards (see `vlmkit.data.shards.expand_shards`).

    In a manifest, rows sharing an image path are one image with several captions; in shards, samples
    sharing a "source" in their metadata are. `model` must already be on `device`. Captions of
    undecodable images are dropped (`num_skipped` counts those images; `num_bad_rows` the rows or
    samples skipped for other reasons). With `out_dir`, also writes retrieval_examples.png. Returns a
    CLIP_benchmark-style result.

    `rerank` k > 0 (fusion models, manifests): also each query's k best ITC candidates reranked by ITM, as
    BLIP does (`itm_rerank_metrics`), under "itm_*" names beside the ITC recalls.
    """
    if rerank < 0:
        raise ConfigError(f"--rerank must be a number of candidates >= 1 (0: no reranking), not {rerank}")
    if rerank:
        if not hasattr(model, "itm_logits"):
            raise ConfigError(
                f"--rerank needs a model with an ITM head (a fusion model); {type(model).__name__} has none: "
                "drop --rerank for ITC/cosine retrieval"
            )
        if is_shard_spec(data):
            raise ConfigError(
                "--rerank reads its images from a manifest, not shards: pass a JSONL/CSV manifest"
            )
    transform = ImageTransform(preprocess_cfg, train=False)
    if is_shard_spec(data):
        urls = expand_shards(data)
        shards = extract_shard_features(model, urls, transform, batch_size, device, bf16, num_workers)
        first_row: dict[str, int] = {}  # group -> the row of its first caption, which gives its image
        for row, group in enumerate(shards.groups):
            first_row.setdefault(group, row)
        image_index = {group: i for i, group in enumerate(first_row)}
        image_features = shards.features[list(first_row.values())]  # (Ni, D)
        captions = shards.captions
        text_to_image = torch.tensor([image_index[g] for g in shards.groups], dtype=torch.long)  # (Nt,)
        image_names = [shards.names[row] for row in first_row.values()]
        num_skipped = sum(shards.skipped.get(r, 0) for r in IMAGE_SKIPS)
        num_bad_rows = sum(shards.skipped.values()) - num_skipped
        dataset = Path(urls[0]).parent.name
    else:
        samples, bad_rows = read_manifest(data)
        path_index: dict[Path, int] = {}  # image path -> its index, in first-seen order
        captions, caption_image = [], []
        for sample in samples:
            captions.append(sample.caption)
            caption_image.append(path_index.setdefault(Path(sample.image), len(path_index)))
        paths = list(path_index)
        images = extract_image_features(model, paths, transform, batch_size, device, bf16, num_workers)
        row_of = {image: row for row, image in enumerate(images.kept)}  # input index -> feature row
        keep = [j for j, image in enumerate(caption_image) if image in row_of]
        captions = [captions[j] for j in keep]
        text_to_image = torch.tensor([row_of[caption_image[j]] for j in keep], dtype=torch.long)  # (Nt,)
        image_features = images.features
        image_paths = [paths[i] for i in images.kept]
        num_skipped, num_bad_rows = len(images.skipped), len(bad_rows)
        dataset = Path(data).stem
    text_features = extract_text_features(model, tokenizer, captions, device=device, bf16=bf16)  # (Nt, D)

    metrics = retrieval_metrics(image_features, text_features, text_to_image)
    if rerank:  # the kept images again, as pixels: ITM reads their tokens, not the pooled features
        pixels = torch.stack([transform(load_image(p)) for p in image_paths])
        reranked = itm_rerank_metrics(
            model, pixels, tokenizer(captions), text_to_image, k=rerank, device=device, bf16=bf16
        )
        metrics.update({k: v for k, v in reranked.items() if k.startswith("itm_")})
    metrics.update(
        num_images=len(image_features),
        num_captions=len(captions),
        num_skipped=num_skipped,
        num_bad_rows=num_bad_rows,
    )
    if out_dir is not None:
        plot = Path(out_dir) / "retrieval_examples.png"
        if is_shard_spec(data):
            with tempfile.TemporaryDirectory() as tmp:
                paths = _ShardImageFiles(image_names, Path(tmp))
                plot_retrieval_examples(captions, text_features, text_to_image, paths, image_features, plot)
        else:
            plot_retrieval_examples(captions, text_features, text_to_image, image_paths, image_features, plot)
    return result_dict("zeroshot_retrieval", dataset, model_name, metrics)


class _ShardImageFiles(Sequence):
    """Image i of a shard gallery as a file, fetched from its shard when first asked for (the plot
    shows a dozen images of a gallery that may hold thousands)."""

    def __init__(self, names: list[tuple[str, str]], folder: Path):
        self.names, self.folder = names, folder
        self.files: dict[int, Path] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        if i not in self.files:
            shard, key = self.names[i]
            ext, data = fetch_images(shard, {key})[key]
            self.files[i] = self.folder / f"{i}.{ext}"
            self.files[i].write_bytes(data)
        return self.files[i]


def plot_retrieval_examples(
    captions: Sequence[str],
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    image_paths: Sequence[Path],
    image_features: torch.Tensor,
    path: str | Path,
    num_examples: int = NUM_EXAMPLES,
) -> Path:
    """A row per caption query (spread over the set): the caption, then its top-3 images, framed green
    when the image is the caption's own and red otherwise."""
    picks = torch.linspace(0, len(captions) - 1, min(num_examples, len(captions))).round().long().unique()
    queries = F.normalize(text_features[picks].float(), dim=-1)  # (n, D)
    gallery = F.normalize(image_features.float(), dim=-1)  # (Ni, D)
    top = (queries @ gallery.T).topk(min(3, len(gallery)), dim=1)  # (n, k)
    cols = 1 + top.indices.shape[1]
    fig = new_figure(2.6 * cols + 1.0, 2.6 * len(picks))
    grid = fig.add_gridspec(len(picks), cols, width_ratios=[1.2] + [1] * (cols - 1))
    for row, q in enumerate(picks.tolist()):
        ax = fig.add_subplot(grid[row, 0])
        ax.axis("off")
        ax.text(0, 0.5, textwrap.fill(captions[q], 28), va="center", ha="left", fontsize=9, wrap=True)
        for col, (image, score) in enumerate(zip(top.indices[row].tolist(), top.values[row].tolist())):
            ax = fig.add_subplot(grid[row, col + 1])
            color = "tab:green" if image == text_to_image[q].item() else "tab:red"
            show_image(ax, image_paths[image], border=color)
            ax.set_title(f"{col + 1}. ({score:.2f})", fontsize=8, color=color)
    return save_figure(fig, path)
