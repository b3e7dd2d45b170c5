"""Downloading CIFAR-10 from a local HTTP server: success, corrupt, cut or unsafe archives,
folders that do not exist, and processes killed mid-download or mid-unpack (the test-only
``KLAYER_FAULT`` hook of :mod:`klayer.data.locate`)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from klayer import cli, data
from klayer.data import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


FAKE_TARBALL = make_tarball(
    {f"{data.PY_FOLDER}/{n}": n.encode() for n in data.BATCH_NAMES + ("batches.meta",)}
)
FAKE_MD5 = hashlib.md5(FAKE_TARBALL).hexdigest()
ROUTES = {
    "/ok": FAKE_TARBALL,
    "/cut": FAKE_TARBALL,  # announced in full, but only half is sent
    "/evil": make_tarball(  # a member outside the folder
        {f"{data.PY_FOLDER}/{n}": b"x" for n in data.BATCH_NAMES} | {"../escaped": b"x"}
    ),
    "/nofolder": make_tarball({"readme.txt": b"x"}),
}


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 serving ROUTES. Yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ROUTES.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if self.path == "/cut" else body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_success(tmp_path, server):
    seen = []
    (tmp_path / "root").mkdir()
    folder = data.ensure_cifar10(
        tmp_path / "root", url=server + "/ok", md5=FAKE_MD5,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert folder == tmp_path / "root" / data.PY_FOLDER
    assert (folder / "data_batch_1").read_bytes() == b"data_batch_1"
    assert os.listdir(tmp_path / "root") == [data.PY_FOLDER]  # no temporary files left
    assert seen[-1] == (len(FAKE_TARBALL), len(FAKE_TARBALL))
    # found now: no second download (the URL would fail)
    assert data.ensure_cifar10(tmp_path / "root", url=server + "/missing") == folder


def test_download_into_an_empty_batches_folder(tmp_path, server):
    folder = tmp_path / data.PY_FOLDER
    folder.mkdir()
    assert data.download_target(folder) == folder
    got = data.ensure_cifar10(folder, url=server + "/ok", md5=FAKE_MD5, progress=False)
    assert got == folder and (folder / "test_batch").is_file()
    assert os.listdir(tmp_path) == [data.PY_FOLDER]


def test_download_md5_mismatch_leaves_nothing(tmp_path, server):
    with pytest.raises(DataError, match="md5"):
        data.ensure_cifar10(tmp_path, url=server + "/ok", md5="0" * 32, progress=False)
    assert os.listdir(tmp_path) == []
    assert data.find_data_dir(tmp_path) is None


def test_interrupted_download_leaves_nothing_and_retry_works(tmp_path, server):
    with pytest.raises(DataError, match=r"interrupted: received \d+ of \d+ bytes"):
        data.ensure_cifar10(tmp_path, url=server + "/cut", md5=FAKE_MD5, progress=False)
    assert os.listdir(tmp_path) == []
    folder = data.ensure_cifar10(tmp_path, url=server + "/ok", md5=FAKE_MD5, progress=False)
    assert sorted(os.listdir(folder)) == sorted(data.BATCH_NAMES + ("batches.meta",))


def test_unsafe_or_wrong_archive_is_refused(tmp_path, server):
    for route in ("/evil", "/nofolder"):
        root = tmp_path / route.strip("/")
        root.mkdir()
        with pytest.raises(DataError):
            md5 = hashlib.md5(ROUTES[route]).hexdigest()
            data.ensure_cifar10(root, url=server + route, md5=md5, progress=False)
        assert os.listdir(root) == []
    assert not (tmp_path / "escaped").exists()


def test_no_network_says_where_to_put_files(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="by hand") as err:
        data.ensure_cifar10(tmp_path, url=f"http://127.0.0.1:{port}/x.tar.gz", progress=False)
    assert str(tmp_path / data.PY_FOLDER / "data_batch_1") in str(err.value)
    assert os.listdir(tmp_path) == []


def test_download_disabled(tmp_path, capsys):
    with pytest.raises(DataError, match="by hand"):
        data.ensure_cifar10(tmp_path, download=False)
    assert cli.main(["data", "--data-dir", str(tmp_path), "--no-download"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("klayer data: error: CIFAR-10 not found in ") and err.count("\n") == 1
    assert "switched off" in err and f"klayer data --data-dir {tmp_path}" in err
    assert "error" not in out and os.listdir(tmp_path) == []


def test_data_dir_that_does_not_exist_is_not_created(tmp_path, server, monkeypatch, capsys):
    typo = tmp_path / "dta"
    with pytest.raises(DataError, match=r"dta \(from --data-dir\) does not exist: create it"):
        data.ensure_cifar10(typo, url=server + "/ok", md5=FAKE_MD5, progress=False)
    assert not typo.exists()
    monkeypatch.setenv(data.ENV_VAR, str(typo))
    with pytest.raises(DataError, match=r"\(from \$KLAYER_DATA\) does not exist"):
        data.ensure_cifar10(url=server + "/ok", md5=FAKE_MD5, progress=False)
    assert cli.main(["data", "--data-dir", str(typo)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "does not exist" in err and f"mkdir -p {typo}" in err
    assert "downloading" not in out and not typo.exists()


def test_download_into_the_cache_creates_it(tmp_path, server, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = data.ensure_cifar10(url=server + "/ok", md5=FAKE_MD5, progress=False)
    assert folder == tmp_path / "xdg" / "klayer" / data.PY_FOLDER
    assert (folder / "test_batch").is_file()


# --------------------------------------------------------------------------- killed


def download_in_subprocess(root: Path, url: str, fault: str) -> subprocess.CompletedProcess:
    """Run ensure_cifar10(root, url) in a new Python process with KLAYER_FAULT=fault."""
    script = ("import sys; from klayer.data import ensure_cifar10; "
              "ensure_cifar10(sys.argv[1], url=sys.argv[2], md5=sys.argv[3], progress=False)")
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, KLAYER_FAULT=fault, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", script, str(root), url, FAKE_MD5], env=env,
                          capture_output=True, text=True, timeout=120)


def leftovers(root: Path) -> list[Path]:
    """What a killed download left: its temporary folder(s), which no load looks into."""
    return [p for p in root.iterdir() if p.name.startswith(".cifar-10-download-")]


def test_killed_mid_download_leaves_nothing_trusted(tmp_path, server):
    half = len(FAKE_TARBALL) // 2
    result = download_in_subprocess(tmp_path, server + "/ok", f"download:{half}")
    assert result.returncode == -signal.SIGKILL, result.stderr
    (work,) = leftovers(tmp_path)
    assert (work / "cifar-10-python.tar.gz").stat().st_size == half  # killed mid-download
    assert data.find_data_dir(tmp_path) is None and not (tmp_path / data.PY_FOLDER).exists()
    with pytest.raises(DataError, match="not found"):
        data.load_cifar10(tmp_path, download=False)
    # the next run downloads again, succeeds and removes what the killed one left
    folder = data.ensure_cifar10(tmp_path, url=server + "/ok", md5=FAKE_MD5, progress=False)
    assert (folder / "data_batch_1").read_bytes() == b"data_batch_1"
    assert os.listdir(tmp_path) == [data.PY_FOLDER]


def test_killed_mid_unpack_leaves_nothing_trusted(tmp_path, server):
    result = download_in_subprocess(tmp_path, server + "/ok", "unpack:3")
    assert result.returncode == -signal.SIGKILL, result.stderr
    (work,) = leftovers(tmp_path)
    assert len(os.listdir(work / "unpacked" / data.PY_FOLDER)) == 3  # killed mid-unpack
    assert data.find_data_dir(tmp_path) is None and not (tmp_path / data.PY_FOLDER).exists()
    folder = data.ensure_cifar10(tmp_path, url=server + "/ok", md5=FAKE_MD5, progress=False)
    assert sorted(os.listdir(folder)) == sorted(data.BATCH_NAMES + ("batches.meta",))
    assert os.listdir(tmp_path) == [data.PY_FOLDER]


def test_fault_hook_is_inert_unless_set(tmp_path, server):
    result = download_in_subprocess(tmp_path, server + "/ok", "")
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == [data.PY_FOLDER]
