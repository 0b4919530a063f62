"""The OpenAI API's request and error shapes: parsing a request body into vlmkit's terms, one clear error each.

Every user mistake is an `APIError` (HTTP status, message, type, param, code) that the server returns as
`{"error": {"message", "type", "param", "code"}}`, the shape the `openai` package turns into its exception
types (400 BadRequestError, 404 NotFoundError, 413/429/500 APIStatusError and its subclasses).

Images arrive as content parts `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (or
the URL as a bare string). Remote http(s) URLs are refused (the server has no network), local paths and
`file://` URLs are read only under the folders the server was started with, and a picture larger than
`max_pixels` is refused before it is decoded (a decompression bomb: a few KB of PNG can hold gigapixels).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MAX_IMAGE_BYTES = 20 * 2**20  # per image, after base64 decoding
MAX_PIXELS = 4096 * 4096


class APIError(Exception):
    """An error the server answers in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}  # fmt: skip


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# -------------------------------------------------------------------- images
def decode_image(url, param: str, roots: list[Path], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image from a data URL (base64), or a local path / file:// URL under one of `roots`."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise bad("image_url must be {'url': 'data:image/...;base64,...'} or that URL as a string", param)
    if url.startswith(("http://", "https://")):
        raise bad("remote image URLs are not fetched (this server has no network access); send the image "
                  "inline as a data URL: data:image/png;base64,...", param, "invalid_image_url")  # fmt: skip
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise bad("a data URL must be data:<mime type>;base64,<data>", param, "invalid_image_url")
        if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
            raise APIError(413, f"the image is over {MAX_IMAGE_BYTES // 2**20} MB", param, "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad("the image's base64 data is not valid base64", param, "invalid_base64") from None
        source, name = io.BytesIO(data), "the image"
    else:
        path = Path(url.removeprefix("file://")).expanduser()
        if not any(_inside(path, root) for root in roots):
            allowed = ", ".join(str(r) for r in roots) or "none: start the server with --image-root DIR"
            raise bad(f"{url}: the server reads local images only under its image folders ({allowed})", param,
                      "image_path_not_allowed")  # fmt: skip
        if not path.is_file():
            raise bad(f"{url}: no such image file", param, "invalid_image_url")
        source, name = path, str(url)
    return _open(source, name, param, max_pixels)


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _open(source, name: str, param: str, max_pixels: int) -> Image.Image:
    try:
        with Image.open(source) as im:
            w, h = im.size  # from the header, before any pixel is decoded
            if w * h > max_pixels:
                raise APIError(413, f"{name} is {w}x{h} pixels, more than the {max_pixels} allowed (a "
                               "decompression bomb?); send a smaller image", param, "image_too_large")  # fmt: skip
            return im.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, f"{name} is too large to decode safely", param, "image_too_large") from None
    except Exception as e:  # UnidentifiedImageError, truncated data, ...
        raise bad(
            f"{name} is not an image Pillow can read ({type(e).__name__})", param, "invalid_image"
        ) from None


# -------------------------------------------------------------------- chat
@dataclass
class ChatRequest:
    model: str
    conversation: list[dict]  # vlmkit turns ({"from", "value"}), "<image>" where each image goes
    images: list  # PIL images (or data still to decode: see `parse_chat`), in order
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False


_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def parse_chat(body: dict) -> ChatRequest:
    """Validate a /v1/chat/completions body. Images are left as their `image_url` values (decoded later, off
    the event loop, by `decode_image`) with their param paths: `images` holds (url, param) pairs."""
    _object(body)
    model = _string(body, "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    conversation, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise bad(f"{where}.role must be one of system, user, assistant", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            text = _no_marker(content, f"{where}.content")
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                p = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(_no_marker(part["text"], f"{p}.text"))
                elif kind == "image_url":
                    if m["role"] != "user":
                        raise bad(f"{p}: images go in user messages", p)
                    images.append((part.get("image_url"), f"{p}.image_url"))
                    parts.append("<image>\n")
                else:
                    raise bad(f"{p} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', "
                              "'image_url': {'url': ...}}", p)  # fmt: skip
            text = "".join(parts)
        else:
            raise bad(f"{where}.content must be a string or a list of content parts", f"{where}.content")
        conversation.append({"from": _ROLES[m["role"]], "value": text})
    if conversation[-1]["from"] != "human":
        raise bad("the last message must be the user's", "messages")
    if sum(c["from"] == "system" for c in conversation) > (conversation[0]["from"] == "system"):
        raise bad("a system message may only come first", "messages")
    n = body.get("n", 1)
    if n != 1:
        raise bad("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise bad("max_tokens must be an integer >= 1", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must be in (0, 1]", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad("seed must be an integer", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be true or false", "ignore_eos")
    return ChatRequest(model, conversation, images, max_tokens, temperature, top_p, seed, stop, stream,
                       bool(options.get("include_usage", False)), ignore_eos)  # fmt: skip


# -------------------------------------------------------------------- embeddings, search, classify
def parse_embedding_inputs(body: dict) -> tuple[str, list[tuple[str, object]], str]:
    """(model, [("text", str) | ("image", (url, param))], encoding_format) of a /v1/embeddings body. An input
    is a string, a list of strings, or items `{"content": [{"type": "image_url", ...}]}` (llama.cpp)."""
    _object(body)
    model = _string(body, "model")
    raw = body.get("input")
    items = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(items, list) or not items:
        raise bad(
            "input must be a string, a list of strings, or a list of {'content': [content parts]}", "input"
        )
    out = []
    for i, item in enumerate(items):
        p = f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise bad(f"{p} is empty", p)
            out.append(("text", item))
        elif isinstance(item, dict) and isinstance(item.get("content"), list) and len(item["content"]) == 1:
            part = item["content"][0]
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                out.append(("image", (part.get("image_url"), f"{p}.content[0].image_url")))
            elif kind == "text" and isinstance(part.get("text"), str) and part["text"]:
                out.append(("text", part["text"]))
            else:
                raise bad(f"{p}.content[0] must be a text or image_url part", f"{p}.content[0]")
        else:
            raise bad(f"{p} must be a string or {{'content': [one text or image_url part]}} (token arrays are "
                      "not accepted)", p)  # fmt: skip
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad("encoding_format must be 'float' or 'base64'", "encoding_format")
    return model, out, fmt


def _no_marker(text: str, param: str) -> str:
    if "<image>" in text or "<video>" in text:
        raise bad(
            f"{param}: '<image>' and '<video>' are reserved; send images as image_url content parts", param
        )
    return text


def _object(body) -> None:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")


def _string(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise bad(f"{key} is required (a string)", key)
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise bad(f"{key} must be a number in [{lo:g}, {hi:g}]", key)
    return float(value)
