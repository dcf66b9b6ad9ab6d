"""Identify a car from a photo in the browser, or through a JSON API.

    python -m vericar.app --run runs/full/models/official [--host 127.0.0.1] [--port 8000] [--persist]
    python -m vericar.app                      # the newest real-data run found, else the SynthCars demo run

One page (plain HTML + JavaScript) at ``/``: upload photos, get per photo the answer per level (make, type,
model, year) with its confidence, the unknown-car flag with its KNN+ score and threshold, and the 5 nearest
database images. A second form adds a new car (name + photos) to the database without retraining, in memory,
and with ``--persist`` also to ``<run>/added_cars.npz`` (written atomically, reloaded at the next start).

JSON API (OpenAPI page at ``/docs``): ``POST /identify`` (multipart ``photos``), ``POST /cars`` (multipart
``name`` + ``photos``), ``GET /health``. The model is loaded once; decoding and inference run off the event
loop, and identification requests that wait together are embedded as one batch.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from .identify import MAX_UPLOAD_BYTES, BadInput, IdentifyService, default_run

PAGE = Path(__file__).with_name("app_page.html")


class Batcher:
    """Runs the service on one worker thread; identification requests queued together form one batch."""

    def __init__(self, service: IdentifyService, max_batch: int = 32) -> None:
        self.service, self.max_batch = service, max_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vericar-inference")
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.batches: list[int] = []  # photos per batch run (the load test reads it)

    def _ensure_worker(self) -> asyncio.Queue:
        """The queue of the running event loop, with its worker task (started on first use in each loop)."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done() or self.worker.get_loop() is not loop:
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._run())
        return self.queue

    async def identify(self, images) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self._ensure_worker().put((images, future))
        return await future

    async def call(self, fn, *args):
        """Run ``fn`` on the inference thread (serialised with identification: the database is not shared)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty() and sum(len(i[0]) for i in items) < self.max_batch:
                items.append(self.queue.get_nowait())
            images = [im for batch, _ in items for im in batch]
            self.batches.append(len(images))
            try:
                answers = await self.call(self.service.identify, images)
            except Exception as err:  # noqa: BLE001 - handed to every waiting request
                for _, future in items:
                    if not future.done():
                        future.set_exception(err)
                continue
            start = 0
            for batch, future in items:
                if not future.done():
                    future.set_result(answers[start:start + len(batch)])
                start += len(batch)


def create_app(service: IdentifyService, *, max_batch: int = 32, max_files: int = 20) -> FastAPI:
    """The web app around a loaded :class:`~vericar.identify.IdentifyService`."""
    app = FastAPI(title="vericar: identify a car",
                  description="Make, type, model and year of a car from a photo, K-NN retrieval over a trained "
                              "embedding; KNN+ flags cars that are in no database; new cars are added without "
                              "retraining.")
    batcher = Batcher(service, max_batch)
    app.state.service, app.state.batcher = service, batcher
    max_request = service.max_bytes * max_files + 1_000_000

    @app.middleware("http")
    async def limit_request_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_request:
            return JSONResponse({"detail": f"request of {int(length) / 1e6:.1f} MB is over the limit of "
                                           f"{max_request / 1e6:.1f} MB ({max_files} photos of at most "
                                           f"{service.max_bytes / 1e6:.1f} MB)"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, err: BadInput):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    async def read_photos(photos: list[UploadFile], skip_bad: bool = False) -> tuple[list, list[dict]]:
        if len(photos) > max_files:
            raise BadInput(f"{len(photos)} photos in one request; send at most {max_files}", status=413)
        images, skipped = [], []
        for i, photo in enumerate(photos):
            name = photo.filename or f"photo {i + 1}"
            data = await photo.read(service.max_bytes + 1)
            try:
                images.append((name, await asyncio.to_thread(service.decode, data, name)))
            except BadInput as err:
                if not skip_bad:
                    raise
                skipped.append({"filename": name, "reason": str(err)})
        return images, skipped

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> dict:
        """The served run, dataset, inference backend, database size and KNN+ threshold."""
        return service.health()

    @app.post("/identify")
    async def identify(photos: list[UploadFile] = File(..., description="one or more car photos")) -> dict:
        """Per photo: answer per level with confidence, unknown flag (KNN+ score vs threshold), 5 nearest images."""
        images, _ = await read_photos(photos)
        answers = await batcher.identify([im for _, im in images])
        return {"results": [{"filename": name, **a} for (name, _), a in zip(images, answers)]}

    @app.post("/cars", status_code=201)
    async def add_car(name: str = Form(..., description="'Make Model Body Year', e.g. 'Zentra Volo Sedan 2013'"),
                      photos: list[UploadFile] = File(..., description="photos of the new car (5 is plenty)")) -> dict:
        """Add a new car to the database from photos, without retraining (unreadable photos are skipped)."""
        images, skipped = await read_photos(photos, skip_bad=True)
        if not images:
            reasons = "; ".join(s["reason"] for s in skipped)
            raise BadInput(f"no usable photo of the new car ({reasons})")
        added = await batcher.call(service.add_car, name, [im for _, im in images])
        return {**added, "skipped": skipped}

    return app


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Serve ``app`` with uvicorn on a background thread (``port`` 0: a free one); yields the base URL."""
    import uvicorn

    # keep-alive longer than uvicorn's 5 s: under load a pooled connection may idle that long between requests,
    # and a client racing the server's close would see a reset connection
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_keep_alive=60))
    thread = threading.Thread(target=server.run, daemon=True, name="vericar-app")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the app did not start on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vericar.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run folder (default: the newest real-data run, else SynthCars)")
    parser.add_argument("--data-dir", help="the dataset the run was trained on (default: from its config.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--persist", action="store_true", help="also save added cars into the run folder")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "torch-bf16", "onnx"],
                        help="inference backend; auto: the fastest whose embeddings match torch float32")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20)
    args = parser.parse_args(argv)
    import uvicorn

    note = f"serving {args.run}"
    run = Path(args.run) if args.run else None
    if run is None:
        run, note = default_run()
    service = IdentifyService.from_run(run, data_dir=args.data_dir, backend=args.backend, persist=args.persist,
                                       max_bytes=int(args.max_upload_mb * 2**20))
    service.note = note
    h = service.health()
    print(f"[vericar.app] {note}\n[vericar.app] {h['dataset']}, {h['database_size']} database images of "
          f"{h['classes']} classes, backend {h['backend']}; open http://{args.host}:{args.port}/ "
          f"(API: /docs)", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
