"""The web app and its JSON API: answers equal CarIdentifier's, bad input gets a clear 4xx, added cars persist."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vericar.app import create_app  # noqa: E402
from vericar.identify import ADDED_FILE, IdentifyService, recipe_config  # noqa: E402
from vericar.predict import CarIdentifier  # noqa: E402
from vericar.study import PROFILES, PROJECT_ROOT  # noqa: E402


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tiny_open_world_run):
    return tiny_open_world_run


@pytest.fixture(scope="module")
def client(tiny_run):
    service = IdentifyService.from_run(tiny_run.path, backend="torch", max_bytes=200_000)
    with TestClient(create_app(service)) as c:
        yield c


def photos(cars, rows) -> list[tuple[str, bytes]]:
    return [(f"car{r}.jpg", encode(cars.image(int(r)))) for r in rows]


def files(items, field="photos"):
    return [(field, (name, data, "image/jpeg")) for name, data in items]


def test_identify_answers_equal_car_identifier(client, tiny_run, synthcars_tiny):
    items = photos(synthcars_tiny, [*tiny_run.split.query[:3], *tiny_run.split.ood_query[:2]])
    response = client.post("/identify", files=files(items))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = CarIdentifier.from_run(tiny_run, synthcars_tiny).identify(
        [Image.open(io.BytesIO(data)) for _, data in items])
    assert [r["filename"] for r in results] == [name for name, _ in items]
    assert [r["class_name"] for r in results] == list(expected["class_name"])
    for r, (_, e) in zip(results, expected.iterrows()):
        for level in ("make", "type", "model", "year"):
            assert r["levels"][level]["answer"] == e[level]
            assert r["levels"][level]["confidence"] == pytest.approx(e[f"{level}_confidence"], abs=1e-6)
        assert r["known"] == bool(e["known"]) and r["score"] == pytest.approx(e["score"], abs=1e-5)
        assert len(r["neighbours"]) == 5 and r["neighbours"][0]["thumbnail"].startswith("data:image/jpeg;base64,")
        distances = [n["distance"] for n in r["neighbours"]]
        assert distances == sorted(distances) and distances[0] == pytest.approx(-r["score"], abs=1e-5)


def test_health_and_openapi(client, tiny_run):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["database_size"] == len(tiny_run.split.database)
    assert health["backend"] == "torch" and health["image_size"] == 32
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/identify", "/cars", "/health"} <= set(paths)
    assert client.get("/").text.count('id="identify-form"') == 1


def big_image() -> bytes:
    return encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 megapixels, a few KB


@pytest.mark.parametrize("name, data, status, message", [
    ("text.jpg", b"this is not an image", 422, "not an image"),
    ("empty.jpg", b"", 422, "empty"),
    ("truncated.jpg", None, 422, "truncated"),
    ("huge.jpg", bytes(300_000), 413, "over the upload limit"),
    ("10000x10000.png", "big", 413, "10000 x 10000"),
])
def test_bad_photos_get_a_clear_4xx(client, synthcars_tiny, name, data, status, message):
    if data is None:
        full = encode(synthcars_tiny.image(0).resize((256, 256)))
        data = full[: len(full) // 2]
    elif data == "big":
        data = big_image()
    response = client.post("/identify", files=files([(name, data)]))
    assert response.status_code == status, response.text
    assert message in response.json()["detail"] and name in response.json()["detail"]
    assert client.get("/health").status_code == 200  # nothing broken


def test_missing_fields_are_422(client):
    assert client.post("/identify").status_code == 422
    assert client.post("/cars", data={"name": "Zentra Volo Sedan 2013"}).status_code == 422
    assert client.post("/cars", files=files([("a.jpg", b"x")])).status_code == 422


def test_bad_new_cars_are_refused(client, tiny_run, synthcars_tiny):
    good = photos(synthcars_tiny, tiny_run.split.ood_database[:1])
    existing = synthcars_tiny.hierarchy["class_name"].iloc[0]
    cases = [({"name": "   "}, good, 422, "needs a name"),
             ({"name": "Zentra Volo Sedan 2013"}, [("a.jpg", b"junk"), ("b.jpg", b"")], 422, "no usable photo"),
             ({"name": existing}, good, 409, "already in the database"),
             ({"name": "Zentra"}, good, 422, "cannot parse")]
    size = client.get("/health").json()["database_size"]
    for form, items, status, message in cases:
        response = client.post("/cars", data=form, files=files(items))
        assert response.status_code == status and message in response.json()["detail"], response.text
    assert client.get("/health").json()["database_size"] == size


def test_unknown_car_added_then_recognised_and_persisted(tiny_run, synthcars_tiny, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.path, run_dir)
    cars, split = synthcars_tiny, tiny_run.split
    held_out = cars.labels[split.ood_database[0]]
    rows = split.ood_database[cars.labels[split.ood_database] == held_out][:5]
    shots = photos(cars, rows)
    service = IdentifyService.from_run(run_dir, backend="torch", persist=True)
    with TestClient(create_app(service)) as client:
        response = client.post("/cars", data={"name": "Lumen Arko Wagon 2014"},
                               files=files([*shots, ("junk.jpg", b"junk")]))
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["photos"] == 5 and body["skipped"][0]["filename"] == "junk.jpg"
        assert body["database_size"] == len(split.database) + 5
        again = client.post("/identify", files=files(shots[:1])).json()["results"][0]
    assert again["neighbours"][0]["class_name"] == "Lumen Arko Wagon 2014"
    assert again["neighbours"][0]["distance"] < 1e-3 and again["known"]
    assert (run_dir / ADDED_FILE).is_file() and not list(run_dir.glob("*.tmp"))
    restarted = IdentifyService.from_run(run_dir, backend="torch")
    assert restarted.health()["added_photos"] == 5
    assert restarted.identify([Image.open(io.BytesIO(shots[0][1]))])[0]["neighbours"][0]["class_name"] == \
        "Lumen Arko Wagon 2014"


def test_recipe_is_read_from_the_profiles():
    config, params = recipe_config("full", "official")
    chosen = PROFILES["full"]["per_notebook"]["03"]
    assert config.protocol == "official" and params["dataset"] == "stanford_cars"
    for key, value in chosen.items():
        if hasattr(config, key):
            assert getattr(config, key) == value, key


def test_a_shorter_identifier_gets_its_own_run_folder(monkeypatch):
    """`make identifier` trains fewer epochs than the recipe: never into notebook 03's folder."""
    from vericar import identify
    recipe = recipe_config("full", "official")[0].epochs
    assert identify.recipe_run_dir("full", "official").name == "official"
    assert identify.recipe_run_dir("full", "official", recipe).name == "official"
    assert identify.recipe_run_dir("full", "official", recipe // 2).name == f"official-e{recipe // 2}"
    size = recipe_config("full", "official")[0].image_size
    assert identify.recipe_run_dir("full", "official", 10, size - 32).name == f"official-e10-{size - 32}px"
    assert identify.recipe_run_dir("full", "official", None, size - 32).name == f"official-e{recipe}-{size - 32}px"
    assert identify.recipe_run_dir("full", "official", None, size).name == "official"
    trained = {}

    def fake_train(cars, config, out, progress=True):
        trained.update(config=config, out=out)
        raise SystemExit  # stop before the (real) training summary

    monkeypatch.setattr(identify, "train", fake_train)
    monkeypatch.setattr("vericar.data.open_dataset", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        identify.train_identifier("full", data_dir=PROJECT_ROOT, epochs=3)  # the default protocol: seed
    assert trained["config"].epochs == 3 and trained["out"].name == "seed-e3"
    assert trained["config"].protocol == "seed"
    with pytest.raises(SystemExit):
        identify.train_identifier("full", data_dir=PROJECT_ROOT, epochs=10, image_size=160)  # make identifier's
    assert (trained["config"].epochs, trained["config"].image_size, trained["out"].name) == (10, 160, "seed-e10-160px")
    with pytest.raises(ValueError, match="at least 1"):
        identify.train_identifier("full", "official", data_dir=PROJECT_ROOT, epochs=0)


def test_load_20_clients_x_10_requests_without_errors(tiny_run, tmp_path):
    """Bounded load on localhost; p50/p95 latency go to benchmarks/results/app_load_test.json (when publishing)."""
    from conftest import artifact_path, load_script
    bench = load_script("benchmarks/bench_app.py")
    service = IdentifyService.from_run(tiny_run.path, backend="torch")
    app = create_app(service)
    result = bench.load_test(app, bench.query_photos(service, tiny_run), clients=20, requests=10)
    bench.write(result, artifact_path("benchmarks/results/app_load_test.json", tmp_path), command="pytest tests/test_app.py -k load", backbone="tiny_cnn",
                image_size=32, note="the test suite's tiny model: latency of the app machinery, not of a real model")
    assert result["requests"] == 200 and result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["max_ms"]
    assert result["largest_batch"] > 1  # requests that waited together were embedded as one batch
    assert result["health_probe_p95_ms"] is not None


def test_default_run_is_the_newest_real_one(tmp_path):
    import json
    import os

    from vericar.identify import default_run, find_runs

    def fake(path, dataset, mtime):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"dataset": dataset}))
        for name in ("metrics.json", "embeddings.npz"):
            (path / name).write_text("{}")
        os.utime(path / "metrics.json", (mtime, mtime))

    fake(tmp_path / "a" / "models" / "official", "Stanford Cars 196", 1_000)
    fake(tmp_path / "b" / "models" / "official", "Stanford Cars 196", 2_000)
    fake(tmp_path / "c" / "models" / "official", "SynthCars", 3_000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text("{}")  # not a run: no embeddings
    assert find_runs([tmp_path])[0] == tmp_path / "c" / "models" / "official" and len(find_runs([tmp_path])) == 3
    run, note = default_run([tmp_path])
    assert run == tmp_path / "b" / "models" / "official" and "real-data" in note


def test_python_m_vericar_app_serves_a_run(tiny_run):
    """The command itself: start it on a free port, read /health, stop it."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import PROJECT_ROOT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vericar.app", "--run", str(tiny_run.path), "--port", str(port),
                             "--backend", "onnx"], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline, health = time.monotonic() + 240, None  # imports alone take minutes on a busy machine
        while health is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5))
            except OSError:
                time.sleep(0.3)
        assert health is not None, f"the app did not answer: {proc.stdout.read() if proc.poll() is not None else ''}"
        assert health["backend"] == "onnx" and health["run"] == str(tiny_run.path)
        assert f"serving {tiny_run.path}" in health["note"]
    finally:
        proc.terminate()
        proc.wait(30)
