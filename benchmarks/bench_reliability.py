"""Costs of issue 15's checks on the reference data: python benchmarks/bench_reliability.py ../shared/data/stanford_cars_small

Prints the data fingerprint, decoding with and without the orientation/mode checks, EXIF-tagged images, and a
safe (weights_only) vs plain load of an EfficientNet-Lite0 checkpoint with optimizer state. Nothing is written
but a temporary folder."""
import sys, time, statistics, tempfile
from pathlib import Path
import numpy as np, torch
from PIL import Image
from vericar.data import open_dataset
from vericar.runio import data_fingerprint, save_checkpoint, load_checkpoint
from vericar.embed import dataset_fingerprint
from vericar.data.images import load_image

root = sys.argv[1]
t = time.perf_counter(); cars = open_dataset("stanford_cars", root, progress=False); t_open = time.perf_counter() - t
ts = []
for _ in range(5):
    t = time.perf_counter(); fp = data_fingerprint(cars); ts.append(time.perf_counter() - t)
print(f"open_dataset {t_open*1000:.0f} ms for {len(cars)} images; data_fingerprint median {statistics.median(ts)*1000:.1f} ms ({fp})")
t = time.perf_counter(); dataset_fingerprint(cars); print(f"feature-cache dataset_fingerprint {1000*(time.perf_counter()-t):.1f} ms")

# EXIF orientation tags in the data, and decode cost with and without the new conversion
rows = np.linspace(0, len(cars) - 1, 1000).astype(int)
tagged = 0
def old_load(p):
    with Image.open(p) as im:
        im.load(); return im.convert("RGB") if im.mode != "RGB" else im.copy()
for name, fn in (("old decode (open+convert)", lambda p: old_load(p)), ("new load_image (EXIF+to_rgb)", load_image)):
    best = []
    for rep in range(3):
        t = time.perf_counter()
        for r in rows: fn(cars.path(int(r)))
        best.append(time.perf_counter() - t)
    print(f"{name}: {min(best)/len(rows)*1e6:.0f} us/image (best of 3 over {len(rows)} images)")
for i in range(len(cars)):
    with Image.open(cars.path(i)) as im:
        if im.getexif().get(0x0112, 1) != 1: tagged += 1
print(f"images with an EXIF orientation other than 1: {tagged} of {len(cars)}")

# checkpoint: efficientnet_lite0 embedding model + AdamW state + 30-epoch history
from vericar.models import build_model
model = build_model("efficientnet_lite0", 256, pretrained=False)
opt = torch.optim.AdamW(model.parameters())
model(torch.rand(2, 3, 64, 64)).sum().backward(); opt.step()
hist = [{"epoch": e, "loss": 0.1 * e, "precision_at_1": np.float64(0.5)} for e in range(30)]
ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {}, "epoch": 30, "history": hist,
        "config": {"a": 1}, "model_config": {"backbone": "efficientnet_lite0"}}
d = Path(tempfile.mkdtemp())
t = time.perf_counter(); torch.save(ckpt, d / "plain.pt"); t_plain_save = time.perf_counter() - t
t = time.perf_counter(); save_checkpoint(ckpt, d / "safe.pt"); t_safe_save = time.perf_counter() - t
print(f"checkpoint {(d / 'safe.pt').stat().st_size / 2**20:.1f} MiB: save plain {t_plain_save*1000:.0f} ms, atomic+to_plain {t_safe_save*1000:.0f} ms")
for name, fn in (("torch.load weights_only=False", lambda: torch.load(d / "plain.pt", map_location="cpu", weights_only=False)),
                 ("load_checkpoint (weights_only=True)", lambda: load_checkpoint(d / "safe.pt"))):
    best = []
    for _ in range(5):
        t = time.perf_counter(); fn(); best.append(time.perf_counter() - t)
    print(f"{name}: {min(best)*1000:.0f} ms (best of 5)")
t = time.perf_counter(); load_checkpoint(d / "plain.pt"); print(f"load_checkpoint of an old checkpoint with numpy scalars: ok, {1000*(time.perf_counter()-t):.0f} ms")
