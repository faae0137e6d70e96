"""Sampling outputs for the scorer and the review queue, the scorer's book, and the safety filter's actions: pure
parts of the quality loop's serving side, with a fake checker at our own boundary (the real one runs in
tests/test_quality_models.py and the end-to-end tests)."""

from __future__ import annotations

import base64
import random

from PIL import Image

from serving.safety import SafetyFilter
from serving.sampling import draw, sample
from serving.scorer import SampleBook


def test_one_draw_decides_review_and_scoring_at_their_rates() -> None:
    rng = random.Random(7)
    draws = [draw(rng, 0.1, 0.5) for _ in range(20_000)]
    reviewed, scored = sum(r for r, _ in draws) / len(draws), sum(s for _, s in draws) / len(draws)
    assert abs(reviewed - 0.1) < 0.01 and abs(scored - 0.5) < 0.02
    assert all(s for r, s in draws if r)  # a reviewed sample is scored whenever the CLIP rate is at least the review rate
    assert draw(rng, 0, 0) == (False, False) and draw(rng, 1, 0) == (True, False) and draw(rng, 0, 1) == (False, True)


def test_a_sample_carries_the_prompt_the_seed_it_drew_with_and_the_first_image() -> None:
    result = {"images": [b"png-1", b"png-2"], "params": {"seed": 42, "steps": 4, "width": 64}, "nsfw": [True, False]}
    got = sample("req-1", "v1", {"prompt": "a red cube", "negative_prompt": "blur"}, result, True, False, at=5.0)
    assert got == {"request_id": "req-1", "version": "v1", "prompt": "a red cube", "negative_prompt": "blur", "seed": 42,
                   "params": {"steps": 4, "width": 64}, "png": b"png-1", "nsfw": True, "at": 5.0, "review": True, "score": False}


def test_the_book_pages_by_count_and_image_bytes_and_drops_the_oldest_past_its_bounds() -> None:
    book = SampleBook(kept=5, kept_bytes=1000, epoch="e1")
    for n in range(7):
        book.add({"request_id": f"r{n}", "version": "v1", "png": b"x" * 100 if n % 2 else None})
    page = book.since(None, 0)  # another epoch: read from the start of what is held
    assert page["epoch"] == "e1" and page["first"] == 3 and page["last"] == 7
    assert [s["request_id"] for s in page["samples"]] == ["r2", "r3", "r4", "r5", "r6"]
    assert page["samples"][1]["png"] == base64.b64encode(b"x" * 100).decode() and page["samples"][0]["png"] is None
    assert [s["seq"] for s in book.since("e1", 5)["samples"]] == [6, 7]
    assert [s["seq"] for s in book.since("e1", 0, page_bytes=150)["samples"]] == [3, 4, 5]  # the next image would overflow
    assert [s["seq"] for s in book.since("e1", 0, limit=2)["samples"]] == [3, 4]
    big = SampleBook(kept=100, kept_bytes=250, epoch="e2")
    for n in range(4):
        big.add({"request_id": f"r{n}", "png": b"y" * 100})
    assert [s["request_id"] for s in big.since("e2", 0)["samples"]] == ["r2", "r3"] and big.bytes == 200


def test_the_safety_filter_flags_blurs_or_withholds_only_the_flagged_images() -> None:
    images = [Image.new("RGB", (8, 8), (n * 40, 0, 0)) for n in range(3)]
    counted: list[int] = []

    def middle(batch: list[Image.Image]) -> list[bool]:
        return [n == 1 for n in range(len(batch))]

    blurred = Image.new("RGB", (8, 8), (1, 2, 3))
    out, flags = SafetyFilter(middle, "blur", lambda image: blurred, counted.append).apply(images)
    assert flags == [False, True, False] and out[1] is blurred and out[0] is images[0] and counted == [1]
    out, flags = SafetyFilter(middle, "flag").apply(images)
    assert out == images and flags == [False, True, False]
    out, flags = SafetyFilter(lambda batch: [False] * len(batch), "block", on_flagged=counted.append).apply(images)
    assert flags == [False] * 3 and counted == [1]  # nothing flagged: nothing counted


def test_the_book_at_its_real_caps_holds_256_mib_and_pages_8_mib_of_1024px_sized_images() -> None:
    from serving.scorer import KEPT_BYTES, PAGE_BYTES

    png = b"\x89PNG" + b"x" * (1_500_000 - 4)  # a 1024 px PNG's size
    book = SampleBook(epoch="e")
    for n in range(200):
        book.add({"request_id": f"r{n}", "version": "v1", "png": png})
    assert book.bytes <= KEPT_BYTES and len(book.samples) == KEPT_BYTES // len(png)
    page = book.since("e", 0)
    assert len(page["samples"]) == PAGE_BYTES // len(png)  # 5 images in one page, the rest on the next reads
    assert page["samples"][0]["seq"] == page["first"] == 200 - len(book.samples) + 1
