"""Peer servers for the benchmark suite: MLServer, PyTriton, KServe and BentoML, each installed
from PyPI into its own virtual environment under ``bench/.peers/<name>/venv`` and serving
the same ONNX model (onnxruntime, CPU provider, 1 intra-op and 1 inter-op thread).

    python bench/peers.py install [NAME ...]   # venv + pip install PEER onnxruntime numpy
    python bench/peers.py status               # which peers can run here, and why not
    python bench/peers.py check [NAME ...]     # start, one request per encoding, compare, stop
    python bench/peers.py smoke NAME           # 3 s of wrk (64 connections), req/s

``check`` and ``smoke`` need fastserve (for the demo model): run them with fastserve's own
venv, ``.venv/bin/python bench/peers.py check``. ``install`` writes the installed versions
to ``bench/.peers/<name>/versions.txt``; the server names carry them. A running server
logs into its run folder (``server.log_file``); ``stop()`` moves the log to
``bench/.peers/<name>/server.log`` (the last one stopped).

The peers (apps in ``bench/peer_apps/``):

- ``mlserver``: a custom ``MLModel``, adaptive batching on (``max_batch_size``,
  ``max_batch_time``), ``parallel_workers: 0`` so inference runs in the server process
  itself (with 1 or more, MLServer forks worker processes and every request pays a hop
  through a queue between processes, which on one pinned core is pure overhead). V2 REST
  JSON only: MLServer's REST server does not take Triton's binary tensor extension.
  Extra ports: gRPC (cannot be turned off) and metrics, each on a free port.
- ``pytriton``: the ``tritonserver`` binary from the nvidia-pytriton wheel, dynamic
  batching on, the model run by a ``@batch`` function in the parent Python process.
  V2 JSON and the binary extension. The label output is ``[n, 1]`` there (Triton wants
  one dimension per row). gRPC off; metrics on a free port. Processes: the Python parent,
  ``tritonserver``, Triton's python backend stub and two multiprocessing helpers.
- ``kserve``: a ``kserve.Model`` on KServe's Python model server (uvicorn, one worker,
  gRPC off); no in-process batcher, so each request is one onnxruntime call. V2 JSON and
  the binary extension. It binds 0.0.0.0 (KServe's REST server hard-codes the host).
- ``bentoml``: a ``@bentoml.service`` with a batchable API (adaptive batching), ``bentoml
  serve`` with one worker. Not V2: ``POST /predict`` with ``{"rows": [[...], ...]}``.
  Processes: the circus arbiter (``pid``, which also listens on two local control ports)
  and one service worker, which runs in a process group of its own.

Python API (used by bench/suite.py)::

    import peers
    peers.status()                                   # {name: None or why not}
    server = peers.start("mlserver", model_file)     # pinned to CPU 0, ready to answer
    path, body, headers = server.request(rows, "json")
    outputs = server.outputs(response_body, response_headers)
    server.stop()

Per-request access logs are off in every peer; everything else (metrics included) is
each server's default.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

HERE: Final = Path(__file__).resolve().parent
PEERS_DIR: Final = HERE / ".peers"
APPS_DIR: Final = HERE / "peer_apps"

PEERS: tuple[str, ...] = ("mlserver", "pytriton", "kserve", "bentoml")
PACKAGES: Final = {
    "mlserver": "mlserver",
    "pytriton": "nvidia-pytriton",
    "kserve": "kserve",
    "bentoml": "bentoml",
}
"""The PyPI package of each peer; each venv also gets onnxruntime and numpy."""
EXTRA_PACKAGES: Final = ("onnxruntime", "numpy")
ENCODINGS: Final = ("json", "binary", "msgpack")
START_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 10.0
HEADER_LENGTH: Final = "Inference-Header-Content-Length"
NUMPY_TO_V2: Final[dict[np.dtype[Any], str]] = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
}
V2_TO_NUMPY: Final[dict[str, np.dtype[Any]]] = {name: dt for dt, name in NUMPY_TO_V2.items()}


def venv_dir(name: str) -> Path:
    return PEERS_DIR / name / "venv"


def venv_python(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def _check_name(name: str) -> None:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; the peers are {', '.join(PEERS)}")


# ---------------------------------------------------------------------------- install


def install(name: str) -> dict[str, str]:
    """Create the peer's venv (if missing) and pip-install it from PyPI with onnxruntime and
    numpy; write ``versions.txt`` (``pip freeze`` of the venv). Returns the versions."""
    _check_name(name)
    base = shutil.which("python3")
    if base is None:
        raise RuntimeError("python3 is not on PATH")
    root = PEERS_DIR / name
    root.mkdir(parents=True, exist_ok=True)
    if not venv_python(name).exists():
        subprocess.run([base, "-m", "venv", str(venv_dir(name))], check=True)
    pip = [str(venv_python(name)), "-m", "pip", "install", "--progress-bar", "off"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, PACKAGES[name], *EXTRA_PACKAGES], check=True)
    frozen = subprocess.run(
        [str(venv_python(name)), "-m", "pip", "freeze", "--all"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    python = subprocess.run(
        [str(venv_python(name)), "-c", "import platform; print(platform.python_version())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (root / "versions.txt").write_text(f"# python {python}\n{frozen}")
    return versions(name)


def versions(name: str) -> dict[str, str]:
    """Package name (lower case, '-' for '_') -> version, from ``versions.txt``; {} if absent."""
    path = PEERS_DIR / name / "versions.txt"
    if not path.exists():
        return {}
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("# python "):
            found["python"] = line.removeprefix("# python ").strip()
        elif "==" in line:
            package, _, version = line.partition("==")
            found[package.strip().lower().replace("_", "-")] = version.strip()
    return found


# ----------------------------------------------------------------------------- status


def status() -> dict[str, str | None]:
    """name -> None when installed and runnable here, else a one-line reason."""
    return {name: _reason(name) for name in PEERS}


def _reason(name: str) -> str | None:
    if not venv_python(name).exists() or PACKAGES[name] not in versions(name):
        return f"not installed: run `python bench/peers.py install {name}`"
    if shutil.which("taskset") is None:
        return "taskset (util-linux) is not on PATH"
    if name == "pytriton":
        return _pytriton_reason()
    return None


def _site_packages(name: str) -> Path:
    version = versions(name).get("python", "")
    major_minor = ".".join(version.split(".")[:2]) or f"{sys.version_info[0]}.{sys.version_info[1]}"
    return venv_dir(name) / "lib" / f"python{major_minor}" / "site-packages"


def _pytriton_reason() -> str | None:
    """Why the tritonserver binary or its python backend stub cannot run here, if so."""
    server = _site_packages("pytriton") / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not server.exists():
        return f"nvidia-pytriton ships no tritonserver binary at {server}"
    missing = _missing_libraries(server)
    if missing:
        return f"tritonserver cannot load: {', '.join(missing)} not found (ldd)"
    if _python_libdir("pytriton") is None:
        version = versions("pytriton").get("python", "?")
        return (
            "Triton's python backend stub embeds libpython; the venv's Python "
            f"{version} has no shared libpython (build it with --enable-shared)"
        )
    return None


def _missing_libraries(binary: Path) -> list[str]:
    if shutil.which("ldd") is None:
        return []
    out = subprocess.run(["ldd", str(binary)], check=False, capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def _python_libdir(name: str) -> str | None:
    """The folder holding the shared libpython of the venv's own interpreter, or None.

    Triton's python backend stub links ``libpython3.X.so.1.0`` and runs the venv's
    standard library in it; the loader's default (the system's libpython) may be another
    patch release of 3.X, and then the stub fails in the standard library
    (``'_thread.RLock' object has no attribute '_recursion_count'`` with Debian's 3.11.2
    under a 3.11.7 venv). So the stub gets the interpreter's own libpython first.
    """
    script = (
        "import sysconfig, os; d = sysconfig.get_config_var('LIBDIR') or ''; "
        "n = sysconfig.get_config_var('INSTSONAME') or ''; "
        "print(d if n and os.path.exists(os.path.join(d, n)) else '')"
    )
    out = subprocess.run(
        [str(venv_python(name)), "-c", script], check=False, capture_output=True, text=True
    ).stdout.strip()
    return out or None


# ------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class ModelInfo:
    """What a request needs to know about the ONNX model (read with onnxruntime)."""

    input_name: str
    width: int
    outputs: tuple[tuple[str, np.dtype[Any]], ...]

    @classmethod
    def read(cls, model_file: Path) -> ModelInfo:
        import onnxruntime as ort

        types = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 2 or not isinstance(inputs[0].shape[1], int):
            raise ValueError(f"{model_file}: the peers serve models of one [N, width] input")
        return cls(
            input_name=inputs[0].name,
            width=int(inputs[0].shape[1]),
            outputs=tuple((o.name, np.dtype(types[o.type])) for o in session.get_outputs()),
        )


# ----------------------------------------------------------------------------- server


class PeerServer:
    """One running peer. ``pid`` is the server's main process; ``stop()`` ends all of it."""

    name: str
    """Product, version and batching mode, e.g. ``MLServer 1.7.1 (adaptive batching)``."""
    url: str
    pid: int

    def __init__(
        self,
        peer: str,
        model_name: str,
        info: ModelInfo,
        process: subprocess.Popen[bytes],
        port: int,
        run_dir: Path,
        log_file: Path,
        name: str,
    ) -> None:
        self.peer = peer
        self.model_name = model_name
        self.info = info
        self.process = process
        self.pid = process.pid
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.run_dir = run_dir
        self.log_file = log_file
        self.name = name
        self._seen: dict[int, int] = {}
        """pid -> start time of every descendant of ``pid`` seen so far (some leave its
        process group); the start time tells a process from a later one with its pid."""

    @property
    def v2(self) -> bool:
        return self.peer != "bentoml"

    def encodings(self) -> tuple[str, ...]:
        """The encodings ``request`` can build for this peer."""
        rows = np.zeros((1, self.info.width), np.float32)
        return tuple(e for e in ENCODINGS if self.request(rows, e) is not None)

    def request(self, rows: np.ndarray, encoding: str) -> tuple[str, bytes, dict[str, str]] | None:
        """(path, body, headers) of one POST carrying these rows (float32 [n, width]).

        "json" is V2 JSON (BentoML: its own JSON); "binary" is Triton's binary tensor
        extension with binary outputs asked for too; "msgpack" no peer takes. None when
        the peer cannot take that encoding.
        """
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.info.width:
            raise ValueError(f"rows must be float32 [n, {self.info.width}], not {rows.shape}")
        if not self.v2:
            if encoding != "json":
                return None
            body = json.dumps({"rows": rows.tolist()}).encode()
            return "/predict", body, {"Content-Type": "application/json"}
        path = f"/v2/models/{self.model_name}/infer"
        tensor: dict[str, Any] = {
            "name": self.info.input_name,
            "shape": list(rows.shape),
            "datatype": "FP32",
        }
        if encoding == "json":
            doc = {"inputs": [{**tensor, "data": rows.ravel().tolist()}]}
            return path, json.dumps(doc).encode(), {"Content-Type": "application/json"}
        if encoding == "binary" and self.peer in ("pytriton", "kserve"):
            raw = rows.tobytes()
            doc = {
                "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
                "outputs": [
                    {"name": name, "parameters": {"binary_data": True}}
                    for name, _ in self.info.outputs
                ],
            }
            header = json.dumps(doc).encode()
            headers = {
                "Content-Type": "application/octet-stream",
                HEADER_LENGTH: str(len(header)),
            }
            return path, header + raw, headers
        return None

    def outputs(self, body: bytes, headers: Mapping[str, str]) -> dict[str, np.ndarray]:
        """The model's outputs in a response body (any encoding ``request`` builds)."""
        if not self.v2:
            doc = json.loads(body)
            return {
                name: np.asarray([row[name] for row in doc], dtype=dtype)
                for name, dtype in self.info.outputs
            }
        lowered = {k.lower(): v for k, v in headers.items()}
        length = lowered.get(HEADER_LENGTH.lower())
        split = int(length) if length is not None else len(body)
        doc = json.loads(body[:split])
        raw = body[split:]
        found: dict[str, np.ndarray] = {}
        for output in doc["outputs"]:
            dtype = V2_TO_NUMPY[output["datatype"]]
            size = (output.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                value = np.frombuffer(raw[:size], dtype=dtype)
                raw = raw[size:]
            else:
                value = np.asarray(output["data"], dtype=dtype)
            found[output["name"]] = value.reshape(output["shape"])
        return found

    def infer(self, rows: np.ndarray, encoding: str = "json") -> dict[str, np.ndarray]:
        """Send one request and return its outputs; raises RuntimeError on a failure."""
        built = self.request(rows, encoding)
        if built is None:
            raise RuntimeError(f"{self.name} does not take {encoding} requests")
        path, body, headers = built
        request = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return self.outputs(response.read(), dict(response.headers))
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode(errors="replace")
            raise RuntimeError(f"HTTP {error.code} from {self.url}{path}: {detail}") from None

    def processes(self) -> list[int]:
        """``pid`` and every live descendant of it (whatever their process group)."""
        main = [self.pid] if self.process.poll() is None else []
        if main:
            self._seen.update(_descendants(self.pid))
        return main + sorted(p for p, started in self._seen.items() if _alive(p, started))

    def stop(self) -> None:
        """End every process of the server, then remove its run folder.

        SIGTERM to the main process first (PyTriton, and BentoML's arbiter, then end their
        own children; a SIGTERM to PyTriton's whole group at once leaves it hanging), then
        SIGTERM and at last SIGKILL to each process group seen and each descendant left.
        """
        pids = self.processes()
        groups = {g for g in (_pgid(p) for p in pids) if g is not None}
        if self.process.poll() is None:  # never signal a pid already reaped (reusable)
            self.process.terminate()
        if not self._wait_gone(STOP_TIMEOUT_S):
            for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
                for group in groups:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(group, sig)
                for pid, started in self._seen.items():
                    if _alive(pid, started):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, sig)
                if self._wait_gone(wait_s):
                    break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self.peer == "pytriton":  # shared memory PyTriton names after its parent's pid
            for leftover in Path("/dev/shm").glob(f"pytrtion{self.pid}-*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        kept = PEERS_DIR / self.peer / "server.log"
        with contextlib.suppress(OSError):
            os.replace(self.log_file, kept)
            self.log_file = kept
        shutil.rmtree(self.run_dir, ignore_errors=True)
        _RUNNING.discard(self)

    def _wait_gone(self, timeout_s: float) -> bool:
        """Wait until the main process and every descendant seen have exited."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is None:
                self._seen.update(_descendants(self.pid))
            elif not any(_alive(p, started) for p, started in self._seen.items()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RUNNING: set[PeerServer] = set()
"""Servers started and not stopped yet: stopped at exit if the driver forgets."""


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


_DIE_WITH_PARENT: Final = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG, kept across exec
    "os.getppid() == int(sys.argv[1]) or sys.exit('parent gone'); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)
"""Run as ``python -c`` before the server: SIGTERM it when the thread that started it
ends, so a server does not outlive a driver that dies without stop()."""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) from /proc/PID/stat, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``pid``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child, started in children.get(todo.pop(), []):
            found[child] = started
            todo.append(child)
    return found


def _alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] != "Z"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------ start


def start(
    name: str,
    model_file: Path,
    *,
    model_name: str = "breast_cancer",
    cpu: str = "0",
    max_batch_size: int = 64,
    max_delay_us: int = 200,
) -> PeerServer:
    """Start the peer from its venv, pinned with ``taskset -c CPU`` (all its processes),
    serving ``model_file``; return once it answers a real inference request.

    Raises RuntimeError with the reason (and the tail of the server's log) otherwise.
    """
    _check_name(name)
    reason = _reason(name)
    if reason is not None:
        raise RuntimeError(f"{name}: {reason}")
    model_file = Path(model_file).resolve()
    try:
        info = ModelInfo.read(model_file)
    except Exception as error:  # onnxruntime raises its own types
        raise RuntimeError(f"{name}: cannot read the model {model_file}: {error}") from error
    run_dir = Path(tempfile.mkdtemp(prefix=f"fastserve-peer-{name}-"))
    log_file = run_dir / "server.log"  # kept as bench/.peers/<name>/server.log by stop()
    port = free_port()
    found = versions(name)
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")
    }
    env.update(
        PATH=f"{venv_dir(name) / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(APPS_DIR),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    python = str(venv_python(name))
    if name == "mlserver":
        _write_mlserver_repository(
            run_dir, model_file, model_name, port, max_batch_size, max_delay_us
        )
        command = [python, str(venv_dir(name) / "bin" / "mlserver"), "start", str(run_dir)]
        title = f"MLServer {found['mlserver']} (adaptive batching)"
    elif name == "pytriton":
        libdir = _python_libdir(name)
        if libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p
            )
        command = [
            python,
            str(APPS_DIR / "pytriton_app.py"),
            str(model_file),
            f"--model-name={model_name}",
            f"--http-port={port}",
            f"--metrics-port={free_port()}",
            f"--workspace={run_dir / 'workspace'}",
            f"--max-batch-size={max_batch_size}",
            f"--max-delay-us={max_delay_us}",
        ]
        title = f"PyTriton {found['nvidia-pytriton']} (dynamic batching)"
    elif name == "kserve":
        command = [
            python,
            str(APPS_DIR / "kserve_app.py"),
            str(model_file),
            f"--model-name={model_name}",
            f"--http-port={port}",
        ]
        title = f"KServe {found['kserve']} (one request at a time)"
    else:
        env.update(
            PEER_MODEL_FILE=str(model_file),
            PEER_MAX_BATCH_SIZE=str(max_batch_size),
            BENTOML_HOME=str(run_dir / "bentoml-home"),
            BENTOML_DO_NOT_TRACK="True",
        )
        command = [
            python,
            str(venv_dir(name) / "bin" / "bentoml"),
            "serve",
            "bentoml_service:Classifier",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--working-dir={APPS_DIR}",
        ]
        title = f"BentoML {found['bentoml']} (adaptive batching)"

    # The death signal follows the starting thread: only a main-thread start gets it.
    guard = (
        [sys.executable, "-I", "-c", _DIE_WITH_PARENT, str(os.getpid())]
        if threading.current_thread() is threading.main_thread()
        else []
    )
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [*guard, "taskset", "-c", cpu, *command],
            cwd=run_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = PeerServer(name, model_name, info, process, port, run_dir, log_file, title)
    _RUNNING.add(server)
    try:
        _wait_ready(server)
    except BaseException as error:
        server.stop()
        if isinstance(error, RuntimeError):
            kept = server.log_file
            raise RuntimeError(f"{error}\n--- last lines of {kept} ---\n{_tail(kept)}") from None
        raise
    if name == "pytriton":
        pytriton = title.removesuffix(" (dynamic batching)")
        server.name = f"{pytriton}, Triton {_triton_version(server)} (dynamic batching)"
    return server


def _write_mlserver_repository(
    root: Path, model_file: Path, model_name: str, port: int, max_batch_size: int, max_delay_us: int
) -> None:
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
        "debug": False,  # its access log
    }
    model = {
        "name": model_name,
        "implementation": "mlserver_model.OnnxRuntimeModel",
        "max_batch_size": max_batch_size,
        "max_batch_time": max_delay_us / 1e6,
        "parameters": {"uri": str(model_file)},
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    (root / model_name).mkdir()
    (root / model_name / "model-settings.json").write_text(json.dumps(model, indent=2))


def _wait_ready(server: PeerServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    rows = np.zeros((1, server.info.width), np.float32)
    last = "no answer yet"
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise RuntimeError(f"{server.peer} exited with status {code} while starting")
        try:
            outputs = server.infer(rows)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            last = str(error)
            time.sleep(0.5)
            continue
        missing = [name for name, _ in server.info.outputs if name not in outputs]
        if missing:
            raise RuntimeError(f"{server.peer} answered without outputs {missing}")
        return
    raise RuntimeError(f"{server.peer} did not answer within {START_TIMEOUT_S:.0f} s ({last})")


def _triton_version(server: PeerServer) -> str:
    try:
        with urllib.request.urlopen(server.url + "/v2", timeout=5) as response:
            return str(json.loads(response.read()).get("version", "?"))
    except (OSError, ValueError):
        return "?"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# -------------------------------------------------------------------------------- CLI


def _demo_model(tmp: Path) -> tuple[Path, np.ndarray]:
    """The demo model file and 8 of its real rows (needs fastserve)."""
    try:
        from fastserve.demo import build_demo_repository, example_rows
    except ImportError:
        raise SystemExit(
            "check and smoke need fastserve for the demo model: run them with fastserve's "
            "venv, e.g. .venv/bin/python bench/peers.py check"
        ) from None
    demo = build_demo_repository(tmp / "demo")
    return demo / "breast_cancer" / "1" / "model.onnx", example_rows("breast_cancer", 8)


def check(name: str, model_file: Path, rows: np.ndarray) -> str | None:
    """None when the peer answers every encoding it takes as onnxruntime does, else why not."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    expected = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, {session.get_inputs()[0].name: rows}),
            strict=True,
        )
    )
    try:
        server = start(name, model_file)
    except RuntimeError as error:
        return str(error)
    with server:
        print(f"  {server.name} at {server.url}, pid {server.pid}, processes {server.processes()}")
        for encoding in server.encodings():
            try:
                got = server.infer(rows, encoding)
            except RuntimeError as error:
                return f"{encoding}: {error}"
            for output, want in expected.items():
                value = got[output].reshape(want.shape)  # PyTriton's label is [n, 1]
                if want.dtype.kind == "f":
                    if not np.allclose(value, want, rtol=0, atol=1e-5):
                        worst = float(np.max(np.abs(value - want)))
                        return f"{encoding}: {output} differs from onnxruntime by {worst:g}"
                elif not np.array_equal(value, want):
                    return f"{encoding}: {output} {value.tolist()} != {want.tolist()}"
            print(f"  {encoding}: {len(rows)} rows match onnxruntime")
    return None


def smoke(name: str, model_file: Path, row: np.ndarray, duration_s: float = 3.0) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH")
    with start(name, model_file) as server, tempfile.TemporaryDirectory() as tmp:
        print(f"{server.name} at {server.url}")
        for encoding in server.encodings():
            built = server.request(row, encoding)
            assert built is not None
            path, body, headers = built
            body_file = Path(tmp) / f"body-{encoding}"
            body_file.write_bytes(body)
            script = Path(tmp) / f"wrk-{encoding}.lua"
            extra = "".join(
                f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items() if k != "Content-Type"
            )
            script.write_text((HERE / "wrk_post.lua").read_text() + extra)
            env = {
                **os.environ,
                "BODY_FILE": str(body_file),
                "CONTENT_TYPE": headers["Content-Type"],
            }
            out = subprocess.run(
                [
                    "taskset",
                    "-c",
                    "1",
                    "wrk",
                    "-t1",
                    "-c64",
                    f"-d{duration_s:g}s",
                    "-s",
                    str(script),
                    server.url + path,
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
            errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
            print(
                f"  {encoding}: {float(rate.group(1)) if rate else float('nan'):.0f} req/s"
                + (f", {errors.group(1)} non-2xx" if errors else "")
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("install", "check", "status"):
        sub.add_parser(command).add_argument("names", nargs="*", metavar="NAME")
    sub.add_parser("smoke").add_argument("name", choices=PEERS)
    args = parser.parse_args()
    names = getattr(args, "names", None) or list(PEERS)
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; the peers are {', '.join(PEERS)}")

    if args.command == "install":
        failed = []
        for name in names:
            print(f"== installing {name} ({PACKAGES[name]}, {', '.join(EXTRA_PACKAGES)})")
            try:
                found = install(name)
            except (subprocess.CalledProcessError, RuntimeError) as error:
                print(f"{name}: install failed: {error}")
                failed.append(name)
                continue
            package = PACKAGES[name]
            print(f"{name}: {package} {found.get(package)}, onnxruntime {found.get('onnxruntime')}")
        sys.exit(1 if failed else 0)
    if args.command == "status":
        for name, reason in status().items():
            print(f"{name}: {reason or 'ready'}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_file, rows = _demo_model(Path(tmp))
        if args.command == "smoke":
            smoke(args.name, model_file, rows[:1])
            return
        failed = []
        for name in names:
            print(f"== {name}")
            reason = check(name, model_file, rows)
            print(f"{name}: {'OK' if reason is None else reason}")
            if reason is not None:
                failed.append(name)
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
