"""The user's own data: image-caption manifests (JSONL / CSV / TSV) and ImageFolder class trees.

Bad rows never stop a run on their own: each is skipped, logged as `skipped FILE:LINE: reason`, and
counted; `ImageTextDataset` only refuses the data when too large a fraction of it is bad.

(Over 500 lines: the manifest, ImageFolder and strict JSONL readers share one file decoding and one way of naming
a bad file and line.)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmkit.data.transforms import ImageDecodeError, ImageTransform, check_image_file, load_image
from vlmkit.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
MANIFEST_DELIMITERS = {".jsonl": None, ".json": None, ".csv": ",", ".tsv": "\t"}  # None: JSON lines
CLASSES_FILE = "classes.txt"
_log = logging.getLogger(__name__)
REQUIRED_KEYS = ("image", "caption")


@dataclass
class Sample:
    image: Path  # absolute, or relative to the working directory when the manifest path was
    caption: str
    line: int  # 1-based line of the row in its manifest
    fields: dict[str, str] = field(default_factory=dict)  # the extra columns asked for (read_manifest)


@dataclass
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


# ----------------------------------------------------------------------------------------------
# manifests

_Row = tuple[int, dict | None, str]  # (line, fields, reason why fields is None)


def read_utf8(path: Path) -> str:
    """A user's text file; -sig drops the BOM spreadsheet programs write. DataError for other encodings."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None


def _json_rows(text: str, file: Path) -> Iterator[_Row]:
    if text.lstrip().startswith("["):
        raise DataError(f"{file} holds a JSON array; write one JSON object per line (JSONL)")
    # split on "\n" only: str.splitlines would also split on U+2028 etc., which JSON strings may hold
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            yield n, None, f"malformed JSON ({e.msg} at column {e.colno})"
            continue
        if not isinstance(row, dict):
            yield n, None, 'expected a JSON object like {"image": ..., "caption": ...}'
            continue
        yield n, row, ""


def read_jsonl(path: str | os.PathLike, hint: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file. A missing file, a line that is not JSON or
    not an object is a DataError naming the file and line (`hint`, e.g. how to write the file, follows "not
    found")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" + (f" ({hint})" if hint else ""))
    for n, raw in enumerate(read_utf8(path).split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        yield n, row


def _csv_rows(
    text: str, file: Path, delimiter: str, extra: Sequence[str] = (), required: Sequence[str] = REQUIRED_KEYS
) -> Iterator[_Row]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header, columns = None, {}
    while True:
        start = reader.line_num + 1  # a quoted field may span lines: report where the row starts
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, None, f"malformed row ({e})"
            continue
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip().lower() for c in cells]
            missing = [k for k in required if k not in header]
            if missing:
                raise DataError(
                    f"{file}:{start}: the header needs columns {list(required)}, found {cells}; "
                    f"add a header line such as '{','.join(required)}'"
                )
            columns = {k: header.index(k) for k in (*required, *extra) if k in header}
            continue
        yield start, {k: cells[i] for k, i in columns.items() if i < len(cells)}, ""


def _check_row(row: dict, root: Path, line: int, extra: Sequence[str] = ()) -> Sample | str:
    """A Sample, or the reason the row is bad."""
    for key in (*REQUIRED_KEYS, *extra):
        if row.get(key) is None:
            return f"missing key {key!r}"
    fields = {}
    for key in extra:
        value = row[key]
        if isinstance(value, (dict, list)) or not str(value).strip():
            return f"{key!r} must be a non-empty string or number"
        fields[key] = str(value).strip()
    image, caption = row["image"], row["caption"]
    if not isinstance(image, str) or not image.strip():
        return "'image' must be a non-empty path"
    if not isinstance(caption, str):
        return "'caption' must be a string"
    caption = caption.strip()
    if not caption:
        return "empty caption"
    path = root / Path(image.strip()).expanduser()  # an absolute path replaces root
    try:
        check_image_file(path)
    except ImageDecodeError as e:
        return f"image {path}: {e.reason}"
    return Sample(image=path, caption=caption, line=line, fields=fields)


def read_manifest(path: str | os.PathLike, columns: Sequence[str] = ()) -> tuple[list[Sample], list[BadRow]]:
    """Read an image-caption manifest; returns (good samples, bad rows), both in file order.

    `columns`: further keys every row must have (a label, a sensitive attribute), as strings in
    `Sample.fields`; a row without one is bad.

    Formats, by extension: `.jsonl` / `.json` with one `{"image": ..., "caption": ...}` object per line
    (other keys ignored), `.csv` / `.tsv` with a header naming `image` and `caption` columns. Image paths
    are relative to the manifest's folder unless absolute. Blank lines are ignored. A row is bad when it
    is malformed, lacks a key, has an empty caption, or names a missing or zero-byte image file; images
    are not decoded here (see `check_images`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (expected a .jsonl, .csv or .tsv file)")
    ext = path.suffix.lower()
    if ext not in MANIFEST_DELIMITERS:
        raise DataError(f"{path}: unknown manifest extension {ext!r}; use one of {list(MANIFEST_DELIMITERS)}")
    text = read_utf8(path)
    delimiter = MANIFEST_DELIMITERS[ext]
    rows = _json_rows(text, path) if delimiter is None else _csv_rows(text, path, delimiter, columns)
    root = path.parent
    samples, bad = [], []
    for line, row, reason in rows:
        result = _check_row(row, root, line, columns) if row is not None else reason
        if isinstance(result, Sample):
            samples.append(result)
        else:
            bad.append(BadRow(str(path), line, result))
    return samples, bad


def _try_load(path: Path, keep: bool, max_short_side: int | None = None) -> tuple[Image.Image | None, str]:
    try:
        img = load_image(path)
    except ImageDecodeError as e:
        return None, e.reason
    if keep and max_short_side and min(img.size) > max_short_side:
        # Cache a smaller copy: every epoch then crops and resizes from it instead of the full photo.
        scale = max_short_side / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return (img if keep else None), ""


def check_images(
    samples: list[Sample],
    file: str | os.PathLike,
    keep_images: bool = False,
    num_threads: int = 4,
    max_short_side: int | None = None,
) -> tuple[list[Sample], list[BadRow], list[Image.Image] | None]:
    """Fully decode every image to find truncated or corrupt ones.

    Returns (good samples, bad rows naming `file`, decoded RGB images aligned with the good samples when
    `keep_images`, else None; downscaled so the shorter side is at most `max_short_side` when given).
    An image named by several rows is decoded once and shared. Decoding runs
    on `num_threads` threads (Pillow releases the GIL while decoding).
    """
    unique = list(dict.fromkeys(s.image for s in samples))
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        decoded = dict(zip(unique, pool.map(lambda p: _try_load(p, keep_images, max_short_side), unique)))
    good, bad, images = [], [], []
    for s in samples:
        img, reason = decoded[s.image]
        if reason:
            bad.append(BadRow(str(file), s.line, f"image {s.image}: {reason}"))
            continue
        good.append(s)
        images.append(img)
    return good, bad, (images if keep_images else None)


class ImageTextDataset(torch.utils.data.Dataset):
    """(image tensor, caption) pairs from a manifest, checked up front.

    On construction every row is read and every image decoded once; bad rows are skipped and logged at
    WARNING as `skipped FILE:LINE: reason`. Raises `DataError` when no usable rows remain or when the bad
    fraction exceeds `max_bad_fraction`. With `cache_images` the decoded RGB images stay in memory (meant
    for datasets that fit in RAM), downscaled to `cache_short_side` on their shorter side when given
    (twice the training resolution keeps every detail a random resized crop can use). `columns`: further
    keys every row must have, kept in `samples[i].fields` (group-balanced sampling reads them).

    Augmentation is reproducible across resumes: sample i in epoch e is transformed with
    `np.random.default_rng([seed, e, i])`. Call `set_epoch` before creating each epoch's DataLoader
    iterator (persistent workers keep the copy of the dataset they started with).
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        transform: ImageTransform,
        max_bad_fraction: float = 0.01,
        cache_images: bool = True,
        seed: int = 0,
        log: logging.Logger | None = None,
        cache_short_side: int | None = None,
        columns: Sequence[str] = (),
    ):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be within [0, 1], got {max_bad_fraction}")
        log = log if log is not None else logging.getLogger(__name__)
        self.file = str(manifest)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

        samples, bad = read_manifest(manifest, columns)  # rows without a column in `columns` are bad rows
        self.num_total = len(samples) + len(bad)  # every non-blank row
        samples, bad_images, images = check_images(
            samples, self.file, keep_images=cache_images, max_short_side=cache_short_side
        )
        self.bad_rows = sorted(bad + bad_images, key=lambda b: b.line)
        self.num_bad = len(self.bad_rows)
        for b in self.bad_rows:
            log.warning("skipped %s", b)

        if not samples:
            detail = f"{self.num_bad} bad rows; see the log" if self.num_bad else "the file has no rows"
            raise DataError(f"no usable rows in {self.file} ({detail})")
        fraction = self.num_bad / self.num_total
        if fraction > max_bad_fraction:
            raise DataError(
                f"{self.num_bad} of {self.num_total} rows in {self.file} are bad ({100 * fraction:.1f}%), "
                f"above the limit of {100 * max_bad_fraction:.1f}%; "
                "see the log, fix them or raise --max-bad-fraction"
            )
        if self.num_bad:
            log.info("using %d of %d rows from %s", len(samples), self.num_total, self.file)
        self.samples = samples
        self._images = images
        self.captions = [s.caption for s in samples]
        self.image_paths = [s.image for s in samples]  # repeated paths: several captions per image

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if i < 0:
            i += len(self.samples)
        s = self.samples[i]
        if self._images is not None:
            img = self._images[i]
        else:
            try:
                img = load_image(s.image)
            except ImageDecodeError as e:
                raise DataError(
                    f"{self.file}:{s.line}: {e} (the file changed after it was checked)"
                ) from None
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return self.transform(img, rng), s.caption  # (3, S, S), str


# ----------------------------------------------------------------------------------------------
# ImageFolder


def _name_key(name: str) -> str:
    """How a class-file line is compared with a folder name: case, underscores, hyphens and spaces ignored."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _folder_display_name(folder: str) -> str:
    return folder.replace("_", " ")


def _read_class_names(path: Path, root: Path, folders: list[str], positional: bool) -> tuple[list[str], str]:
    """Class names in `folders` order from a classes file, and how they were matched ("by name", "by
    folder<TAB>name", "by JSON", "positional").

    A plain list of names is matched to the folders by name whenever its lines are the folder names (in any
    order, as ImageNet-style class lists that give label order are written): the order of the file then
    does not matter. A list whose lines are not folder names is used in sorted-folder order only when
    `positional` says so; guessing that order would silently permute the labels.
    """
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise DataError(f'{path}: expected a JSON object {{"folder": "class name", ...}}')
        how = "by JSON"
    else:
        lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if not any("\t" in line for _, line in lines):
            return _match_plain_names(path, root, folders, lines, positional)
        mapping = {}
        for n, line in lines:
            folder, sep, name = line.partition("\t")
            if not sep or not name.strip():
                raise DataError(f"{path}:{n}: expected 'folder<TAB>class name'")
            mapping[folder.strip()] = name.strip()
        how = "by folder<TAB>name"
    unknown = sorted(set(mapping) - set(folders))
    if unknown:
        raise DataError(f"{path} names folder {unknown[0]!r}, which is not a class folder of {root}")
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise DataError(f"{path} gives no name for class folder {missing[0]!r}")
    return [mapping[f] for f in folders], how


def _match_plain_names(
    path: Path, root: Path, folders: list[str], lines: list[tuple[int, str]], positional: bool
) -> tuple[list[str], str]:
    by_key = {_name_key(f): f for f in folders}
    seen: dict[str, int] = {}
    matched = []
    for n, line in lines:
        key = _name_key(line)
        if key in seen:
            raise DataError(f"{path}:{n}: {line!r} is listed twice (first on line {seen[key]})")
        seen[key] = n
        if key in by_key:
            matched.append(by_key[key])
    if len(matched) == len(lines) == len(folders):
        # Every line is a folder name: map by name, whatever the order (the labels follow the folders).
        return [_folder_display_name(f) for f in folders], "by name"
    if matched and not positional:
        for n, line in lines:
            if _name_key(line) not in by_key:
                raise DataError(
                    f"{path}:{n}: {line!r} is not a class folder of {root}, though other lines are; list "
                    "every folder name once, or write 'folder<TAB>class name' lines"
                )
        missing = next(f for f in folders if f not in matched)
        raise DataError(
            f"{path} lists {len(matched)} of the {len(folders)} class folders of {root}; {missing!r} is missing"
        )
    if not positional:
        raise DataError(
            f"{path}: its lines are not the class folder names of {root} (line 1 {lines[0][1]!r}, first folder "
            f"{folders[0]!r}), so which name belongs to which folder is unknown. If they are class names in "
            "sorted-folder order, say so (--positional-classes); else write 'folder<TAB>class name' lines"
        )
    if len(lines) != len(folders):
        raise DataError(
            f"{path} has {len(lines)} class names but {root} has {len(folders)} class folders; "
            "write one name per folder, in sorted folder order"
        )
    return [line for _, line in lines], "positional (sorted folder order, as asked)"


def list_image_files(root: Path) -> list[Path]:
    """Every image file under `root` (recursively, by extension), hidden files and folders left out, sorted."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


def read_image_folder(
    root: str | os.PathLike,
    classes_file: str | os.PathLike | None = None,
    positional_classes: bool = False,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> tuple[list[Path], list[int], list[str]]:
    """List an ImageFolder tree: `root/<class folder>/**/<image>`.

    Returns (image paths, labels, class names); labels index the sorted class folders. Names come from
    `classes_file`, else from `classes.txt` inside root (never from anywhere else), else from the folder
    names with underscores as spaces. A classes file holds `folder<TAB>name` lines, a JSON object
    `{folder: name}`, or one name per line: folder names in any order (matched by name), or other names
    in sorted-folder order, which is accepted only with `positional_classes=True`. Which name went to which
    folder is logged. Files without an image extension (`extensions`: video ones for a video folder) and hidden
    files are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class folders; expected one subfolder of images per class")
    if classes_file is not None:
        classes_path = Path(classes_file)
        if not classes_path.is_file():
            raise DataError(f"classes file not found: {classes_path}")
    else:
        classes_path = root / CLASSES_FILE if (root / CLASSES_FILE).is_file() else None
    if classes_path is not None:
        names, how = _read_class_names(classes_path, root, folders, positional_classes)
        source = f"{classes_path} ({how})"
    else:
        names, source = [_folder_display_name(f) for f in folders], "the folder names"
    shown = ", ".join(f"{f} -> {n!r}" for f, n in zip(folders[:8], names[:8]))
    more = f", ... ({len(folders) - 8} more)" if len(folders) > 8 else ""
    _log.info("%s: %d classes named from %s: %s%s", root, len(folders), source, shown, more)

    paths, labels = [], []
    for label, folder in enumerate(folders):
        for p in sorted((root / folder).rglob("*")):
            if p.suffix.lower() in extensions and not p.name.startswith(".") and p.is_file():
                paths.append(p)
                labels.append(label)
    return paths, labels, names


# ----------------------------------------------------------------------------------------------
# ImageFolder with a metadata file (Hugging Face's imagefolder convention)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def read_folder_metadata(
    root: str | os.PathLike, columns: Sequence[str] = (), label_key: str = "label"
) -> tuple[list[Sample], list[BadRow]]:
    """An ImageFolder whose `metadata.jsonl` / `metadata.csv` (Hugging Face's imagefolder convention) names each
    image by `file_name` (relative to the folder) with further columns, such as a sensitive attribute.

    Each Sample's `fields` hold `columns` and the label: the `label_key` column where the file has one, else
    the image's class subfolder. Its caption is the file's `caption` or `text` column ("" without one). Rows
    missing a column or naming a missing image are bad rows, as in `read_manifest`."""
    root = Path(root)
    meta = next((root / name for name in METADATA_FILES if (root / name).is_file()), None)
    if meta is None:
        raise DataError(
            f"{root} has no {' or '.join(METADATA_FILES)}: an image folder needs one naming each image (file_name) "
            "with its columns"
        )
    text = meta.read_text(encoding="utf-8-sig")
    if meta.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        raw = [(reader.line_num, {k.strip().lower(): v for k, v in row.items() if k}) for row in reader]
    else:
        raw = [(n, row if row is not None else {}) for n, row, _ in _json_rows(text, meta)]
    samples, bad = [], []
    for line, row in raw:
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            bad.append(BadRow(str(meta), line, "missing key 'file_name'"))
            continue
        fields = {k: row[k] for k in columns if row.get(k) not in (None, "")}
        parts = Path(name).parts
        label = row.get(label_key) or (parts[0] if len(parts) > 1 else None)
        missing = [k for k in columns if k not in fields] + ([label_key] if label in (None, "") else [])
        if missing:
            bad.append(BadRow(str(meta), line, f"missing key {missing[0]!r}"))
            continue
        path = root / name.strip()
        try:
            check_image_file(path)
        except ImageDecodeError as e:
            bad.append(BadRow(str(meta), line, f"image {path}: {e.reason}"))
            continue
        fields = {k: str(v).strip() for k, v in fields.items()} | {label_key: str(label).strip()}
        caption = str(row.get("caption") or row.get("text") or "").strip()
        samples.append(Sample(image=path, caption=caption, line=line, fields=fields))
    return samples, bad
