"""Dataset inference engine behind `predict_iter`, `fai-mf predict` and `fai-mf eval`.

Pipeline: the run's images (`fai_mf.sources.Entry`) are decoded by a `torch.utils.data.DataLoader`
(`workers` processes, so decoding overlaps the model), grouped into same-size batches, handed to a
processor (the model plus its post-processing), and come out one result per image, in input order.

Batching: images of one size run together, at most `batch` at a time; nothing is padded. Padding
would change the detections of the padded image (its border convolutions, the decoder's attention
over every position and the bilinear mask resize all see the padding), so a mixed-size input runs as
same-size groups instead. To stream results in input order with bounded memory, a partly filled group
waits for at most `GROUP_WINDOW * batch` later images; then it runs as it is.

An image that cannot be decoded (missing, unreadable, not an image, invalid) is not an exception: it
comes out as a failed result with the reason, and the run goes on.

Sharded, resumable output (`ShardedOutput`): under torchrun every process (rank) takes the images
`pending[rank::world]` of the images not yet done, appends one JSON line per image to its own part file
(flushed line by line, so a killed job loses at most the images in flight), and when every rank is
done rank 0 merges the parts into the requested output in input order, writing it to a temporary file
renamed into place. `--resume` reads what earlier runs wrote (the output and any parts) and runs only
the images without a successful record. The parts live in `OUT.parts/`, which every rank must see (one
filesystem for all nodes); a run checks that before any work.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .inputs import load_images
from .sources import Entry

logger = logging.getLogger(__name__)

GROUP_WINDOW = 4  # a partly filled size group runs once GROUP_WINDOW * batch later images have arrived
# A collective waits this long for the slowest rank (the final merge waits for every rank's whole shard).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
MAX_LISTED_FAILURES = 10


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------

@dataclass
class Decoded:
    """One decoded image: `position` in the run's entry list, `image` float32 [3, H, W] in 0..255 (None
    when decoding failed, then `error` says why), `decode_ms`, and what the loader added (`extras`)."""

    position: int
    entry: Entry
    image: torch.Tensor | None
    error: str | None = None
    decode_ms: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])


def load_image(entry: Entry) -> tuple[torch.Tensor, dict[str, Any]]:
    """The default loader: `fai_mf.inputs.load_images` of the entry's path or in-memory image."""
    loaded = load_images(entry.item)
    if len(loaded) != 1:
        raise ValueError(f"{entry.key}: expected one image, got {len(loaded)}")
    return loaded[0].tensor, {}


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class DecodeDataset(Dataset):
    """entries[i] -> `Decoded` via `load(entry) -> (image, extras)`; decode errors become failed items."""

    def __init__(self, entries: Sequence[Entry], load: Callable[[Entry], tuple[torch.Tensor, dict]] = load_image):
        self.entries = list(entries)
        self.load = load

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, position: int) -> Decoded:
        entry = self.entries[position]
        start = time.perf_counter()
        try:
            image, extras = self.load(entry)
        except DECODE_ERRORS as exc:
            return Decoded(position, entry, None, error=_reason(exc), decode_ms=(time.perf_counter() - start) * 1e3)
        return Decoded(position, entry, image, decode_ms=(time.perf_counter() - start) * 1e3, extras=extras)


def default_workers(images: int) -> int:
    """Decoding processes when none are asked for: none for a handful of images (starting workers costs
    more than it hides), else half the CPUs, at most 4."""
    return 0 if images < 16 else max(1, min(4, (os.cpu_count() or 2) // 2))


def _keep(item: Decoded) -> Decoded:  # DataLoader collate_fn (module level: workers pickle it)
    return item


# --------------------------------------------------------------------------------------------------
# Batching and the in-order stream
# --------------------------------------------------------------------------------------------------

@dataclass
class RunStats:
    """Counters of one `iterate` run: images done, failed ones, seconds blocked waiting for decoded images."""

    images: int = 0
    failed: int = 0
    detections: int = 0
    decode_wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first MAX_LISTED_FAILURES (key, reason)

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def count(self, item: Decoded, detections: int = 0) -> None:
        self.images += 1
        self.detections += detections
        if item.error is not None:
            self.failed += 1
            if len(self.failures) < MAX_LISTED_FAILURES:
                self.failures.append((item.entry.key, item.error))


def same_size_groups(items: Iterable[Decoded], batch: int, window: int) -> Iterator[list[Decoded]]:
    """Group decoded images of one (H, W) into lists of at most `batch`, in arrival order.

    A failed item is a group of its own. A group runs when full, or, once `window` images are waiting,
    the group holding the oldest of them runs as it is; what is left runs at the end, oldest first.
    """
    pending: dict[tuple[int, int], list[Decoded]] = {}
    waiting = 0
    for item in items:
        if item.error is not None:
            yield [item]
            continue
        group = pending.setdefault(item.size, [])
        group.append(item)
        waiting += 1
        if len(group) == batch:
            waiting -= len(pending.pop(item.size))
            yield group
        elif waiting >= window:
            oldest = min(pending, key=lambda size: pending[size][0].position)
            group = pending.pop(oldest)
            waiting -= len(group)
            yield group
    for size in sorted(pending, key=lambda size: pending[size][0].position):
        yield pending[size]


def _timed(iterable: Iterable[Decoded], stats: RunStats) -> Iterator[Decoded]:
    """Yield from `iterable`, adding the time spent waiting for each item to `stats.decode_wait_s`."""
    start = time.perf_counter()
    iterator = iter(iterable)  # starts the workers: waiting too
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            stats.decode_wait_s += time.perf_counter() - start
            return
        stats.decode_wait_s += time.perf_counter() - start
        yield item
        start = time.perf_counter()


def iterate(entries: Sequence[Entry], process: Callable[[list[Decoded]], list[Any]], batch: int = 1,
            workers: int | None = 0, load: Callable[[Entry], tuple[torch.Tensor, dict]] = load_image,
            stats: RunStats | None = None) -> Iterator[tuple[Decoded, Any]]:
    """(decoded image, result) for every entry, in entry order.

    process(group) -> one result per image of a same-size group (see `same_size_groups`); a failed
    image gets result None and its `error`. workers: decoding processes (0: decode in this process;
    None: `default_workers`).
    stats: filled in as the run goes (`RunStats.count` is left to the caller, who knows the results).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    workers = default_workers(len(entries)) if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    stats = stats if stats is not None else RunStats()
    loader = DataLoader(DecodeDataset(entries, load), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_keep, prefetch_factor=max(2, batch) if workers else None)
    ready: dict[int, tuple[Decoded, Any]] = {}
    next_position = 0
    for group in same_size_groups(_timed(loader, stats), batch, GROUP_WINDOW * batch):
        results = [None] if group[0].error is not None else process(group)
        if len(results) != len(group):
            raise RuntimeError(f"the processor returned {len(results)} results for {len(group)} images")
        for item, result in zip(group, results):
            ready[item.position] = (item, result)
        while next_position in ready:
            yield ready.pop(next_position)
            next_position += 1


# --------------------------------------------------------------------------------------------------
# JSON Lines record files
# --------------------------------------------------------------------------------------------------

def _drop_partial_line(path: Path) -> None:
    """Cut a last line that has no newline (a writer killed mid-line) off `path`."""
    with open(path, "rb+") as file:
        end = file.seek(0, os.SEEK_END)
        position, chunk = end, 1 << 16
        while position > 0:
            start = max(0, position - chunk)
            file.seek(start)
            data = file.read(position - start)
            newline = data.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        else:
            keep = 0
        if keep < end:
            file.truncate(keep)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file; an unfinished last line (a killed writer's) is ignored."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON record ({exc})") from exc
            if not isinstance(record, dict) or "path" not in record:
                raise ValueError(f"{path}:{number}: not a prediction record (no 'path')")
            records.append(record)
    return records


class RecordWriter:
    """Appends one JSON line per record to `path`, flushed at once (a kill loses no finished record)."""

    def __init__(self, path: Path, append: bool):
        if append and path.exists():
            _drop_partial_line(path)
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write `lines` to a temporary file next to `path`, then rename it into place (all or nothing)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            for line in lines:
                file.write(line)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_failure(record: dict[str, Any]) -> bool:
    return "error" in record


# --------------------------------------------------------------------------------------------------
# Sharded, resumable output
# --------------------------------------------------------------------------------------------------

class ShardedOutput:
    """The record stream of a (possibly torchrun-sharded) run into `records` (a JSON Lines file).

    Collective methods (`start`, `finish`) must be called by every rank. One process writes straight
    into `records` (in input order); several write `records.parts/rank-RRRRR.jsonl` and rank 0 merges.
    """

    def __init__(self, records: Path, resume: bool, device: torch.device):
        self.records = records
        self.parts = records.with_name(records.name + ".parts")
        self.resume = resume
        self.device = device
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.skipped = 0
        self._writer: RecordWriter | None = None
        self._merge_needed = self.world > 1

    @property
    def stream_path(self) -> Path:
        return self.records if self.world == 1 else self.parts / f"rank-{self.rank:05d}.jsonl"

    def _sources(self) -> list[Path]:
        """Every file records of this output may be in, oldest view first (parts override the output)."""
        found = [self.records] if self.records.is_file() else []
        if self.parts.is_dir():
            found += sorted(self.parts.glob("rank-*.jsonl"))
        return found

    def _done_keys(self) -> set[str]:
        done: set[str] = set()
        for path in self._sources():
            done.update(r["path"] for r in read_records(path) if not is_failure(r))
        return done

    def _check_shared_parts(self) -> None:
        """Every rank must see the parts folder rank 0 made (one filesystem for every node)."""
        token = distributed.broadcast_object(uuid.uuid4().hex if self.rank == 0 else None)
        if self.rank == 0:
            (self.parts / ".job").write_text(token)
        distributed.barrier()
        try:
            seen = (self.parts / ".job").read_text() == token
        except OSError:
            seen = False
        blind = int(distributed.all_reduce_sum(torch.tensor([0 if seen else 1], device=self.device)).item())
        if blind:
            raise OSError(f"{blind} of {self.world} processes cannot see {self.parts}: under torchrun the output "
                          "must be on a filesystem that every node shares")

    def start(self, entries: Sequence[Entry]) -> list[Entry]:
        """Collective: clear (or, resuming, read) earlier output; returns this rank's images to run."""
        if self.rank == 0:
            if self.resume:
                done = self._done_keys()
                self._merge_needed |= bool(self._sources())  # old records (or parts) are in the mix
            else:
                done = set()
                if self.parts.is_dir():
                    logger.info("removing %s of an earlier run (pass --resume to continue it)", self.parts)
                    shutil.rmtree(self.parts)
                self.records.unlink(missing_ok=True)
            if self.world > 1:
                self.parts.mkdir(exist_ok=True)
        else:
            done = None
        done = distributed.broadcast_object(done)
        self._merge_needed = bool(distributed.broadcast_object(self._merge_needed))
        if self.world > 1:
            self._check_shared_parts()
        pending = [e for e in entries if e.key not in done]
        self.skipped = len(entries) - len(pending)
        self._writer = RecordWriter(self.stream_path, append=self.resume)
        return pending[self.rank::self.world]

    def write(self, record: dict[str, Any]) -> None:
        self._writer.write(record)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def finish(self, entries: Sequence[Entry]) -> list[dict[str, Any]] | None:
        """Collective: wait for every rank; rank 0 returns the output's records in input order (others
        None), after merging the parts (and, resuming, the earlier output) into `records`."""
        self.close()
        distributed.barrier()
        if self.rank != 0:
            return None
        if not self._merge_needed:
            return read_records(self.records)
        merged = self._merge(entries)
        write_atomic(self.records, (json.dumps(r) + "\n" for r in merged))
        if self.parts.is_dir():
            shutil.rmtree(self.parts)
        return merged

    def _merge(self, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        best: dict[str, dict[str, Any]] = {}
        for path in self._sources():
            for record in read_records(path):
                previous = best.get(record["path"])
                if previous is None or is_failure(previous) or not is_failure(record):
                    best[record["path"]] = record  # a success beats a failure; otherwise the latest wins
        merged = [best[e.key] for e in entries if e.key in best]
        missing = len(entries) - len(merged)
        if missing:
            raise RuntimeError(f"merging {self.parts}: {missing} images have no record (a rank stopped early?)")
        extra = len(best) - len(merged)
        if extra:
            logger.info("%d records of images that are not among this run's inputs were left out", extra)
        return merged


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------

def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A tqdm bar (images/s, ETA) when stderr is a terminal, else a plain line every `interval` seconds.

    Only the process that owns it reports (rank 0 under torchrun: it shows its own shard)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, interval: float = 30.0):
        self.total, self.desc, self.interval = total, desc, interval
        self.enabled = enabled
        self.done = self.failed = 0
        self.started = self._last = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # optional: without it a terminal gets the plain periodic lines
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)

    def update(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        if self._bar is not None:
            if failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
            self._bar.update()
        elif self.enabled and time.perf_counter() - self._last >= self.interval:
            self._last = time.perf_counter()
            logger.info("%s", self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        share = f" {self.done / self.total:.1%}" if self.total else ""
        return (f"{self.desc}: {self.done}/{self.total} images{share}, {rate:.2f} img/s, {self.failed} failed, "
                f"ETA {_format_duration(eta) if eta == eta else '?'}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
