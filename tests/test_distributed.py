"""DDP training (2 processes, gloo, CPU) reproduces the single-process run with the same global batch.

The ranks are forked from the test process (no second import of torch: fast), each with one thread.
Batch norm is synchronised (vericar.distributed.CPUSyncBatchNorm) and dropout is 0, so the check is
tight: loss histories equal to 1e-5 relative, embeddings to float rounding. With per-rank batch norm
(``init_from_env(sync_batchnorm=False)``) the same comparison fails by far (measured: first-epoch loss
0.936 vs 0.873, embeddings off by 0.11), so these tolerances do test the gradient and statistics plumbing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import FINE_TUNE_MS
from vericar import distributed
from vericar.embed import decode_images, embed_batches
from vericar.config import TrainConfig
from vericar.runs import load_model, load_run
from vericar.train import train

FINE_TUNE = TrainConfig(**FINE_TUNE_MS, protocol="official", backbone="tiny_cnn", pretrained=False, image_size=32, epochs=3,
                        batch_size=16, m_per_class=4, backbone_lr=3e-3, head_lr=3e-3, device="cpu", dropout=0.0)
# partial mode (cached trunk + last stage) with a hierarchical loss: the generic gather path with level labels
PARTIAL = dataclasses.replace(FINE_TUNE, train_backbone=False, trainable_stages=1, loss="hims_min", epochs=2)

WORKER_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cars, jobs) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.init_from_env(backend="gloo")
    assert (ctx.world_size, ctx.rank) == (world, rank)
    try:
        for config, run_dir, cache_dir in jobs:
            train(cars, config, run_dir, cache_dir=cache_dir, progress=False)
    finally:
        distributed.cleanup()


def _run_ddp(cars, jobs, world: int = 2) -> None:
    """Fork ``world`` ranks that each run ``train`` for every job; fail (not hang) on error or timeout."""
    ctx = mp.start_processes(_worker, args=(world, _free_port(), cars, jobs), nprocs=world, join=False,
                             start_method="fork")
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"DDP workers still running after {WORKER_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def runs(synthcars_tiny, tmp_path_factory):
    """Single-process and 2-rank DDP runs of both configs (the DDP ones in one fork)."""
    root = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # like one rank; also keeps OpenMP idle before the fork
    try:
        single = {name: train(synthcars_tiny, cfg, root / f"single_{name}", cache_dir=root / "cache",
                              progress=False)
                  for name, cfg in (("fine_tune", FINE_TUNE), ("partial", PARTIAL))}
    finally:
        torch.set_num_threads(threads)
    t1 = time.perf_counter()
    _run_ddp(synthcars_tiny, [(FINE_TUNE, root / "ddp_fine_tune", root / "cache_ddp"),
                              (PARTIAL, root / "ddp_partial", root / "cache_ddp")])
    t2 = time.perf_counter()
    ddp = {name: load_run(root / f"ddp_{name}", synthcars_tiny) for name in single}
    print(f"single-process runs {t1 - t0:.1f} s, 2-rank DDP runs {t2 - t1:.1f} s")
    return single, ddp


@pytest.mark.parametrize("name", ["fine_tune", "partial"])
def test_ddp_matches_single_process(runs, synthcars_tiny, name):
    single, ddp = runs[0][name], runs[1][name]
    # the same steps over the same global batches: the same losses, up to float rounding
    assert len(ddp.history) == len(single.history)
    np.testing.assert_allclose(ddp.history["loss"], single.history["loss"], rtol=1e-5)
    # the same images per epoch (global count) and the same evaluation columns (rank 0 evaluated)
    assert ddp.history["images"].tolist() == single.history["images"].tolist()
    assert ddp.history["map_at_r"].notna().all()
    # final embeddings (stored in float16) and re-embedded in float32 with the saved model
    np.testing.assert_allclose(ddp.embeddings, single.embeddings, atol=2e-3)
    m_single, m_ddp = load_model(single), load_model(ddp)
    images = decode_images(synthcars_tiny, np.arange(len(synthcars_tiny)), 32, m_single.spec.interpolation,
                           progress=False)
    e_single = embed_batches(m_single, images, m_single.spec, progress=False)
    e_ddp = embed_batches(m_ddp, images, m_ddp.spec, progress=False)
    assert np.abs(e_ddp - e_single).max() < 1e-3
    assert abs(ddp.metrics["trained"]["map_at_r"] - single.metrics["trained"]["map_at_r"]) < 0.01


def test_ddp_run_folder_is_written_once_by_rank_0(runs):
    ddp = runs[1]["fine_tune"]
    config = json.loads((ddp.path / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 16  # the global batch
    assert "world_size" not in json.loads((runs[0]["fine_tune"].path / "config.json").read_text())
    for name in ("checkpoint.pt", "history.csv", "embeddings.npz", "metrics.json"):
        assert (ddp.path / name).is_file()
    state = torch.load(ddp.model_path, weights_only=False)["model"]
    plain = torch.load(runs[0]["fine_tune"].model_path, weights_only=False)["model"]
    assert state.keys() == plain.keys()  # synced batch norm keeps the plain model's state_dict


def test_rank_slices_cover_the_global_batch():
    batch = np.arange(16)
    parts = [batch[distributed.rank_slice(16, r, 4)] for r in range(4)]
    assert np.array_equal(np.concatenate(parts), batch) and all(len(p) == 4 for p in parts)
    assert distributed.rank_slice(16) == slice(None)  # single process: everything
    with pytest.raises(ValueError, match="multiple of the world size"):
        distributed.check_batch_size(18, 4, world=4)
    with pytest.raises(ValueError, match="split evenly"):
        distributed.rank_slice(18, 0, 4)


def test_single_process_helpers_are_no_ops():
    from vericar.losses import make_loss

    assert distributed.context() == distributed.DistContext()
    loss = make_loss("ms")
    assert distributed.wrap_loss(loss) is loss
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(module, "cpu") is module


def test_cpu_sync_batchnorm_is_plain_batchnorm_in_one_process():
    from vericar.models import build_model

    plain = build_model("tiny_cnn", 16, pretrained=False, dropout=0.0)
    synced = distributed.convert_sync_batchnorm(build_model("tiny_cnn", 16, pretrained=False, dropout=0.0), "cpu")
    synced.load_state_dict(plain.state_dict())
    assert any(isinstance(m, distributed.CPUSyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    x = torch.randn(6, 3, 32, 32)
    torch.testing.assert_close(synced.train()(x), plain.train()(x))
    torch.testing.assert_close(synced.eval()(x), plain.eval()(x))
    assert synced.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_entry_point(runs, synthcars_tiny, tmp_path):
    """`torchrun --nproc_per_node 2 -m vericar.train ...` (the CLI) gives the fine-tune run's losses."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cfg = FINE_TUNE
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
           "-m", "vericar.train", "--dataset", "stanford_cars", "--data-dir", str(synthcars_tiny.root),
           "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    for f in dataclasses.fields(TrainConfig):
        if f.name != "loss_kwargs":
            cmd += ["--" + f.name.replace("_", "-"), str(getattr(cfg, f.name))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # --device cpu: gloo, even where CUDA is present
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"trained"' in proc.stdout  # rank 0 printed the metrics, once
    assert proc.stdout.count('"trained"') == 1
    run = load_run(tmp_path / "run")
    np.testing.assert_allclose(run.history["loss"], runs[0]["fine_tune"].history["loss"], rtol=1e-5)
