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
    """A storage at ``root`` that behaves as an object store does for cgc-ray: keys without folders, no exclusive
    create, no temporary file and rename."""
    storage = Storage(str(root))
    storage.fs, storage.posix = pafs.PyFileSystem(FlakyHandler(keys=True)), False
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


@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 in a child process, with a bucket: yields a storage URI under it.

    Needs ``moto[server]``; sets dummy AWS credentials in this process's environment.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="loopback", AWS_SECRET_ACCESS_KEY="loopback", AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.Popen([sys.executable, "-c", _S3_SERVER, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the moto S3 server did not start: pip install 'moto[server]'")
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://loopback?{query}&allow_bucket_creation=true")
        fs.create_dir("loopback")
        yield f"s3://loopback/{uuid.uuid4().hex[:8]}?{query}"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
