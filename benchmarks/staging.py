"""Staging rate of a data root given as a URI: ``file://`` archives and a folder into the node's cache.

Writes ``--files`` files of ``--kb`` kB of random bytes (ImageNet's mean JPEG is ~110 kB; random bytes
do not compress, as JPEGs barely do) into a source folder, packs it as ``.tar`` and ``.tar.zst``, and
stages each (``cgc_ray.data.staging.staged_root``: read, extract, verify, rename) into a fresh cache on
the same disk, timing each. MB/s is source bytes read per second of wall time, the same figure the
staging's own progress lines print, and per CPU-second of this process (what a node's cores bound
when its disk and network are fast); GNU ``tar -xf`` of the same ``.tar`` is the reference for
what the disk allows. It measures this machine's local disk and CPU (tar extraction in
Python, zstd decompression); from S3 a node reads one archive as one stream, so there the network
bound is the slower of the two.

    python benchmarks/staging.py                      # 5,000 x 100 kB = 500 MB
    python benchmarks/staging.py --files 500 --json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from cgc_ray.data import staging


def _write_source(folder: Path, files: int, kb: int) -> int:
    """``files`` random files in 100 class folders (ImageNet's shape); their total bytes."""
    for i in range(files):
        d = folder / "train" / f"n{i % 100:08d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:06d}.JPEG").write_bytes(os.urandom(kb * 1000))
    return files * kb * 1000


def _pack(folder: Path, path: Path, codec: str | None) -> Path:
    out = pa.CompressedOutputStream(str(path), codec) if codec else open(path, "wb")
    with out, tarfile.open(fileobj=out, mode="w|") as tar:
        tar.add(folder / "train", arcname="train")
    return path


def _cpu_s() -> float:
    """CPU seconds of this process, all its threads, user and system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _stage(uri: str, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    start, cpu = time.perf_counter(), _cpu_s()
    staged = staging.staged_root(uri, cache)
    seconds, cpu = time.perf_counter() - start, _cpu_s() - cpu
    marker = json.loads((staged / staging.MARKER).read_text())
    read = os.path.getsize(uri.removeprefix("file://")) if uri.endswith(tuple(staging.ARCHIVES)) else marker["bytes"]
    out = {"uri": uri.rsplit("/", 1)[-1], "files": marker["files"], "bytes_read": read, "seconds": round(seconds, 2),
           "MB_per_s": round(read / 1e6 / seconds, 1), "cpu_s": round(cpu, 2),
           "MB_per_cpu_s": round(read / 1e6 / cpu, 1)}
    shutil.rmtree(cache)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--kb", type=int, default=100, help="size of each file, kB")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        total = _write_source(tmp / "source", args.files, args.kb)
        sources = [_pack(tmp / "source", tmp / "data.tar", None).as_uri(),
                   _pack(tmp / "source", tmp / "data.tar.zst", "zstd").as_uri(),
                   (tmp / "source").as_uri()]
        rows = [_stage(uri, tmp / "cache") for uri in sources]
        if shutil.which("tar"):  # the disk's own bound: GNU tar extracting the same archive, no verification
            (tmp / "gnu").mkdir()
            start = time.perf_counter()
            subprocess.run(["tar", "-xf", str(tmp / "data.tar"), "-C", str(tmp / "gnu")], check=True)
            seconds = time.perf_counter() - start
            size = os.path.getsize(tmp / "data.tar")
            rows.append({"uri": "GNU tar -x", "files": args.files, "bytes_read": size, "seconds": round(seconds, 2),
                         "MB_per_s": round(size / 1e6 / seconds, 1), "cpu_s": None, "MB_per_cpu_s": None})
    if args.json:
        print(json.dumps({"files": args.files, "bytes": total, "cpus": os.cpu_count(), "rows": rows}))
    else:
        print(f"{args.files} files x {args.kb} kB = {total / 1e6:.0f} MB, {os.cpu_count()} CPUs", file=sys.stderr)
        for r in rows:
            cpu = f"  {r['MB_per_cpu_s']:7.1f} MB per CPU-second" if r["cpu_s"] else ""
            print(f"{r['uri']:>14}: {r['seconds']:6.2f} s  {r['MB_per_s']:7.1f} MB/s{cpu}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
