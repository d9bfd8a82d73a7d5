"""The app with `--concurrency` above 1: requests that overlap give, bit for bit, the images and metrics they give
one after the other. The handlers are called as Gradio's event calls them (one request per thread), on the bundled
tiny pipeline, without a browser."""

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("gradio")

from PIL import Image  # noqa: E402

from gradio_app import app as ui  # noqa: E402
from gradio_app.choices import BUNDLED, DEFAULT_SOURCE  # noqa: E402

REQUESTS = [("a thick handwritten digit 7", 1), ("a thin handwritten digit 3", 2), ("an italic handwritten digit 5", 3)]
STEPS = 2  # the smallest the app allows: the overlap matters, not the image quality


def generate(prompt: str, seed: int) -> list:
    """One Generate request as the page sends it: [(pixels of the image served, metrics without timings)] for
    FP, W8A8 and W4A8-MP."""
    status, *outputs = ui.run_generate(DEFAULT_SOURCE, "", prompt, "", seed, STEPS, 4.5)
    assert f"“{prompt}” (seed {seed}, {STEPS} steps" in status
    images = [np.asarray(Image.open(image.value["path"])) for image in outputs[0::2]]
    metrics = ["\n".join(row for row in text.splitlines() if "latency" not in row and "peak memory" not in row)
               for text in outputs[1::2]]
    return list(zip(images, metrics))


def test_concurrent_requests_give_the_results_of_sequential_ones():
    """Every pipeline call sets the padding of its fast tokenizer and then encodes: with one tokenizer shared by all
    requests, a request could encode its prompt with another's padding (a different image, or a crash). A fourth
    thread keeps encoding with the loaded pipeline's own tokenizer, as more overlapping requests would, so that an
    overlap happens in every round rather than once in a while."""
    torch.set_num_threads(1)
    sequential = [generate(*request) for request in REQUESTS]
    loaded = ui.logic().CACHE.get(BUNDLED[DEFAULT_SOURCE])
    for _ in range(2):
        results, errors, stop = {}, [], threading.Event()

        def request(key, prompt, seed):
            try:
                results[key] = generate(prompt, seed)
            except Exception as error:  # noqa: BLE001 (reported below, with the request it broke)
                errors.append((key, repr(error)))

        def other_encodings():  # PixArt's own truncation check: padding="longest"
            while not stop.is_set():
                loaded.fp.tokenizer(["a handwritten digit 1"], padding="longest", return_tensors="pt")

        threads = [threading.Thread(target=request, args=(key, *r)) for key, r in enumerate(REQUESTS)]
        encoder = threading.Thread(target=other_encodings)
        encoder.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        encoder.join()
        assert not errors, errors
        for key, expected in enumerate(sequential):
            for name, (image, metrics), (want_image, want_metrics) in zip(ui.VARIANTS, results[key], expected):
                assert np.array_equal(image, want_image), (REQUESTS[key], name)
                assert metrics == want_metrics, (REQUESTS[key], name)
    assert not np.array_equal(sequential[0][0][0], sequential[1][0][0])  # a 7 and a 3: the comparison can fail
