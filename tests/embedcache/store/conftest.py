"""Fixtures of the store tests: a real S3-protocol server on loopback (moto's server mode)."""

from __future__ import annotations

import logging
import socket

import pytest

BUCKET = "lab"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port with bucket ``lab``; AWS_* variables point every client
    (this process's and Dask workers started while it runs) at it. Yields an s3fs file system."""
    pytest.importorskip("s3fs", reason="s3fs is a dependency; install the project")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto's backends live in this process, shared by every server it starts: forget the buckets an
    # earlier test module left (moto's documented reset endpoint)
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")).close()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    import s3fs

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()
