"""Training, embedding and the run folder: learning beats the frozen baseline, runs are deterministic and resumable."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import FINE_TUNE_MS
from vericar.embed import augment, decode_images, embed_batches
from vericar.config import TrainConfig
from vericar.runs import load_model, load_run
from vericar.train import train

TINY = TrainConfig(**FINE_TUNE_MS, protocol="official", backbone="tiny_cnn", pretrained=False, image_size=32, epochs=3,
                   batch_size=16, m_per_class=4, backbone_lr=3e-3, head_lr=3e-3, device="cpu")


def test_fine_tuning_beats_its_frozen_baseline(synthcars_tiny, tmp_path):
    config = dataclasses.replace(TINY, epochs=10, backbone_lr=1e-2, head_lr=1e-2, eval_every=5)
    run = train(synthcars_tiny, config, tmp_path / "run", progress=False)
    frozen, trained = run.metrics["frozen"], run.metrics["trained"]
    assert trained["map_at_r"] > frozen["map_at_r"] + 0.03
    assert trained["precision_at_1"] > frozen["precision_at_1"]
    assert len(run.history) == 10 and run.history["loss"].notna().all()
    assert run.history["map_at_r"].notna().sum() == 2  # evaluated at epochs 5 and 10
    assert run.embeddings.shape == (len(synthcars_tiny), 256)
    assert np.allclose(np.linalg.norm(run.embeddings, axis=1), 1, atol=1e-2)
    for name in ("config.json", "checkpoint.pt", "history.csv", "embeddings.npz", "metrics.json"):
        assert (tmp_path / "run" / name).is_file()


def test_training_is_deterministic(synthcars_tiny, tmp_path):
    a = train(synthcars_tiny, TINY, tmp_path / "a", progress=False)
    b = train(synthcars_tiny, TINY, tmp_path / "b", progress=False)
    assert np.array_equal(a.embeddings, b.embeddings)
    assert a.history["loss"].tolist() == b.history["loss"].tolist()


def test_interrupted_run_resumes_to_the_same_result(synthcars_tiny, tmp_path):
    full = train(synthcars_tiny, TINY, tmp_path / "full", progress=False)

    def stop_after_first_epoch(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(synthcars_tiny, TINY, tmp_path / "resumed", progress=False, callback=stop_after_first_epoch)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = train(synthcars_tiny, TINY, tmp_path / "resumed", progress=False)
    assert resumed.history["epoch"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(resumed.embeddings, full.embeddings, atol=2e-3)


_RESUME_IN_A_FRESH_PROCESS = """
import json
import sys
from pathlib import Path
from vericar.config import TrainConfig
from vericar.data import open_dataset
from vericar.train import train
root, run_dir, config = sys.argv[1], Path(sys.argv[2]), TrainConfig.from_json(json.loads(sys.argv[3]))
cars = open_dataset("synthetic", root, synth_config="tiny", progress=False)
before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
try:
    train(cars, config, run_dir, progress=False)
except ValueError as err:
    print("ERROR", err)
print("UNTOUCHED", {p.name: p.read_bytes() for p in run_dir.iterdir()} == before)
print("CORE ONLY", not [m for m in sys.modules if m.startswith("vericar.analyses")])
import vericar.analyses.seed_losses  # registers the seed's losses with vericar.losses
print("EPOCHS", train(cars, config, run_dir, progress=False).history["epoch"].tolist())
"""


def test_a_seed_loss_run_resumes_in_a_fresh_process_once_its_module_is_imported(synthcars_tiny, tmp_path):
    """The core does not know the seed's losses by itself: a fresh process refuses the interrupted run's loss
    without touching the folder, naming the module to import; once it is imported the run resumes."""
    import json
    import subprocess
    import sys

    import vericar.analyses.seed_losses  # noqa: F401  (registers "ms_accum:*" in this process)

    config = dataclasses.replace(TINY, loss="ms_accum:writeup_wrong_loop")

    def stop_after_first_epoch(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(synthcars_tiny, config, tmp_path / "resumed", progress=False, callback=stop_after_first_epoch)
    args = [str(synthcars_tiny.root), str(tmp_path / "resumed"), json.dumps(config.to_json())]
    out = subprocess.run([sys.executable, "-c", _RESUME_IN_A_FRESH_PROCESS, *args], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "ERROR unknown loss 'ms_accum:writeup_wrong_loop'" in out.stdout
    assert "import vericar.analyses.seed_losses" in out.stdout
    assert "UNTOUCHED True" in out.stdout and "EPOCHS [1, 2, 3]" in out.stdout
    assert "CORE ONLY True" in out.stdout  # training imported no analysis
    full = train(synthcars_tiny, config, tmp_path / "full", progress=False)
    np.testing.assert_allclose(load_run(tmp_path / "resumed").embeddings, full.embeddings, atol=2e-3)


def test_finished_run_is_loaded_not_retrained(synthcars_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VERICAR_NOTEBOOK", "03_training")  # as the study runner sets it for a notebook's kernel
    train(synthcars_tiny, TINY, tmp_path / "r", progress=False)
    monkeypatch.delenv("VERICAR_NOTEBOOK")
    called = []
    again = train(synthcars_tiny, TINY, tmp_path / "r", progress=False, callback=lambda *a: called.append(a))
    assert not called and again.metrics["trained"]
    assert again.metrics["trained_in_notebook"] == "03_training"  # who trained it, not who loaded it (run_cost)
    assert train(synthcars_tiny, TINY, tmp_path / "r2", progress=False).metrics["trained_in_notebook"] is None
    with pytest.raises(FileNotFoundError, match="notebook 03_training"):
        load_run(tmp_path / "missing")


@pytest.mark.parametrize("stages,flip_tta", [(0, False), (1, False), (1, True)])
def test_cached_modes_train_and_reload(synthcars_tiny, tmp_path, stages, flip_tta):
    config = dataclasses.replace(TINY, train_backbone=False, trainable_stages=stages, epochs=2, flip_tta=flip_tta)
    run = train(synthcars_tiny, config, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    model = load_model(run)
    assert model.flip_tta == flip_tta
    images = decode_images(synthcars_tiny, np.arange(6), 32, model.spec.interpolation, progress=False)
    again = embed_batches(model, images, model.spec, progress=False)  # the reloaded model embeds like training
    np.testing.assert_allclose(again, run.embeddings[:6], atol=2e-3)  # embeddings are stored in float16
    assert list((tmp_path / "cache").glob("features-tiny_cnn-trunk-1-32px-*.npy"))
    if flip_tta:  # the stored embedding is the normalised mean of the image's and its mirror's embeddings
        model.flip_tta = False
        plain = embed_batches(model, images, model.spec, progress=False)
        mirror = embed_batches(model, images.flip(-1), model.spec, progress=False)
        mean = plain + mirror
        np.testing.assert_allclose(mean / np.linalg.norm(mean, axis=1, keepdims=True), run.embeddings[:6],
                                   atol=2e-3)


def test_flip_tta_in_fine_tuning_embeds_through_the_model(synthcars_tiny, tmp_path):
    run = train(synthcars_tiny, dataclasses.replace(TINY, epochs=1, flip_tta=True), tmp_path / "run", progress=False)
    model = load_model(run)
    images = decode_images(synthcars_tiny, np.arange(6), 32, model.spec.interpolation, progress=False)
    np.testing.assert_allclose(embed_batches(model, images, model.spec, progress=False), run.embeddings[:6],
                               atol=2e-3)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():  # eval mode is invariant to mirroring; training mode does no TTA
        torch.testing.assert_close(model(x), model(x.flip(-1)), atol=1e-5, rtol=0)
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(0)
        assert not torch.allclose(a, model(x.flip(-1)), atol=1e-3)


def test_head_only_leaves_the_pretrained_backbone_untouched(synthcars_tiny, tmp_path):
    from vericar.models import build_backbone

    config = dataclasses.replace(TINY, backbone="efficientnet_lite0", pretrained=True, train_backbone=False,
                                 trainable_stages=0, epochs=1, image_size=48, augment=False)
    run = train(synthcars_tiny, config, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    state = torch.load(run.model_path, weights_only=False)["model"]
    pretrained, _ = build_backbone("efficientnet_lite0")
    for name, value in pretrained.state_dict().items():
        assert torch.equal(state[f"backbone.{name}"], value), name


def test_train_labels_override_and_validation(synthcars_tiny, tmp_path):
    from vericar.runs import split_for
    split = split_for(synthcars_tiny, TINY)
    with pytest.raises(ValueError, match="train_labels has 3 entries"):
        train(synthcars_tiny, TINY, tmp_path / "x", train_labels=np.zeros(3, dtype=int), progress=False)
    assert len(split.train) > 3


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of m_per_class"):
        TrainConfig(batch_size=30, m_per_class=4)
    with pytest.raises(ValueError, match="unknown sampler"):
        TrainConfig(sampler="random")


def test_augment_is_batched_deterministic_and_bounded():
    x = torch.rand(8, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    same = augment(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1), flip=False, jitter=0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    flipped = augment(x[:1].expand(64, -1, -1, -1), torch.Generator().manual_seed(0), scale=(1, 1),
                      ratio=(1, 1), jitter=0)
    is_flipped = [torch.allclose(f, x[0].flip(-1), atol=1e-5) for f in flipped]
    assert 10 < sum(is_flipped) < 54  # about half of them mirrored


def test_exported_run_is_small_and_loads_like_the_original(synthcars_tiny, tmp_path):
    from vericar.runs import export_run
    run = train(synthcars_tiny, TINY, tmp_path / "r", progress=False)
    files = export_run(tmp_path / "r", tmp_path / "home")
    assert {p.name for p in files} == {"config.json", "metrics.json", "history.csv", "model.pt", "embeddings.npz"}
    home = load_run(tmp_path / "home", synthcars_tiny)
    np.testing.assert_allclose(home.embeddings, run.embeddings, atol=1e-3)
    assert home.metrics == run.metrics and np.array_equal(home.split.query, run.split.query)
    with pytest.raises(FileNotFoundError, match="without frozen-backbone features"):
        home.frozen
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = load_model(run)(x), load_model(home)(x)
    torch.testing.assert_close(a, b, atol=5e-3, rtol=0)  # half-precision weights
    assert (tmp_path / "home" / "model.pt").stat().st_size < 0.6 * (tmp_path / "r" / "checkpoint.pt").stat().st_size
    with_frozen = load_run(export_run(tmp_path / "r", tmp_path / "home2", frozen=True)[0].parent)
    np.testing.assert_allclose(with_frozen.frozen, run.frozen, atol=1e-3)


def test_retraining_with_another_config_drops_the_old_results_first(synthcars_tiny, tmp_path):
    train(synthcars_tiny, TINY, tmp_path / "r", progress=False)

    def crash(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # only when asked to: overwrite=True (see test_reliability)
        train(synthcars_tiny, dataclasses.replace(TINY, epochs=2), tmp_path / "r", progress=False, callback=crash,
              overwrite=True)
    assert not (tmp_path / "r" / "metrics.json").exists()  # not the first run's metrics under the new config
    with pytest.raises(FileNotFoundError, match="not a finished training run"):
        load_run(tmp_path / "r")


def test_evaluation_frequency_does_not_change_the_model_so_runs_are_reused(synthcars_tiny, tmp_path):
    full = train(synthcars_tiny, TINY, tmp_path / "full", progress=False)
    again = train(synthcars_tiny, dataclasses.replace(TINY, eval_every=3), tmp_path / "full", progress=False,
                  callback=lambda *a: pytest.fail("retrained"))
    assert np.array_equal(again.embeddings, full.embeddings)

    def stop(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(synthcars_tiny, TINY, tmp_path / "resumed", progress=False, callback=stop)
    resumed = train(synthcars_tiny, dataclasses.replace(TINY, eval_every=2), tmp_path / "resumed", progress=False)
    assert resumed.history["epoch"].tolist() == [1, 2, 3]  # resumed from epoch 1, not restarted
    np.testing.assert_allclose(resumed.embeddings, full.embeddings, atol=2e-3)


@pytest.mark.parametrize("loss", ["proxy_anchor", "norm_softmax"])
def test_proxy_losses_train_and_save_their_proxies(synthcars_tiny, tmp_path, loss):
    config = dataclasses.replace(TINY, loss=loss, epochs=4, proxy_lr=1e-2)
    run = train(synthcars_tiny, config, tmp_path / "run", progress=False)
    assert run.history["loss"].iloc[-1] < run.history["loss"].iloc[0]
    saved = np.load(tmp_path / "run" / "proxies.npz")
    trained_classes = np.unique(synthcars_tiny.labels[run.split.train])
    assert np.array_equal(saved["classes"], trained_classes) and str(saved["kind"]) == loss
    assert saved["proxies"].shape == (len(trained_classes), config.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(saved["proxies"], axis=1), 1, atol=1e-5)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert any("prox" in k or k.endswith("W") for k in ckpt["loss"])  # resumable with its proxies


def test_augmented_views_are_cached_once_and_drawn_in_training(synthcars_tiny, tmp_path):
    base = dataclasses.replace(TINY, train_backbone=False, trainable_stages=1, epochs=2)
    plain = train(synthcars_tiny, base, tmp_path / "plain", progress=False, cache_dir=tmp_path / "cache")
    views = train(synthcars_tiny, dataclasses.replace(base, aug_views=2), tmp_path / "views", progress=False,
                  cache_dir=tmp_path / "cache")
    cached = sorted(p.name.split("px-")[1].split("-")[0] for p in (tmp_path / "cache").glob("*.npy"))
    assert cached == ["aug0", "aug1", "flip", "plain"]
    # the augmented views are other inputs than the plain and mirrored ones: the trained models differ
    assert not np.allclose(plain.embeddings, views.embeddings, atol=1e-3)
    assert "2 augmented views" in views.config.describe()
    with pytest.raises(ValueError, match="aug_views"):
        dataclasses.replace(TINY, aug_views=2)  # a fine-tune augments on the fly


def test_the_default_views_are_the_recipes_for_cached_modes_and_none_for_a_fine_tune():
    from vericar.config import CACHED_AUG_VIEWS
    from vericar.study import reference_recipe

    assert TrainConfig().aug_views == CACHED_AUG_VIEWS == reference_recipe()["aug_views"] == 4
    assert TrainConfig(train_backbone=True).aug_views == 0  # a fine-tune needs no aug_views=0 spelt out
    assert TrainConfig(aug_views=0).aug_views == 0 and TrainConfig(aug_views=2).aug_views == 2
    stored = TrainConfig.from_json(TrainConfig().to_json())  # a run folder's config reads back unchanged
    assert stored == TrainConfig() and stored.to_json()["aug_views"] == 4
    with pytest.raises(ValueError, match="aug_views=0"):
        dataclasses.replace(TrainConfig(), train_backbone=True)  # 4 views made explicit, then a fine-tune


def test_save_pooled_keeps_the_trained_backbones_features(synthcars_tiny, tmp_path):
    config = dataclasses.replace(TINY, train_backbone=False, trainable_stages=1, epochs=2, save_pooled=True)
    run = train(synthcars_tiny, config, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    assert run.pooled.shape == run.frozen.shape
    np.testing.assert_allclose(np.linalg.norm(run.pooled, axis=1), 1, atol=1e-2)
    assert not np.allclose(run.pooled, run.frozen, atol=1e-2)  # the last stage trained: its features moved
    # save_pooled does not change the model: a run without it is reused, not retrained
    again = train(synthcars_tiny, dataclasses.replace(config, save_pooled=False), tmp_path / "run", progress=False)
    np.testing.assert_array_equal(again.embeddings, run.embeddings)


# ------------------------------------------------------------------ learning-rate schedule (torch's schedulers)

def _lrs(total, warmup, base=2.0):
    from vericar.train import lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = lr_scheduler(opt, total, warmup)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, opt.param_groups[0]["lr"], opt, sched


def test_lr_schedule_is_linear_warmup_then_cosine_to_zero():
    lrs, after, _, _ = _lrs(10, 2)
    want = [2.0 * 1 / 2, 2.0 * 2 / 2] + [2.0 * 0.5 * (1 + math.cos(math.pi * j / 8)) for j in range(8)]
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=1e-15)
    assert lrs[2] == pytest.approx(2.0) and lrs[-1] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert after == pytest.approx(0.0, abs=1e-15)  # cosine reaches 0 right after the last step
    no_warmup, after, _, _ = _lrs(4, 0, base=1.0)
    np.testing.assert_allclose(no_warmup, [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    assert after == pytest.approx(0.0, abs=1e-15)


def test_lr_schedule_resumes_from_its_state_and_from_the_former_lambda_checkpoints():
    from vericar.train import lr_scheduler, restore_scheduler

    full, _, _, _ = _lrs(10, 3)
    # new checkpoints: state dicts after 4 steps
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = lr_scheduler(opt, 10, 3)
    for _ in range(4):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched2 = lr_scheduler(opt2, 10, 3)
    opt2.load_state_dict(opt.state_dict())
    restore_scheduler(sched2, sched.state_dict())
    rest = []
    for _ in range(6):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == full[4:]  # exactly
    # a checkpoint of the former LambdaLR at step 4
    legacy = {"base_lrs": [2.0], "last_epoch": 4, "_step_count": 5, "lr_lambdas": [None], "_last_lr": [full[4]]}
    opt3 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched3 = lr_scheduler(opt3, 10, 3)
    restore_scheduler(sched3, legacy)
    assert opt3.param_groups[0]["lr"] == pytest.approx(full[4], rel=1e-12)


def test_a_run_can_start_from_another_runs_weights_and_proxies(synthcars_tiny, tmp_path):
    """init_from: a full fine-tune from a finished (e.g. partial) run starts from its weights and proxies, not
    from the ImageNet ones; a run that would leak evaluation images into its start, or another model shape, is
    refused before anything is written."""
    from vericar.losses import make_loss
    from vericar.runs import config_diff
    from vericar.train import _load_init, _setup_model

    start = dataclasses.replace(TINY, protocol="val", loss="proxy_anchor", proxy_lr=1e-2, epochs=2,
                                train_backbone=False, trainable_stages=1, aug_views=0)
    first = train(synthcars_tiny, start, tmp_path / "partial", progress=False)
    then = dataclasses.replace(start, train_backbone=True, init_from=str(tmp_path / "partial"), epochs=1)
    model = _setup_model(then, torch.device("cpu"))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    classes = np.unique(synthcars_tiny.labels[first.split.train])
    loss = make_loss("proxy_anchor", classes=classes, embedding_size=then.embedding_dim)
    _load_init(first, model, loss)
    theirs = torch.load(tmp_path / "partial" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(model.state_dict()[k], theirs["model"][k]) for k in fresh)
    assert any(not torch.equal(fresh[k], theirs["model"][k]) for k in fresh)  # the start did change
    np.testing.assert_allclose(loss.proxies().numpy(), np.load(tmp_path / "partial" / "proxies.npz")["proxies"],
                               atol=1e-6)
    import vericar.train as train_module
    loads = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "_load_init", lambda init, *a: loads.append(init.path) or _load_init(init, *a))
        run = train(synthcars_tiny, then, tmp_path / "full", progress=False)
        assert loads == [tmp_path / "partial"]  # trained from its weights
        (tmp_path / "moved").mkdir()
        (tmp_path / "partial").rename(tmp_path / "moved" / "partial")
        again = train(synthcars_tiny, then, tmp_path / "full", progress=False)  # finished: loaded, start not needed
        assert loads == [tmp_path / "partial"] and np.array_equal(again.embeddings, run.embeddings)
    assert run.config.init_from == str(tmp_path / "partial") and len(run.history) == 1
    (tmp_path / "moved" / "partial").rename(tmp_path / "partial")
    with pytest.warns(UserWarning, match="proxies start afresh"):  # an MS run has no proxies to start from
        ms = train(synthcars_tiny, dataclasses.replace(start, loss="ms"), tmp_path / "ms", progress=False)
        train(synthcars_tiny, dataclasses.replace(then, init_from=str(ms.path)), tmp_path / "from_ms", progress=False)

    official = train(synthcars_tiny, dataclasses.replace(start, protocol="official"), tmp_path / "official",
                     progress=False)
    with pytest.raises(ValueError, match=r"trained on \d+ images this run does not train on"):
        train(synthcars_tiny, dataclasses.replace(then, init_from=str(official.path)), tmp_path / "leak",
              progress=False)
    with pytest.raises(ValueError, match="embedding_dim"):
        train(synthcars_tiny, dataclasses.replace(then, embedding_dim=64), tmp_path / "shape", progress=False)
    with pytest.raises(ValueError, match="deeper into the backbone"):
        train(synthcars_tiny, dataclasses.replace(start, trainable_stages=0, init_from=str(tmp_path / "partial")),
              tmp_path / "shallow", progress=False)
    assert not (tmp_path / "leak").exists() or not any((tmp_path / "leak").iterdir())
    # run folders written before the field existed are still this config's
    older = {k: v for k, v in TINY.to_json().items() if k != "init_from"}
    assert config_diff(older, TINY.to_json()) == {}
    assert "init_from" in config_diff(older, then.to_json())
