"""A tiny LLaVA, a tiny CLIP and an image index written to disk, and `vlmkit serve`'s app running on a free
localhost port in a background thread (uvicorn), shared by the server and browser tests."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

TEXTS = ["USER: what colour is the circle? ASSISTANT: red", "USER: is it big? ASSISTANT: yes it is",
         "a blue square on the left and a green star", "a photo of a red circle.", "a photo of a blue square."] * 20  # fmt: skip


@pytest.fixture(scope="session")
def served_dirs(tmp_path_factory):
    from vlmkit.data.chat import IMAGE_TOKEN
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained
    from vlmkit.models.registry import create_model

    root = tmp_path_factory.mktemp("served")
    tok = Tokenizer.train(TEXTS, vocab_size=300, context_length=32, extra_special_tokens=[IMAGE_TOKEN])
    torch.manual_seed(0)
    small = {"vision.image_size": 32, "vision.layers": 1, "vision.width": 32, "vision.heads": 2, "decoder.width": 64,
             "decoder.layers": 2, "decoder.heads": 2, "decoder.vocab_size": tok.vocab_size,
             "image_token_id": tok.token_to_id(IMAGE_TOKEN), "chat_template": "user_assistant",
             "decoder.max_seq_len": 96}  # fmt: skip
    llava = save_pretrained(
        create_model("llava-tiny", **small), root / "llava", tok, PreprocessConfig(image_size=32)
    )
    clip_cfg = {"vision.image_size": 32, "vision.layers": 1, "vision.width": 32, "vision.heads": 2,
                "text.layers": 1, "text.width": 32, "text.heads": 2, "text.vocab_size": tok.vocab_size,
                "text.context_length": 32, "embed_dim": 16}  # fmt: skip
    clip = save_pretrained(
        create_model("clip-tiny", **clip_cfg), root / "clip", tok, PreprocessConfig(image_size=32)
    )
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = images / "sub" if i % 3 == 0 else images
        Image.fromarray(rng.integers(0, 255, (24 + i, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (images / "broken.png").write_bytes(b"not a png")
    return {"llava": llava, "clip": clip, "images": images, "root": root}


@pytest.fixture(scope="session")
def index_dir(served_dirs):
    from vlmkit.convert import load_pretrained
    from vlmkit.inference.index import build_index

    pt = load_pretrained(served_dirs["clip"])
    out = served_dirs["root"] / "index"
    build_index(pt.model, pt.preprocess, served_dirs["images"], out, model_path=str(served_dirs["clip"]),
                progress=False)  # fmt: skip
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn running `app` in a thread until `stop()`."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def server(served_dirs, index_dir):
    from vlmkit.serve.app import create_app, load_served

    models = [load_served(str(served_dirs["llava"]), "llava", precision="fp32", num_slots=4, max_waiting=8),
              load_served(str(served_dirs["clip"]), "clip", precision="fp32")]  # fmt: skip
    app = create_app(models, index=index_dir, image_roots=[served_dirs["images"]])
    s = Server(app)
    s.models = {m.name: m for m in models}
    yield s
    s.stop()
