"""Turn every supported input into one stream of `InputRecord`s for the shard writer.

(Over 500 lines: one reader per input format, all producing the same record with the same error rules.)

Inputs: an image-caption manifest (JSONL / CSV / TSV), an image folder (sidecar `.txt` captions or
ImageFolder class names), a Hugging Face `datasets` folder written by `save_to_disk` (read with pyarrow
only), and parquet files with an image column and a text column.

`open_input` returns an `InputSource`: its length is the number of inputs, and `chunk(start, stop)` is a
small picklable description of a slice that reads its records only when iterated, so a worker process
can read its own slice (image bytes never travel through the parent process).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlmkit.data.manifest import (
    IMAGE_EXTENSIONS,
    MANIFEST_DELIMITERS,
    _json_rows,
    list_image_files,
    read_image_folder,
    read_manifest,
)
from vlmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Column names tried, in order, when --text-column / --image-column are not given.
TEXT_COLUMN_NAMES = (
    "caption",
    "text",
    "txt",
    "sentence",
    "title",
    "alt",
    "alt_text",
    "description",
    "prompt",
)
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
IMAGE_PATH_COLUMN_NAMES = ("image", "image_path", "img", "path", "file", "filename", "file_name", "filepath")


@dataclass
class InputRecord:
    """One input: where it came from, its image and caption as read, and extra columns to keep."""

    source: str  # image path, "MANIFEST:LINE" for a bad row, "FILE.parquet:ROW" or "hf:ROW"
    image: str | bytes | None = None  # a file path or encoded bytes; None when the input has none
    caption: str | bytes | None = None  # bytes: not yet decoded (the writer decodes strict UTF-8)
    extra: dict = field(default_factory=dict)
    failure: tuple[str, str] | None = None  # (reason, detail) already known while reading


class InputSource:
    """A sized, sliceable input. `chunk(start, stop)` is picklable and iterates `InputRecord`s."""

    kind = ""

    def __init__(self, description: str, length: int):
        self.description = description
        self._length = length

    def __len__(self) -> int:
        return self._length

    def chunk(self, start: int, stop: int) -> Chunk:
        raise NotImplementedError

    def __iter__(self) -> Iterator[InputRecord]:
        return iter(self.chunk(0, len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, {len(self)} inputs)"


class Chunk:
    """A slice of an input; reading happens in `__iter__` (in whichever process iterates it)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[InputRecord]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# manifests


class _RecordChunk(Chunk):
    def __init__(self, records: list[InputRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[InputRecord]:
        return iter(self.records)


class RecordList(InputSource):
    """Records held in memory (a manifest: paths and captions only, images are read later)."""

    kind = "manifest"

    def __init__(self, description: str, records: list[InputRecord]):
        super().__init__(description, len(records))
        self.records = records

    def chunk(self, start: int, stop: int) -> Chunk:
        return _RecordChunk(self.records[start:stop])


def _bad_row_reason(reason: str) -> str:
    """Map read_manifest's reason text onto the shared failure vocabulary (BadRow carries text only;
    tests/data/test_shard_writer.py pins each mapping, so a rewording there fails a test here)."""
    if reason == "missing key 'caption'":
        return "missing_caption"
    if reason == "empty caption":
        return "empty_caption"
    if reason.startswith("image ") and reason.endswith(": missing file"):
        return "missing_image"
    if reason.startswith("image ") and reason.endswith(": empty file"):
        return "decode_error"
    return "bad_row"


def read_manifest_input(path: str | os.PathLike) -> RecordList:
    """A manifest as records in file order; its bad rows become failure records naming FILE:LINE.

    Keys other than image and caption in a JSONL row (e.g. the synthetic generator's "corruption") are
    kept in `extra`. Captions are as `read_manifest` returns them (stripped).
    """
    path = Path(path)
    samples, bad = read_manifest(path)
    extras: dict[int, dict] = {}
    if MANIFEST_DELIMITERS.get(path.suffix.lower(), ",") is None:  # JSON lines carry extra keys
        text = path.read_text(encoding="utf-8-sig")
        for line, row, _ in _json_rows(text, path):
            if row is not None:
                extras[line] = {k: v for k, v in row.items() if k not in ("image", "caption")}
    lines: list[tuple[int, InputRecord]] = []
    for s in samples:
        rec = InputRecord(source=str(s.image), image=str(s.image), caption=s.caption)
        rec.extra = extras.get(s.line, {})
        lines.append((s.line, rec))
    for b in bad:
        failure = (_bad_row_reason(b.reason), str(b))
        lines.append((b.line, InputRecord(source=f"{b.file}:{b.line}", failure=failure)))
    lines.sort(key=lambda x: x[0])
    return RecordList(str(path), [rec for _, rec in lines])


# ----------------------------------------------------------------------------------------------
# image folders


class _FolderChunk(Chunk):
    def __init__(self, items: list[tuple[str, str | None, str | None, dict]]):
        self.items = items  # (image path, sidecar caption file, class-name caption, extra)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[InputRecord]:
        for image, caption_file, class_name, extra in self.items:
            rec = InputRecord(source=image, image=image, caption=class_name, extra=dict(extra))
            if caption_file is not None:
                try:
                    data = Path(caption_file).read_bytes()
                except FileNotFoundError:
                    rec.failure = (
                        "missing_caption",
                        f"no caption file {Path(caption_file).name} beside the image",
                    )
                except OSError as e:
                    rec.failure = ("missing_caption", f"{caption_file}: unreadable ({e.strerror})")
                else:
                    rec.caption = data.strip()  # a sidecar's trailing newline is not caption text
            yield rec


class ImageFolderInput(InputSource):
    """Images with sidecar captions (`cat.jpg` + `cat.txt`), or an ImageFolder whose captions are the
    class names. `rule` says which: "sidecar" or "class_name"."""

    kind = "image_folder"

    def __init__(self, description: str, items: list, rule: str):
        super().__init__(description, len(items))
        self.items = items
        self.rule = rule

    def chunk(self, start: int, stop: int) -> Chunk:
        return _FolderChunk(self.items[start:stop])


def read_image_folder_input(
    root: str | os.PathLike, classes_file: str | os.PathLike | None = None, positional_classes: bool = False
) -> ImageFolderInput:
    """List an image folder (recursively, sorted). When any image has a sidecar `.txt` of the same stem,
    every image needs one (those without are failures "missing_caption"); otherwise the folder must be an
    ImageFolder (class subfolders) and the caption is the class name (see `read_image_folder`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    images = list_image_files(root)
    if not images:
        raise DataError(f"{root} holds no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    sidecars = [p.with_suffix(".txt") for p in images]
    num_sidecars = sum(s.is_file() for s in sidecars)
    if num_sidecars:
        log.info(
            "%s: captions from sidecar .txt files (%d of %d images have one)", root, num_sidecars, len(images)
        )
        items = [(str(p), str(s), None, {}) for p, s in zip(images, sidecars)]
        return ImageFolderInput(str(root), items, rule="sidecar")
    if any(p.parent == root for p in images):
        raise DataError(
            f"{root} has images but no caption files; put a caption in a .txt file of the same name "
            "beside each image (cat.jpg + cat.txt), or sort the images into class subfolders"
        )
    paths, labels, names = read_image_folder(root, classes_file, positional_classes)
    log.info("%s: no sidecar .txt captions; captions are the class names of %d subfolders", root, len(names))
    items = [
        (str(p), None, names[label], {"label": label, "class_name": names[label]})
        for p, label in zip(paths, labels)
    ]
    return ImageFolderInput(str(root), items, rule="class_name")


# ----------------------------------------------------------------------------------------------
# tables: parquet files and Hugging Face `save_to_disk` folders (Arrow IPC streams)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def _is_extra_type(t: pa.DataType) -> bool:
    return _is_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _pick(candidates: list[str], preferred: tuple[str, ...]) -> str | None:
    """The only candidate, else the one whose name is the first preferred name present, else None."""
    if len(candidates) == 1:
        return candidates[0]
    lower = {c.lower(): c for c in candidates}
    for name in preferred:
        if name in lower:
            return lower[name]
    return None


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def _choose_columns(
    schema: pa.Schema,
    where: str,
    image_column: str | None,
    text_column: str | None,
    image_features: tuple[str, ...] = (),
) -> tuple[str, str, str]:
    """(image column, its kind "struct" / "binary" / "path", text column); ConfigError when unclear."""
    names = schema.names
    for flag, col in (("--image-column", image_column), ("--text-column", text_column)):
        if col is not None and col not in names:
            raise ConfigError(f"{where} has no column {col!r} ({flag}); its columns: {_describe(schema)}")

    if image_column is None:
        others = [n for n in names if n != text_column]
        levels = [
            [n for n in others if n in image_features],
            [n for n in others if _is_image_struct(schema.field(n).type)],
            [n for n in others if _is_binary(schema.field(n).type)],
        ]
        for level in levels:
            if level:
                image_column = _pick(level, IMAGE_COLUMN_NAMES)
                if image_column is None:
                    raise ConfigError(
                        f"{where}: several columns could hold the image ({', '.join(level)}); "
                        f"pick one with --image-column (columns: {_describe(schema)})"
                    )
                break
        else:
            paths = [n for n in others if _is_string(schema.field(n).type)]
            image_column = _pick(
                [n for n in paths if n.lower() in IMAGE_PATH_COLUMN_NAMES], IMAGE_PATH_COLUMN_NAMES
            )
            if image_column is None:
                raise ConfigError(
                    f"{where}: no image column found; name it with --image-column (columns: {_describe(schema)})"
                )
    t = schema.field(image_column).type
    if _is_image_struct(t):
        image_kind = "struct"
    elif _is_binary(t):
        image_kind = "binary"
    elif _is_string(t):
        image_kind = "path"
    else:
        raise ConfigError(
            f"{where}: image column {image_column!r} has type {t}; expected encoded image bytes, a "
            "struct{bytes, path} (Hugging Face Image) or a file path string"
        )

    if text_column is None:
        texts = [
            n
            for n in names
            if n != image_column and (_is_string(schema.field(n).type) or _is_binary(schema.field(n).type))
        ]
        lower = {n.lower(): n for n in texts}
        text_column = next((lower[k] for k in TEXT_COLUMN_NAMES if k in lower), None)
        strings = [n for n in texts if _is_string(schema.field(n).type)]
        if text_column is None and len(strings) == 1:
            text_column = strings[0]
        if text_column is None:
            raise ConfigError(
                f"{where}: cannot tell which column holds the caption; name it with --text-column "
                f"(columns: {_describe(schema)})"
            )
    t = schema.field(text_column).type
    if not (_is_string(t) or _is_binary(t)):
        raise ConfigError(f"{where}: text column {text_column!r} has type {t}; expected a string column")
    if text_column == image_column:
        raise ConfigError(f"{where}: the image and text columns are both {text_column!r}")
    return image_column, image_kind, text_column


def _read_ipc(path: str) -> pa.Table:
    # Memory-mapped: reading the table copies nothing; only the rows a chunk converts are touched.
    try:
        with pa.ipc.open_stream(pa.memory_map(path, "r")) as reader:
            return reader.read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow stream file ({e}); re-save the dataset") from None


def _ipc_schema(path: str) -> pa.Schema:
    return _read_ipc(path).schema


@dataclass(frozen=True)
class TableSpec:
    """Which files and columns a table input reads (small and picklable)."""

    kind: str  # "parquet" or "hf_dataset" (Arrow IPC stream files)
    files: tuple[str, ...]
    counts: tuple[int, ...]  # rows per file
    root: str  # folder that relative image paths start from
    image_column: str
    image_kind: str  # "struct" ({bytes, path}), "binary" or "path"
    text_column: str
    extra_columns: tuple[str, ...]  # scalar columns kept in each record's `extra`


class _TableChunk(Chunk):
    """Rows [start, stop) of a list of files; the files are opened when iterated."""

    def __init__(self, spec: TableSpec, segments: list[tuple[int, int, int]]):
        self.spec = spec
        self.segments = segments  # (file index, first row, stop row) within that file

    def __len__(self) -> int:
        return sum(b - a for _, a, b in self.segments)

    def __iter__(self) -> Iterator[InputRecord]:
        s = self.spec
        columns = [s.image_column, s.text_column, *s.extra_columns]
        for file_index, a, b in self.segments:
            path = s.files[file_index]
            table = _read_rows(path, s.kind, columns, a, b)
            images = table.column(s.image_column).to_pylist()
            texts = table.column(s.text_column).to_pylist()
            extras = {c: table.column(c).to_pylist() for c in s.extra_columns}
            offset = sum(s.counts[:file_index])
            for i, (image, text) in enumerate(zip(images, texts)):
                source = f"hf:{offset + a + i}" if s.kind == "hf_dataset" else f"{path}:{a + i}"
                if s.image_kind == "struct":
                    image = image and (image.get("bytes") or image.get("path"))
                if isinstance(image, str):  # a path: relative to the input's folder unless absolute
                    image = str(Path(s.root) / image) if image else None
                extra = {c: _json_value(v[i]) for c, v in extras.items()}
                yield InputRecord(source=source, image=image, caption=text, extra=extra)


def _json_value(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _read_rows(path: str, kind: str, columns: list[str], a: int, b: int) -> pa.Table:
    if kind == "hf_dataset":
        return _read_ipc(path).select(columns).slice(a, b - a)
    f = pq.ParquetFile(path)
    # Read only the row groups that hold rows [a, b). (A file written as one huge row group is read
    # whole by every chunk; writers of image parquet, `datasets` included, use small row groups.)
    groups, first, row = [], None, 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if row < b and row + n > a:
            groups.append(g)
            first = row if first is None else first
        row += n
    if not groups:
        return f.schema_arrow.empty_table().select(columns)
    return f.read_row_groups(groups, columns=columns).slice(a - first, b - a)


class TableInput(InputSource):
    """Rows of parquet files or of a Hugging Face dataset's Arrow files, read with pyarrow."""

    def __init__(self, description: str, spec: TableSpec):
        super().__init__(description, sum(spec.counts))
        self.spec = spec
        self.kind = spec.kind

    def chunk(self, start: int, stop: int) -> Chunk:
        segments, offset = [], 0
        for i, n in enumerate(self.spec.counts):
            a, b = max(start - offset, 0), min(stop - offset, n)
            if a < b:
                segments.append((i, a, b))
            offset += n
        return _TableChunk(self.spec, segments)


def _extra_columns(schema: pa.Schema, image_column: str, text_column: str) -> list[str]:
    return [f.name for f in schema if f.name not in (image_column, text_column) and _is_extra_type(f.type)]


def read_parquet_input(
    path: str | os.PathLike, image_column: str | None = None, text_column: str | None = None
) -> TableInput:
    """A parquet file, or a folder of `*.parquet` files (sorted), as one table.

    The image column holds encoded bytes, a struct{bytes, path} or a path (relative to the file's
    folder); the text column strings (or bytes, decoded strictly later). Columns are detected when not
    given (see `TEXT_COLUMN_NAMES`); other scalar columns are kept as `extra`.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DataError(f"{path} holds no .parquet files")
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise DataError(f"parquet input not found: {path}")
    metas = []
    for f in files:
        try:
            metas.append(pq.ParquetFile(f))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
    schema = metas[0].schema_arrow
    image_column, image_kind, text_column = _choose_columns(schema, str(files[0]), image_column, text_column)
    for f, m in zip(files[1:], metas[1:]):
        other = m.schema_arrow
        for col in (image_column, text_column):
            if col not in other.names or other.field(col).type != schema.field(col).type:
                raise DataError(
                    f"{f}: column {col!r} is missing or has another type than in {files[0]}; "
                    "all parquet files of one input need the same columns"
                )
    extra = [
        c
        for c in _extra_columns(schema, image_column, text_column)
        if all(c in m.schema_arrow.names for m in metas)
    ]
    log.info("%s: image column %r (%s), text column %r", path, image_column, image_kind, text_column)
    spec = TableSpec(
        "parquet",
        tuple(str(f) for f in files),
        tuple(m.metadata.num_rows for m in metas),
        str(root),
        image_column,
        image_kind,
        text_column,
        tuple(extra),
    )
    return TableInput(str(path), spec)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg}); is this a save_to_disk folder?"
        ) from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def is_hf_dataset_folder(path: str | os.PathLike) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def read_hf_dataset(
    path: str | os.PathLike,
    split: str = "train",
    image_column: str | None = None,
    text_column: str | None = None,
) -> TableInput:
    """A Hugging Face `save_to_disk` folder (a Dataset, or a DatasetDict from which `split` is taken),
    read from its Arrow IPC stream files with pyarrow. An `Image()` feature, a binary column or a path
    string column can hold the image; `state.json` lists the files, `dataset_info.json` the features.
    """
    path = Path(path)
    description = str(path)
    if (path / "dataset_dict.json").is_file():
        splits = _load_json(path / "dataset_dict.json").get("splits", [])
        if split not in splits:
            raise ConfigError(
                f"{path} has no split {split!r}; its splits: {splits} (choose one with --split)"
            )
        path = path / split
        description = f"{description} (split {split})"
    state_file = path / "state.json"
    if not state_file.is_file():
        raise DataError(f"{path} has no state.json; expected a folder written by Dataset.save_to_disk")
    state = _load_json(state_file)
    if state.get("_indices_data_files"):
        raise DataError(f"{path} stores an indices mapping; re-save it after dataset.flatten_indices()")
    names = [d.get("filename") for d in state.get("_data_files", []) if isinstance(d, dict)]
    files = [path / n for n in names if n] or sorted(path.glob("data-*.arrow"))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise DataError(f"{path}: data file {missing[0] if missing else 'data-*.arrow'} not found")
    tables = [_read_ipc(str(f)) for f in files]
    info_file = path / "dataset_info.json"
    features = _load_json(info_file).get("features", {}) if info_file.is_file() else {}
    image_features = tuple(
        k for k, v in (features or {}).items() if isinstance(v, dict) and v.get("_type") == "Image"
    )
    schema = tables[0].schema
    image_column, image_kind, text_column = _choose_columns(
        schema, description, image_column, text_column, image_features
    )
    log.info("%s: image column %r (%s), text column %r", description, image_column, image_kind, text_column)
    spec = TableSpec(
        "hf_dataset",
        tuple(str(f) for f in files),
        tuple(t.num_rows for t in tables),
        str(path),
        image_column,
        image_kind,
        text_column,
        tuple(_extra_columns(schema, image_column, text_column)),
    )
    return TableInput(description, spec)


# ----------------------------------------------------------------------------------------------


def open_input(
    path: str | os.PathLike,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    split: str = "train",
    classes_file: str | os.PathLike | None = None,
    positional_classes: bool = False,
) -> InputSource:
    """Open any supported input by what `path` is: a manifest file (.jsonl/.json/.csv/.tsv), a .parquet
    file, a `save_to_disk` folder, a folder of .parquet files, or an image folder."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"input not found: {p}")
    table_kind = p.suffix.lower() == ".parquet" or (
        p.is_dir() and (is_hf_dataset_folder(p) or any(p.glob("*.parquet")))
    )
    if not table_kind and (image_column is not None or text_column is not None):
        raise ConfigError(
            "--image-column / --text-column apply to parquet and Hugging Face dataset inputs only; "
            f"{p} is a {'folder of images' if p.is_dir() else 'manifest'}"
        )
    if p.is_file():
        if p.suffix.lower() == ".parquet":
            return read_parquet_input(p, image_column, text_column)
        if p.suffix.lower() in MANIFEST_DELIMITERS:
            return read_manifest_input(p)
        raise DataError(
            f"{p}: unknown input file type {p.suffix!r}; pass a manifest (.jsonl, .csv, .tsv), a .parquet "
            "file, an image folder or a Hugging Face save_to_disk folder"
        )
    if is_hf_dataset_folder(p):
        return read_hf_dataset(p, split, image_column, text_column)
    if any(p.glob("*.parquet")):
        return read_parquet_input(p, image_column, text_column)
    return read_image_folder_input(p, classes_file, positional_classes)
