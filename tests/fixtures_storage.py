"""Storage with faults, on real files: reads that fail (an S3 timeout), writes that fail (a full disk), an
object store's semantics (no exclusive create, no rename) over a local folder, and a loopback S3 server."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from cgc_ray.storage import Storage


class FlakyHandler(pafs.FileSystemHandler):
    """The local filesystem, except that reading a path containing ``match`` fails ``fails`` times (then works).

    With ``keys``, a file is written as an object store writes a key: its folders need not exist.
    """

    def __init__(self, match: str = "", fails: int = 0, keys: bool = False):
        self.fs, self.match, self.fails, self.keys = pafs.LocalFileSystem(), match, fails, keys

    def _read(self, path: str) -> None:
        if self.match in path and self.fails > 0:
            self.fails -= 1
            raise OSError(errno.ETIMEDOUT, "simulated read timeout", path)

    def open_input_stream(self, path):
        self._read(path)
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self._read(path)
        return self.fs.open_input_file(path)

    # everything else is the local filesystem's
    def get_type_name(self):
        return "flaky-local"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not on a test filesystem")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        if self.keys:
            self.fs.create_dir(path.rpartition("/")[0], recursive=True)
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


def flaky_storage(root, match: str, fails: int) -> tuple[Storage, FlakyHandler]:
    """A posix storage at ``root`` whose reads of paths containing ``match`` fail ``fails`` times."""
    storage = Storage(str(root))
    handler = FlakyHandler(match, fails)
    storage.fs = pafs.PyFileSystem(handler)
    return storage, handler


def object_store(root) -> Storage:
    """A storage at ``root`` that behaves as an object store without conditional writes does for cgc-ray: keys
    without folders, no exclusive create, no temporary file and rename."""
    storage = Storage(str(root))
    storage.fs, storage.posix, storage.exclusive = pafs.PyFileSystem(FlakyHandler(keys=True)), False, False
    return storage


def full_disk_for_claims(monkeypatch) -> None:
    """Every write of a claim file fails with ENOSPC (heartbeats, small writes, still get through)."""
    def no_space(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    real_write_bytes = Storage.write_bytes

    def write_bytes(self, path, data):
        if "/_drivers/" not in path:
            no_space(self, path)
        return real_write_bytes(self, path, data)

    monkeypatch.setattr(Storage, "write_bytes", write_bytes)
    monkeypatch.setattr(Storage, "create_exclusive", no_space)


def kill(driver) -> None:
    """``driver`` (a :class:`~cgc_ray.runner.leases.Leases`) stops beating and its process is gone: a killed command."""
    driver._stop.set()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    beat = Path(driver.dir) / "_drivers" / f"{driver.driver}.json"
    beat.write_text(json.dumps({**json.loads(beat.read_text()), "pid": int(dead.stdout)}))


# moto 5.2.1 answers CompleteMultipartUpload with the root tag CompleteMultipartUploadResponse where S3 says
# CompleteMultipartUploadResult (getmoto/moto#10055): pyarrow checks it, retries, then fails every write.
_S3_SERVER = r"""
import sys
from moto.s3.responses import S3Response
from moto.server import ThreadedMotoServer

real = S3Response._key_response_post

def root_tag_as_s3_says(self, *args, **kwargs):
    status, headers, body = real(self, *args, **kwargs)
    if isinstance(body, bytes):
        body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
    elif isinstance(body, str):
        body = body.replace("CompleteMultipartUploadResponse", "CompleteMultipartUploadResult")
    return status, headers, body

S3Response._key_response_post = root_tag_as_s3_says
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()  # until the caller closes its end
server.stop()
"""


# Dummy keys: moto accepts any (until LoopbackS3.auth turns its checking on). Ray's workers inherit the environment
# Ray started with, so a test module whose trials reach the server sets them when it is collected.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "loopback", "AWS_SECRET_ACCESS_KEY": "loopback", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class LoopbackS3:
    """A running loopback S3 server (:func:`loopback_s3_server`) holding one bucket."""

    port: int
    bucket: str = "loopback"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, prefix: str | None = None, *, region: bool = False) -> str:
        """A storage URI under a fresh prefix, as a MinIO user writes it: the endpoint in the URI (with ``region``,
        the region too)."""
        query = f"endpoint_override=127.0.0.1:{self.port}&scheme=http" + ("&region=us-east-1" if region else "")
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:8]}?{query}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` in the bucket, listed by boto3 (not by the pyarrow under test)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{prefix}/")
        return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", []))

    def auth(self, on: bool) -> None:
        """Make the server check credentials (it knows none, so it refuses every request, as S3 refuses bad keys)."""
        import urllib.request

        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()


@contextlib.contextmanager
def loopback_s3_server() -> Iterator[LoopbackS3]:
    """A moto S3 server on 127.0.0.1 in a child process, with a bucket.

    Needs ``moto[server]``; sets :data:`CREDENTIALS` in this process's environment.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(CREDENTIALS)
    proc = subprocess.Popen([sys.executable, "-c", _S3_SERVER, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the moto S3 server did not start: pip install 'moto[server]'")
        server = LoopbackS3(port)
        fs, _ = pafs.FileSystem.from_uri(f"{server.uri('x', region=True)}&allow_bucket_creation=true")
        fs.create_dir(server.bucket)
        yield server
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    """A loopback S3 server (:func:`loopback_s3_server`): yields a storage URI under a fresh prefix there."""
    with loopback_s3_server() as server:
        yield server.uri(region=True)
