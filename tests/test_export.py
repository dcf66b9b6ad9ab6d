"""The portable model: ONNX export whose onnxruntime embeddings match torch's, and the backend choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from vericar.embed import square_tensor  # noqa: E402
from vericar.export import TOLERANCE, OnnxEmbedder, cosine_gap, main, make_embedder, select_backend  # noqa: E402
from vericar.runs import load_model  # noqa: E402


def photos(run, cars, n=6) -> torch.Tensor:
    return torch.stack([square_tensor(cars.image(int(r)), run.config.image_size) for r in run.split.query[:n]])


def test_export_command_writes_a_model_that_matches_torch(tiny_open_world_run, synthcars_tiny, tmp_path, capsys):
    run = tiny_open_world_run
    out = tmp_path / "sub" / "car.onnx"
    assert main([str(run.path), "--onnx", str(out), "--check-images", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["matches_torch"] and out.is_file() and not list(out.parent.glob("*.tmp"))
    onnx = OnnxEmbedder(out)
    assert onnx.image_size == 32 and onnx.metadata["backbone"] == "tiny_cnn"
    images = photos(run, synthcars_tiny)
    got = onnx(images)
    expected = make_embedder(load_model(run), 32, "torch")(images)
    assert cosine_gap(expected, got) <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # the stored embeddings of these images are what training's evaluation computed (flip TTA included)
    assert cosine_gap(run.embeddings[run.split.query[:6]], got) < 1e-3


def test_select_backend_keeps_the_fastest_that_matches(tiny_open_world_run, synthcars_tiny):
    run = tiny_open_world_run
    name, embedder, report = select_backend(load_model(run), 32, photos(run, synthcars_tiny, 16), repeats=1)
    assert [r["backend"] for r in report] == ["torch", "torch-bf16", "onnx"]
    matching = [r for r in report if r["matches"]]
    assert name == max(matching, key=lambda r: r["images_per_second"])["backend"]
    assert all(r["cosine_gap"] > TOLERANCE for r in report if "cosine_gap" in r and not r["matches"])
    assert embedder(photos(run, synthcars_tiny, 2)).shape == (2, 256)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        make_embedder(None, 32, "tpu")
