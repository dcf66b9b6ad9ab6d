"""python -m vericar.embed_folder: every readable image embedded as training evaluates it, unreadable ones
reported (never dropped silently), and an interrupted or repeated run resumes instead of starting over."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import vericar.embed_folder as ef
from conftest import FINE_TUNE_MS
from vericar.embed import embed_batches
from vericar.config import TrainConfig
from vericar.runs import load_model
from vericar.train import train

TINY = TrainConfig(**FINE_TUNE_MS, protocol="official", backbone="tiny_cnn", pretrained=False, image_size=32, epochs=1,
                   batch_size=16, m_per_class=4, device="cpu")


@pytest.fixture(scope="module")
def run_dir(synthcars_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("embed_folder") / "run"
    train(synthcars_tiny, TINY, path, progress=False)
    return path


@pytest.fixture
def folder(synthcars_tiny, tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        shutil.copy(synthcars_tiny.path(i), root / ("sub" if i % 2 else "") / f"car{i}.jpg")
    Image.open(synthcars_tiny.path(5)).save(root / "car5.PNG")  # any case of a known extension
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image: ignored")
    return root


VALID = ["car0.jpg", "car2.jpg", "car4.jpg", "car5.PNG", "sub/car1.jpg", "sub/car3.jpg"]


def reference(run_dir, folder, files):
    """Embeddings computed the way training evaluates: RGB, square bilinear resize, the model."""
    model = load_model(run_dir)
    batch = torch.stack([torch.from_numpy(np.array(Image.open(folder / f).convert("RGB").resize(
        (32, 32), Image.Resampling.BILINEAR), dtype=np.uint8)).permute(2, 0, 1) for f in files])
    return embed_batches(model, batch, model.spec, progress=False)


def test_embeds_readable_images_and_reports_the_rest(run_dir, folder, tmp_path):
    with pytest.warns(UserWarning, match="2 of 8 images .* could not be read"):
        result = ef.embed_folder(folder, run_dir, tmp_path / "out.npz", batch_size=4, progress=False)
    assert result.files.tolist() == VALID
    assert result.embeddings.shape == (6, 256) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(result.embeddings, reference(run_dir, folder, VALID), atol=1e-5)
    assert result.failed["file"].tolist() == ["corrupt.jpg", "empty.png"]
    assert result.failed["error"].str.contains("cannot decode").all()
    report = pd.read_csv(tmp_path / "out.failed.csv")
    assert report["file"].tolist() == ["corrupt.jpg", "empty.png"]
    loaded = ef.load_folder_embeddings(tmp_path / "out.npz")
    assert loaded.files.tolist() == VALID and loaded.failed["file"].tolist() == ["corrupt.jpg", "empty.png"]
    np.testing.assert_array_equal(loaded.embeddings, result.embeddings)
    assert loaded.meta["image_size"] == 32 and loaded.meta["backbone"] == "tiny_cnn"
    assert "corrupt.jpg" in result.summary() and "2 unreadable" in result.summary()


def test_interrupted_run_resumes_and_reruns_skip_embedded_files(run_dir, folder, tmp_path, monkeypatch):
    out = tmp_path / "out.npz"
    calls = []
    real = ef.embed_batches

    def counting(model, images, *a, **kw):
        calls.append(len(images))
        if interrupt and len(calls) == 2:
            raise KeyboardInterrupt  # dies while embedding the second shard
        return real(model, images, *a, **kw)

    monkeypatch.setattr(ef, "embed_batches", counting)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        ef.embed_folder(folder, run_dir, out, batch_size=2, shard_size=2, progress=False)
    assert not out.exists() and len(list((tmp_path / "out.npz.parts").glob("shard-*.npz"))) == 1

    interrupt, calls[:] = False, []
    with pytest.warns(UserWarning):
        resumed = ef.embed_folder(folder, run_dir, out, batch_size=2, shard_size=2, progress=False)
    assert (resumed.reused, resumed.embedded) == (2, 4) and sum(calls) == 4  # only the rest was embedded
    assert resumed.files.tolist() == VALID and not (tmp_path / "out.npz.parts").exists()
    np.testing.assert_allclose(resumed.embeddings, reference(run_dir, folder, VALID), atol=1e-5)

    calls[:] = []
    with pytest.warns(UserWarning):  # unreadable files are retried (and reported) every time
        again = ef.embed_folder(folder, run_dir, out, progress=False)
    assert (again.reused, again.embedded, sum(calls)) == (6, 0, 0) and len(again.failed) == 2

    (folder / "corrupt.jpg").unlink()
    (folder / "empty.png").unlink()
    shutil.copy(folder / "car0.jpg", folder / "sub" / "new.jpg")
    more = ef.embed_folder(folder, run_dir, out, progress=False)
    assert (more.reused, more.embedded, sum(calls)) == (6, 1, 1) and more.failed.empty
    assert more.files.tolist() == VALID + ["sub/new.jpg"]
    assert pd.read_csv(tmp_path / "out.failed.csv").empty


def test_another_model_is_not_mixed_in(run_dir, folder, tmp_path):
    out = tmp_path / "out.npz"
    with pytest.warns(UserWarning):
        ef.embed_folder(folder, run_dir, out, progress=False)
    other = tmp_path / "other_run"
    shutil.copytree(run_dir, other)
    ckpt = torch.load(other / "checkpoint.pt", weights_only=False)
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, other / "checkpoint.pt")
    with pytest.raises(ValueError, match="another model"):
        ef.embed_folder(folder, other, out, progress=False)
    with pytest.warns(UserWarning):
        fresh = ef.embed_folder(folder, other, out, progress=False, overwrite=True)
    assert fresh.reused == 0 and fresh.embedded == 6


def test_command_line(run_dir, folder, tmp_path, capsys):
    assert ef.main([str(folder), "--checkpoint", str(run_dir), "--out", str(tmp_path / "cli"), "--batch-size", "3",
                    "--device", "cpu", "--no-progress"]) == 1  # some images failed: a script must notice
    err = capsys.readouterr().err
    assert "6 images embedded" in err and "2 unreadable" in err and "corrupt.jpg" in err
    assert err.rstrip().splitlines()[-1].startswith("2 images could not be read")
    assert (tmp_path / "cli.npz").is_file() and (tmp_path / "cli.failed.csv").is_file()
    with pytest.raises(FileNotFoundError, match="pass a folder"):
        ef.list_images(tmp_path / "missing")


def test_python_m_vericar_embed_is_the_folder_embedder(run_dir, folder, tmp_path):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "vericar.embed", str(folder), "--checkpoint", str(run_dir),
                           "--out", str(tmp_path / "m"), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # the folder holds two unreadable images
    assert "6 images embedded" in done.stderr and (tmp_path / "m.npz").is_file()
