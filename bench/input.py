"""Throughput and memory of the streaming input pipeline (`dpft.data.stream`) on synthetic JPEGs.

    python -m bench.input --num-examples 10000 --steps 20 [--batch-size 256] [--image-size 224]
        [--workers W] [--output uint8|float32] [--content smooth|textured]
        [--cache-dir DIR]

Builds once (cached in ``--cache-dir``, default ``~/.cache/dpft/bench_input``) an ArrayRecord
file of N JPEGs with sides drawn from [150, 500] px and photo-like content (noise summed over
octaves, so it compresses like a photograph), then streams S Poisson batches (expected size B)
through the training transform (random-resized crop to the image size, flip; uint8 pixels,
which the trainer normalises on the device; ``--output float32`` normalises on the host) and
prints one JSON line:

* ``images_per_second``: sampled (mask 1) images per second of wall time after the first batch
  (the first includes starting the workers);
* ``images_per_cpu_second``: every streamed image per CPU second spent on the stream by this
  process (from the first batch on: starting the workers is left out) and its workers (from
  each one's first read of an example on, leaving out its imports and unpickling): the rate per
  core in the steady state, independent of what else runs on the machine; ``cpu_seconds_main`` and
  ``cpu_seconds_workers`` split it;
* ``decode_images_per_second``: full JPEG decode alone (PIL, to an RGB array) of the same files,
  per CPU second of this process (the mean of a measurement before and one after the stream, as
  other jobs on the machine slow both alike): the roof per core; ``ratio``:
  ``images_per_cpu_second`` over it. The pipeline decodes with OpenCV (its libjpeg-turbo build
  is faster than PIL's) and, for a crop box at least twice the output, at a reduced scale, so
  it can do less work per image than the roof: ``decode_cv2_images_per_second`` and
  ``ratio_cv2`` give OpenCV's full decode of the same files and the ratio to it;
* ``peak_rss_mb``: the peak over time of the summed RSS of this process and its worker processes
  (shared pages count once per process), ``peak_rss_main_mb`` of this process alone.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import pathlib
import shutil
import tempfile
import threading
import time

import cv2
import numpy as np
import psutil
from PIL import Image

from dpft.data.sources import ArrayRecordSource, write_array_record
from dpft.data.stream import StreamLoader, StreamSplit, default_workers
from dpft.data.transforms import ImageTransform
from dpft.privacy.sampling import PoissonSampler, poisson_batch_cap

# content -> ((cells across the image, amplitude) per octave, std of the pixel noise). At JPEG
# quality 90 'smooth' takes about 2 bits per pixel, 'textured' about 4 (finer detail).
CONTENTS = {
    "smooth": (((4, 1.0), (16, 0.5), (64, 0.25)), 4.0),
    "textured": (((4, 1.0), (16, 0.5), (64, 0.25), (256, 0.25)), 16.0),
}


def synthetic_jpeg(index: int, content: str = "smooth") -> tuple[bytes, int]:
    """A deterministic photo-like JPEG (sides in [150, 500]) and a label in [0, 1000)."""
    rng = np.random.default_rng([index, 0xBE1C])
    h, w = (int(v) for v in rng.integers(150, 501, 2))
    x = np.zeros((h, w, 3), np.float32)
    octaves, noise = CONTENTS[content]
    for cells, amp in octaves:
        octave = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        x += amp * np.asarray(octave.resize((w, h), Image.Resampling.BICUBIC), np.float32)
    x = x / sum(a for _, a in octaves) + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue(), int(rng.integers(0, 1000))


def build(path: pathlib.Path, n: int, workers: int, content: str = "smooth") -> None:
    """Writes the N synthetic JPEGs to ``path`` (made in ``workers`` grain processes)."""
    import grain

    from dpft.data.stream import _iterate

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    make = functools.partial(synthetic_jpeg, content=content)
    ds = grain.MapDataset.range(n).map(make).batch(64, batch_fn=list)
    it = _iterate(ds, workers, 2)
    try:
        write_array_record(tmp, (ex for chunk in it for ex in chunk))
    finally:
        it.close() if hasattr(it, "close") else None
    tmp.rename(path)


class PeakRss:
    """Samples the RSS and CPU time of this process and its children every 0.2 s, in a thread.

    ``cpu`` keeps the last CPU seconds seen of every process, so a worker that has exited (its
    part of the stream done) still counts. The list of children is refreshed once a second
    only: finding them scans every process of the machine, and a sampler that runs often slows
    the workers it measures.
    """

    def __init__(self, period: float = 0.2):
        self.total = self.main = 0
        self.cpu: dict[int, float] = {}
        self._me, self._children, self._found = psutil.Process(), [], -math.inf
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self._period):
            self.sample()

    def thread_cpu(self) -> float:
        """CPU seconds of the sampling thread (part of this process's, but not the stream's)."""
        return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))

    def sample(self, refresh: bool = False) -> None:
        """One sample now; ``refresh``: look for new children first."""
        if refresh or time.monotonic() - self._found > 1.0:
            self._children = self._me.children(recursive=True)
            self._found = time.monotonic()
        main = total = 0
        for proc in [self._me, *self._children]:
            try:
                with proc.oneshot():
                    rss, cpu = proc.memory_info().rss, sum(proc.cpu_times()[:2])
            except psutil.Error:
                continue
            main = main or rss
            total += rss
            self.cpu[proc.pid] = cpu
        self.main, self.total = max(self.main, main), max(self.total, total)

    def stop(self):
        self._stop.set()
        self._thread.join()


class FirstReadCpu:
    """``source`` that writes, in each process, its CPU seconds at its first read to DIR/PID."""

    def __init__(self, source, directory: pathlib.Path):
        self.source, self.directory, self._seen = source, directory, False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_seen": False}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if not self._seen:
            self._seen = True
            (self.directory / str(os.getpid())).write_text(repr(time.process_time()))
        return self.source[index]


def workers_cpu(rss: PeakRss, directory: pathlib.Path) -> float:
    """CPU seconds of the worker processes since their first read (their latest samples)."""
    pids = [int(f.name) for f in directory.iterdir() if int(f.name) != os.getpid()]
    return sum(rss.cpu[p] - float((directory / str(p)).read_text()) for p in pids)


def decode_rate(source: ArrayRecordSource, count: int, library: str = "pil") -> float:
    """Full JPEG decodes per CPU second (to an RGB array) of the first records, one core."""
    blobs = [source[i]["image"] for i in range(min(count, len(source)))]
    t = time.process_time()
    for b in blobs:
        if library == "pil":
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        else:
            cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB)
    return len(blobs) / (time.process_time() - t)


def decode_rates(source: ArrayRecordSource, count: int) -> dict[str, float]:
    cv2.setNumThreads(1)  # as in the workers
    return {lib: decode_rate(source, count, lib) for lib in ("pil", "cv2")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-examples", type=int, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=-1, help="-1: one per core")
    p.add_argument("--output", choices=("uint8", "float32"), default="uint8")
    p.add_argument("--content", choices=sorted(CONTENTS), default="smooth")
    p.add_argument("--decode-samples", type=int, default=300)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/dpft/bench_input"))
    a = p.parse_args(argv)
    if a.num_examples < a.batch_size or a.steps < 2:
        p.error("--num-examples must be >= --batch-size and --steps >= 2")
    workers = default_workers() if a.workers == -1 else a.workers
    path = pathlib.Path(a.cache_dir) / f"jpeg_{a.content}_{a.num_examples}.array_record"
    if not path.exists():
        build(path, a.num_examples, max(workers, 1), a.content)
    source = ArrayRecordSource(str(path), what=str(path))
    before = decode_rates(source, a.decode_samples)
    first_reads = pathlib.Path(tempfile.mkdtemp(prefix="bench_input_"))
    split = StreamSplit(
        FirstReadCpu(source, first_reads),
        ImageTransform("imagenet", a.image_size, train=True),
        1000,
        num_workers=workers,
        output=a.output,
    )
    q = a.batch_size / a.num_examples
    sampler = PoissonSampler(a.num_examples, q, 0, poisson_batch_cap(a.num_examples, q))
    split.example_pixels  # noqa: B018 - example 0 read before the clock starts
    rss = PeakRss()
    images, wall_images, t0, main_start = 0, 0, None, None

    def main_cpu() -> float:  # this process's CPU seconds, less the sampling thread's
        return time.process_time() - rss.thread_cpu()

    with StreamLoader(split, sampler, 0, a.steps) as loader:
        for step, _, mask in loader:
            images += int(mask.sum())
            if step == 0:  # after the workers started
                t0, main_start = time.perf_counter(), main_cpu()
            else:
                wall_images += int(mask.sum())
        seconds = time.perf_counter() - t0
        main_end = main_cpu()
        rss.sample(refresh=True)  # every step consumed: the workers are done
    rss.stop()
    cpu_workers = workers_cpu(rss, first_reads)
    cpu_main = main_end - main_start
    shutil.rmtree(first_reads, ignore_errors=True)
    cpu = cpu_main + cpu_workers
    after = decode_rates(source, a.decode_samples)
    roof, roof_cv2 = ((before[k] + after[k]) / 2 for k in ("pil", "cv2"))
    ips = wall_images / seconds
    per_core = images / cpu
    result = {
        "num_examples": a.num_examples,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "padded_batch": sampler.max_batch_size,
        "image_size": a.image_size,
        "workers": workers,
        "output": a.output,
        "content": a.content,
        "images_per_second": round(ips, 1),
        "images_per_cpu_second": round(per_core, 1),
        "decode_images_per_second": round(roof, 1),
        "ratio": round(per_core / roof, 3),
        "decode_cv2_images_per_second": round(roof_cv2, 1),
        "ratio_cv2": round(per_core / roof_cv2, 3),
        "cpu_seconds_main": round(cpu_main, 2),
        "cpu_seconds_workers": round(cpu_workers, 2),
        "peak_rss_mb": round(rss.total / 2**20, 1),
        "peak_rss_main_mb": round(rss.main / 2**20, 1),
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "mean_kb": round(path.stat().st_size / 2**10 / a.num_examples, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
