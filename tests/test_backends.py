"""Storage through fsspec: the same behaviour on local files, memory:// and S3.

S3 is a real S3 API server (moto's server mode) on 127.0.0.1, reached over HTTP by s3fs;
nothing in s3fs is mocked. Failures of the network are real too: a TCP proxy in front
of the server drops the requests a test picks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

import snapwriter
from snapwriter._fsspec import FsspecFileSystem, _timestamp, resolve_filesystem
from snapwriter._paths import TEMP_MARKER
from snapwriter._storage import LocalFileSystem, Storage
from tests.conftest import FACTORIES, assert_same, make_state

fsspec = pytest.importorskip("fsspec")
s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
from fsspec.implementations.local import LocalFileSystem as FsspecLocal  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

BUCKET = "snapwriter-tests"
CREDENTIALS = {"key": "testing", "secret": "testing"}


# -- the S3 server -------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 API server on 127.0.0.1 for the whole session, with one bucket.

    The environment gets dummy credentials and ``AWS_ENDPOINT_URL_S3``, so that
    ``out_dir="s3://..."`` (resolved by fsspec/s3fs from the environment) reaches it.
    """
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["key"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret"])
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("AWS_CONFIG_FILE", nowhere)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        _s3(endpoint).mkdir(BUCKET)
        yield endpoint
    server.stop()


def _s3(endpoint: str, **kwargs: Any) -> Any:
    """A fresh s3fs client of the test server (no instance cache)."""
    return s3fs.S3FileSystem(
        **CREDENTIALS,
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
        **kwargs,
    )


# -- backends -------------------------------------------------------------------------


@dataclass
class Backend:
    """A place for snapshots, and an independent view of it to check results.

    Attributes:
        name: the parameter id.
        fs: what a writer is given as ``fs`` (``None``: from ``out_dir``).
        out_dir: what a writer is given as ``out_dir`` (a path, or a URL).
        store: an fsspec file system to inspect the results (no listing cache).
        root: ``out_dir`` as a path of ``store``.
    """

    name: str
    fs: Any
    out_dir: str
    store: Any
    root: str

    @property
    def remote(self) -> bool:
        return not self.name.startswith("local")

    def writer_kwargs(self) -> dict[str, Any]:
        return {"fs": self.fs, "out_dir": self.out_dir}

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> list[str]:
        self.store.invalidate_cache()
        try:
            listing = self.store.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in listing)

    def read(self, name: str) -> bytes:
        return bytes(self.store.cat_file(self.path(name)))

    def load(self, name: str) -> Any:
        return torch.load(io.BytesIO(self.read(name)), weights_only=False)

    def put(self, name: str, data: bytes) -> None:
        self.store.pipe_file(self.path(name), data)


BACKENDS = ["local", "memory", "memory-url", "s3", "s3-url"]


def _make_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    run = f"run-{uuid.uuid4().hex[:12]}"
    if name == "local":
        return Backend(name, None, str(tmp_path), FsspecLocal(), str(tmp_path))
    if name in ("memory", "memory-url"):
        store = MemoryFileSystem()
        root = f"/{run}"
        request.addfinalizer(lambda: store.rm(root, recursive=True) if store.exists(root) else None)
        if name == "memory":
            return Backend(name, MemoryFileSystem(), root, store, root)
        return Backend(name, None, f"memory://{run}", store, root)
    endpoint = request.getfixturevalue("s3_endpoint")
    store = _s3(endpoint, use_listings_cache=False)
    root = f"{BUCKET}/{run}"
    if name == "s3":
        return Backend(name, _s3(endpoint), root, store, root)
    return Backend(name, None, f"s3://{root}", store, root)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every backend: local, memory and S3, each as ``fs=`` object and as URL."""
    return _make_backend(request.param, request, tmp_path)


@pytest.fixture(params=["memory", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The remote backends, given as ``fs=`` objects."""
    return _make_backend(request.param, request, tmp_path)


@pytest.fixture
def finalize_later() -> Iterator[list[snapwriter.Writer]]:
    """Writers appended here are finalized at teardown (failures already asserted)."""
    writers: list[snapwriter.Writer] = []
    yield writers
    for w in writers:
        with contextlib.suppress(snapwriter.SnapshotError):
            w.finalize()


def _serialized(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# -- resolution --------------------------------------------------------------------------


def test_resolve_filesystem(tmp_path: Path) -> None:
    fs, d = resolve_filesystem(None, "runs/a")
    assert isinstance(fs, LocalFileSystem) and d == "runs/a"
    fs, d = resolve_filesystem(None, tmp_path)
    assert isinstance(fs, LocalFileSystem) and d == str(tmp_path)
    fs, d = resolve_filesystem(None, f"file://{tmp_path}")
    assert isinstance(fs, LocalFileSystem) and d == str(tmp_path)
    fs, d = resolve_filesystem(FsspecLocal(), str(tmp_path))
    assert isinstance(fs, LocalFileSystem) and d == str(tmp_path)
    fs, d = resolve_filesystem(None, "memory://x/y")
    assert isinstance(fs, FsspecFileSystem) and isinstance(fs.fsspec, MemoryFileSystem)
    assert d == "/x/y"
    memory = MemoryFileSystem()
    fs, d = resolve_filesystem(memory, "memory://x")
    assert isinstance(fs, FsspecFileSystem) and fs.fsspec is memory and d == "/x"
    assert resolve_filesystem(fs, "/z") == (fs, "/z")
    local = LocalFileSystem()
    assert resolve_filesystem(local, "d") == (local, "d")
    pfio_like = object()
    assert resolve_filesystem(pfio_like, "s3://b/x") == (pfio_like, "s3://b/x")
    with pytest.raises(snapwriter.InvalidSnapshotArgument, match="s3://"):
        resolve_filesystem(memory, "s3://bucket/run")


def test_fsspec_stays_optional(tmp_path: Path) -> None:
    """Without fsspec, local writers work and a URL says what to install."""
    code = f"""
import sys
sys.modules["fsspec"] = None  # as if not installed
import snapwriter
with snapwriter.StandardWriter(out_dir={str(tmp_path)!r}) as w:
    w("a.pt", "", {{"x": 1}})
assert snapwriter.find_latest_snapshot({str(tmp_path)!r}).endswith("a.pt")
try:
    snapwriter.StandardWriter(out_dir="s3://bucket/run")
except ImportError as exc:
    assert "snapwriter[s3]" in str(exc), exc
else:
    raise AssertionError("no ImportError")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=100)


def test_writer_resolves_fs_and_out_dir(tmp_path: Path) -> None:
    with snapwriter.StandardWriter(out_dir="memory://resolve-test") as w:
        assert isinstance(w.fs, FsspecFileSystem) and w.out_dir == "/resolve-test"
    with snapwriter.StandardWriter(fs=FsspecLocal(), out_dir=f"file://{tmp_path}") as w:
        assert isinstance(w.fs, LocalFileSystem) and w.out_dir == str(tmp_path)


def test_url_as_per_call_out_dir_is_rejected(tmp_path: Path) -> None:
    with snapwriter.StandardWriter() as w:
        with pytest.raises(snapwriter.InvalidSnapshotArgument, match="constructor"):
            w("a.pt", "memory://per-call", {"x": 1})
        with pytest.raises(snapwriter.InvalidSnapshotArgument, match="constructor"):
            w("a.pt", "s3://bucket/run", {"x": 1})
    assert not os.path.exists("memory:") and not os.path.exists("s3:")


def test_timestamps_from_backend_info() -> None:
    aware = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert _timestamp(aware) == aware.timestamp()
    assert _timestamp(aware.replace(tzinfo=None)) == aware.timestamp()  # naive is UTC
    assert _timestamp("2024-01-02T03:04:05Z") == aware.timestamp()
    assert _timestamp("1704164645.5") == 1704164645.5
    assert _timestamp(17) == 17.0
    assert _timestamp(True) is None and _timestamp("soon") is None and _timestamp(None) is None


def test_adapter_interface(remote: Backend) -> None:
    fs = resolve_filesystem(remote.fs, remote.out_dir)[0]
    root = remote.root
    assert not fs.exists(root)
    with pytest.raises(FileNotFoundError):
        list(fs.list(root))
    fs.makedirs(f"{root}/sub", exist_ok=True)
    with fs.open(f"{root}/a.bin", "wb") as f:
        f.write(b"abc")
    with fs.open(f"{root}/sub/b.bin", "wb") as f:
        f.write(b"defg")
    assert sorted(fs.list(root)) == ["a.bin", "sub"]
    assert sorted(fs.list(root, recursive=True)) == ["a.bin", "sub", "sub/b.bin"]
    with pytest.raises(NotADirectoryError):
        list(fs.list(f"{root}/a.bin"))
    assert fs.exists(f"{root}/a.bin") and not fs.isdir(f"{root}/a.bin") and fs.isdir(root)
    st = fs.stat(f"{root}/sub/b.bin")
    assert st.size == 4 and abs(st.last_modified - datetime.now().timestamp()) < 120
    fs.rename(f"{root}/a.bin", f"{root}/c.bin")
    with fs.open(f"{root}/c.bin", "rb") as f:
        assert f.read() == b"abc"
    assert not fs.exists(f"{root}/a.bin")
    fs.remove(f"{root}/c.bin")
    fs.remove(f"{root}/sub", recursive=True)
    assert remote.names() == []
    clone = pickle.loads(pickle.dumps(fs))
    assert isinstance(clone, FsspecFileSystem) and not clone.exists(f"{root}/c.bin")


# -- the same behaviour on every backend ----------------------------------------------------


def test_round_trip(backend: Backend) -> None:
    state = make_state()
    with snapwriter.StandardWriter(**backend.writer_kwargs()) as w:
        result = w("snap.pt", "", state).result()
        expected_fs = FsspecFileSystem if backend.remote else LocalFileSystem
        assert isinstance(w.fs, expected_fs)
    assert backend.names() == ["snap.pt"]
    assert result.nbytes == len(backend.read("snap.pt"))
    assert_same(backend.load("snap.pt"), state)


def test_overwrite_leaves_only_the_new_snapshot(backend: Backend) -> None:
    with snapwriter.StandardWriter(**backend.writer_kwargs()) as w:
        for seed in range(3):
            w("snap.pt", "", make_state(seed=seed))
    assert backend.names() == ["snap.pt"]
    assert_same(backend.load("snap.pt"), make_state(seed=2))


def test_failing_savefun_keeps_the_previous_snapshot(backend: Backend) -> None:
    old = make_state(seed=1)

    def half_then_fail(obj: Any, f: Any) -> None:
        data = _serialized(obj)
        f.write(data[: len(data) // 2])
        raise RuntimeError("savefun failed half way")

    with snapwriter.StandardWriter(**backend.writer_kwargs()) as w:
        w("snap.pt", "", old).result()
        handle = w("snap.pt", "", make_state(seed=2), savefun=half_then_fail)
        with pytest.raises(snapwriter.SnapshotWriteError) as info:
            handle.result()
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(snapwriter.SnapshotWriteError):
            w("fresh.pt", "", old, savefun=half_then_fail).result()
    assert backend.names() == ["snap.pt"]  # no temporary object, nothing at fresh.pt
    assert_same(backend.load("snap.pt"), old)


def test_retention_keep_last(backend: Backend) -> None:
    backend.put("notes.txt", b"not a snapshot")
    with snapwriter.StandardWriter(keep_last=2, **backend.writer_kwargs()) as w:
        for i in range(8, 13):  # 9 -> 10 -> 11: numbers order ties of coarse (S3) mtimes
            w(f"snap_{i}.pt", "", {"i": i}).result()
    assert backend.names() == ["notes.txt", "snap_11.pt", "snap_12.pt"]
    assert backend.load("snap_12.pt") == {"i": 12}


def test_find_latest_and_list_snapshots(backend: Backend) -> None:
    with snapwriter.StandardWriter(**backend.writer_kwargs()) as w:
        for i in (1, 2, 3):
            w(f"snap_{i}.pt", "", {"i": i}).result()
        writer_fs, writer_dir = w.fs, w.out_dir
    leftover = f".snap_4.pt{TEMP_MARKER}{os.getpid()}-{'a' * 16}"
    backend.put(leftover, b"partial")

    directory, fs = backend.out_dir, backend.fs  # as the user gave them: URL or fs object
    latest = snapwriter.find_latest_snapshot(directory, "snap_*.pt", fs=fs)
    assert latest == os.path.join(directory, "snap_3.pt")
    entries = snapwriter.list_snapshots(directory, "snap_*.pt", fs=fs)
    committed = [e.name for e in entries if not e.temporary]
    assert committed == ["snap_1.pt", "snap_2.pt", "snap_3.pt"]
    assert [e.name for e in entries if e.temporary] == [leftover]
    assert all(e.size > 0 for e in entries)

    # The writer's own (resolved) fs and directory work as well.
    latest = snapwriter.find_latest_snapshot(writer_dir, "snap_*.pt", fs=writer_fs)
    assert latest == os.path.join(writer_dir, "snap_3.pt")
    missing = os.path.join(directory, "missing")
    assert snapwriter.find_latest_snapshot(missing, fs=fs) is None


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_clean_up_of_temporaries_on_remote_stores(remote: Backend) -> None:
    dead = f".x.pt{TEMP_MARKER}{_dead_pid()}-{'0' * 16}"
    remote.put(dead, b"left by a crash")
    remote.put("x.pt", b"committed")
    with snapwriter.StandardWriter(**remote.writer_kwargs()) as w:
        w.initialize("")
        if remote.name == "memory":  # one process: the pid says it all
            assert remote.names() == ["x.pt"]
        else:  # a shared store: another host's commit may be using it, unless it is old
            assert remote.names() == sorted([dead, "x.pt"])
            w.fs.stale_temp_seconds = 0.0
            assert Storage(w.fs).clean_temps(w.out_dir) == [os.path.join(w.out_dir, dead)]
            assert remote.names() == ["x.pt"]


# -- every writer class ------------------------------------------------------------------------


_PROCESS_WRITERS = {"ProcessWriter-fork", "ProcessQueueWriter-fork"}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_writer_on_memory(
    name: str, tmp_path: Path, request: pytest.FixtureRequest, finalize_later: list[Any]
) -> None:
    backend = _make_backend("memory", request, tmp_path)
    state = make_state()
    if name in _PROCESS_WRITERS:
        # A child process cannot write into this process's memory: refused at construction.
        with pytest.raises(snapwriter.InvalidSnapshotArgument, match="another process"):
            FACTORIES[name](keep_last=2, **backend.writer_kwargs())
        assert backend.names() == []
        return
    w = FACTORIES[name](keep_last=2, **backend.writer_kwargs())
    finalize_later.append(w)
    for i in (1, 2, 3):
        w(f"snap_{i}.pt", "", state).result()
    w.finalize()
    assert backend.names() == ["snap_2.pt", "snap_3.pt"]
    assert_same(backend.load("snap_3.pt"), state)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_writer_on_s3(
    name: str, tmp_path: Path, request: pytest.FixtureRequest, finalize_later: list[Any]
) -> None:
    backend = _make_backend("s3", request, tmp_path)
    state = make_state()
    w = FACTORIES[name](keep_last=2, **backend.writer_kwargs())
    finalize_later.append(w)
    for i in (1, 2, 3):
        w(f"snap_{i}.pt", "", state).result()
    w.finalize()
    assert backend.names() == ["snap_2.pt", "snap_3.pt"]
    assert_same(backend.load("snap_3.pt"), state)


@pytest.mark.parametrize("cls", [snapwriter.ProcessWriter, snapwriter.ProcessQueueWriter])
def test_process_writers_spawn_on_s3(
    cls: type[snapwriter.StandardWriter],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Under spawn the fs is pickled into the child: s3fs clients pickle, so it works."""
    backend = _make_backend("s3", request, tmp_path)
    state = make_state()
    with cls(mp_context="spawn", **backend.writer_kwargs()) as w:  # type: ignore[call-arg]
        w("snap.pt", "", state).result()
    assert backend.names() == ["snap.pt"]
    assert_same(backend.load("snap.pt"), state)


# -- pytorch-pfn-extras' snapshot extension -------------------------------------------------


def test_ppe_snapshot_n_retains_and_autoload(backend: Backend, tmp_path: Path) -> None:
    ppe = pytest.importorskip("pytorch_pfn_extras")
    from tests.test_ppe_compat import _manager, _train

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    writer = snapwriter.StandardWriter(**backend.writer_kwargs())
    snap = ppe.training.extensions.snapshot(writer=writer, n_retains=3, autoload=True)
    manager = _manager(model, writer, tmp_path / "manager", snap)
    _train(manager, model, 5)  # one-digit names: ppe orders same-second mtimes by name
    writer.finalize()
    assert backend.names() == [f"snapshot_iter_{i}" for i in (3, 4, 5)]
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = torch.nn.Linear(4, 3)
    writer2 = snapwriter.StandardWriter(**backend.writer_kwargs())
    snap2 = ppe.training.extensions.snapshot(writer=writer2, n_retains=3, autoload=True)
    manager2 = _manager(fresh, writer2, tmp_path / "manager", snap2)
    assert snap2.initialize(manager2) == "snapshot_iter_5"
    assert manager2.iteration == 5
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, trained[k])
    writer2.finalize()


# -- real network failures between s3fs and the server ---------------------------------------


class FlakyProxy:
    """A TCP proxy to the S3 server that drops the requests ``fail`` picks.

    ``fail`` sees each chunk the client sends; when it returns true, both connections
    are closed instead of forwarding it: the client sees a real connection failure.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.fail: Callable[[bytes], bool] | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="flaky-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                fail = self.fail
                if from_client and fail is not None and fail(data):
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()


@pytest.fixture
def flaky(s3_endpoint: str) -> Iterator[tuple[FlakyProxy, Any]]:
    """A proxy in front of the server, and an s3fs client through it (no retries)."""
    proxy = FlakyProxy(s3_endpoint)
    client = _s3(
        proxy.url,
        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 20},
    )
    client.retries = 1
    yield proxy, client
    proxy.close()


@pytest.mark.parametrize("failing", ["upload", "commit"])
def test_network_failure_keeps_the_previous_object(
    failing: str, flaky: tuple[FlakyProxy, Any], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    proxy, client = flaky
    backend = _make_backend("s3", request, tmp_path)
    old, new = make_state(seed=1), make_state(seed=2)
    w = snapwriter.StandardWriter(fs=client, out_dir=backend.root)
    try:
        w("snap.pt", "", old).result()
        if failing == "upload":  # the network goes down while savefun writes

            def cut_off_half_way(obj: Any, f: Any) -> None:
                data = _serialized(obj)
                f.write(data[: len(data) // 2])
                proxy.fail = lambda chunk: True
                f.write(data[len(data) // 2 :])

            handle = w("snap.pt", "", new, savefun=cut_off_half_way)
        else:  # the upload succeeds, the server-side copy onto the final key does not
            proxy.fail = lambda chunk: b"x-amz-copy-source" in chunk.lower()
            handle = w("snap.pt", "", new)
        with pytest.raises(snapwriter.SnapshotWriteError) as info:
            handle.result()
        # The request that failed: the temporary object's upload, or the copy onto snap.pt.
        failed_request = str(info.value.__cause__)
        assert "Connection was closed" in failed_request
        assert (TEMP_MARKER in failed_request) == (failing == "upload")
    finally:
        proxy.fail = None
        w.finalize()
    assert backend.names() == ["snap.pt"]  # no temporary object either
    assert_same(backend.load("snap.pt"), old)


def test_s3_commit_after_copy_is_not_a_failure(
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On S3 the commit is a server-side copy then a delete: a failed delete after the
    copy leaves the snapshot committed; the writer says so and does not report failure."""
    s3 = _s3(s3_endpoint)
    run = f"{BUCKET}/commit-{uuid.uuid4().hex[:12]}"
    real_rm = s3.rm_file

    def flaky_rm(path: str, *args: Any, **kwargs: Any) -> Any:
        if snapwriter.is_temp_name(path):
            raise PermissionError("s3:DeleteObject denied")
        return real_rm(path, *args, **kwargs)

    monkeypatch.setattr(s3, "rm_file", flaky_rm)
    with snapwriter.StandardWriter(fs=s3, out_dir=run) as w:
        result = w("snap.pt", "", {"x": torch.arange(5)}).result(timeout=60)
    assert result.path == f"{run}/snap.pt"
    with s3.open(f"{run}/snap.pt", "rb") as f:
        assert torch.equal(torch.load(f)["x"], torch.arange(5))
    assert "could not delete its temporary object" in caplog.text
