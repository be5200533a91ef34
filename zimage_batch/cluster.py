"""Scaling out on Dask: which Prefect task runner a run uses and how many shards it keeps in flight.

``--workers N`` starts a local Dask cluster of N worker processes (one per GPU on a GPU host, each
seeing only its own through ``CUDA_VISIBLE_DEVICES``: ``gpu_cluster``); ``--cluster ADDRESS`` uses
a running scheduler. Each worker process loads the pipeline once
(``generate.load_engine`` caches it per process) and keeps it for every shard it runs. A worker
runs two shards at once: the engine's lock keeps the GPU to one of them, so the end of one shard
(its last batch's post-processing, storing, Prefect's bookkeeping) overlaps the next one's
generation. The flow keeps three shards per worker in flight, so memory stays flat however large
the catalog.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from .errors import ZImageBatchError
from .run import RunConfig

SHARD_SLOTS = 2  # shards a worker runs at once: the engine's lock lets one generate while the other finishes
SHARDS_PER_WORKER = 3  # two running (one generating, one finishing) and one waiting


class ClusterError(ZImageBatchError):
    """The Dask cluster cannot be reached or started."""


def cluster_workers(address: str, out: str | None = None, timeout: float = 10.0,
                    check_timeout: float = 120.0) -> tuple[int, bool]:
    """(workers, every worker has a GPU resource) of a running scheduler whose workers can run
    this version's shards (and, given the run's ``out``, see that folder); raises ClusterError."""
    from distributed import Client
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        # checked before a Client exists: a Client that fails to connect stays the process's default
        # client until it is collected, and a later DaskTaskRunner in this process would use its address
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
        silent = _not_dask(host, port, timeout / 2) if scheme == "tcp" else None
        if silent:  # a Client would wait for the handshake forever, whatever its timeout
            raise ClusterError(f"--cluster {address} is not a Dask scheduler: {silent}. Is it the scheduler's port "
                               f"(`dask scheduler` listens on 8786 by default), not its dashboard (8787) or a "
                               f"Prefect server (4200)?")
        client = Client(address, timeout=timeout)
    except ValueError as exc:  # e.g. "missing port number"
        raise ClusterError(f"--cluster {address!r} is not a Dask scheduler address ({exc}): use tcp://HOST:PORT, "
                           f"e.g. tcp://scheduler:8786.") from None
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"The Dask scheduler at {address} cannot be reached ({type(exc).__name__}: {exc}). Check that "
            f"`dask scheduler` runs there, that the address and port (default 8786) are right and that "
            f"this machine can reach it."
        ) from None
    with client:
        workers = list(client.scheduler_info(n_workers=-1)["workers"].values())
        if not workers:
            raise ClusterError(f"The Dask scheduler at {address} has no workers. Start one per GPU: "
                               f"`CUDA_VISIBLE_DEVICES=0 ZIMAGE_BATCH_MODEL=MODEL dask worker {address} --nthreads 2 "
                               f"--resources GPU=2 --preload zimage_batch.worker` (infra/README.md).")
        check_workers(client, address, out, check_timeout)
    return len(workers), all(w.get("resources", {}).get("GPU") for w in workers)


def _not_dask(host: str, port: int, timeout: float) -> str | None:
    """Why the TCP listener at host:port is not a Dask scheduler, or None (also when it cannot be
    reached: connecting says that better). Dask's TCP comm sends its handshake as soon as a
    connection opens; a web server (a dashboard, Prefect) waits for a request and says nothing."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.settimeout(timeout)
            return None if connection.recv(1) else "it closed the connection without a word"
    except socket.timeout:
        return f"it accepted a connection but sent nothing in {timeout:.0f} s, as a web server does"
    except OSError:
        return None


def check_workers(client, address: str, out: str | None = None, timeout: float = 120.0) -> None:
    """Raise ClusterError naming the workers that cannot run this version of the shard task, or
    that do not see the run's ``out`` folder.

    A worker without the package (or with another version) cannot unpickle a shard; Dask then
    drops its connection and the shard waits forever. So each worker is asked first, with a
    function sent by value that needs nothing but the standard library. Its answer names the
    version and the fingerprint of the package's source taken when the worker imported it
    (``zimage_batch.SOURCE_FINGERPRINT``): the version string stays the same across commits, so a
    GPU host on an older checkout would pass on it. Workers that do not
    answer within ``timeout`` seconds (an import that hangs) are an error too. A worker that
    writes to a folder of its own (another machine's disk) makes images this run never sees, so
    each must see the lock file the run holds in ``out``."""
    import threading

    from . import SOURCE_FINGERPRINT, __version__
    from .store import LOCK

    lock = os.path.join(out, LOCK) if out else None

    def probe() -> str:
        import importlib
        import os

        try:
            importlib.import_module("flows.catalog_images")
            package = importlib.import_module("zimage_batch")
            version, source = package.__version__, getattr(package, "SOURCE_FINGERPRINT", "unknown")
            now = package._source_fingerprint() if hasattr(package, "_source_fingerprint") else source
            if now != source:  # modules it has not imported yet would come from the changed files
                source = f"{source}, its files since changed to {now}"
        except Exception as exc:  # any import failure is the answer, not an error here
            return f"{type(exc).__name__}: {exc}"
        return "no-out" if lock and not os.path.exists(lock) else f"ok {version} {source}"

    asked: dict = {}

    def ask() -> None:  # in a daemon thread: Client.run has no timeout of its own
        try:
            asked["answers"] = client.run(probe, on_error="return")
        except Exception as exc:
            asked["error"] = exc

    thread = threading.Thread(target=ask, name="zb-check-workers", daemon=True)
    thread.start()
    thread.join(timeout)
    if "answers" not in asked:
        why = (f"{type(asked['error']).__name__}: {asked['error']}" if "error" in asked
               else f"no answer in {timeout:.0f} s; a worker may be stuck importing its packages")
        raise ClusterError(f"The Dask workers at {address} did not answer whether they can run zimage-batch "
                           f"shards ({why}). Check the workers' logs, or restart them.")
    answers = asked["answers"]
    blind = sorted(worker for worker, answer in answers.items() if answer == "no-out")
    if blind:
        raise ClusterError(
            f"{len(blind)} of the {len(answers)} Dask worker(s) at {address} do not see --out {out} ({', '.join(blind)}: "
            f"no {LOCK} there, which this run holds): they would write the images where this machine cannot read "
            f"them. Put --out on storage that every worker and this machine share, under the same absolute path.")
    ours = f"ok {__version__} {SOURCE_FINGERPRINT}"
    wrong = {worker: answer for worker, answer in answers.items() if answer != ours}
    if wrong:
        listed = "; ".join(f"{worker}: {_said(answer)}" for worker, answer in sorted(wrong.items()))
        raise ClusterError(
            f"{len(wrong)} of the {len(answers)} Dask worker(s) at {address} cannot run the shards of this machine's "
            f"zimage-batch {__version__} (source {ours.split()[-1]}): {listed}. Install the same zimage-batch on them (the "
            f"same release, or the same commit of a checkout with `make venv`; with the same torch and diffusers) "
            f"and restart them.")


def _said(answer) -> str:
    """A worker's probe answer in words."""
    if isinstance(answer, BaseException):
        return f"{type(answer).__name__}: {answer}"
    if isinstance(answer, str) and answer.startswith("ok "):
        version, _, source = answer[3:].partition(" ")
        return f"has zimage-batch {version} (source {source})"
    return str(answer)


def lost_scheduler(exc: BaseException, config: RunConfig) -> ClusterError | None:
    """The error to show when a run stopped because its Dask scheduler went away; None for other errors.

    Dask cancels every waiting shard then (``FutureCancelledError``). Shards that finished have
    their records in ``OUT/.parts``, which the next run adopts, so the same command resumes."""
    if not (config.cluster or config.workers):
        return None
    from distributed.client import FutureCancelledError
    from distributed.comm import CommClosedError

    if not isinstance(exc, (FutureCancelledError, CommClosedError)):
        return None
    where = f"The Dask scheduler at {config.cluster}" if config.cluster else "This run's local Dask scheduler"
    # Which of the two comes first is a race; a closed comm's own text names internal objects
    reason = getattr(exc, "reason", None) if isinstance(exc, FutureCancelledError) else None
    return ClusterError(
        f"{where} went away during the run ({reason or 'scheduler-connection-lost'}). The images "
        f"finished so far are kept, with their records in {config.out}/.parts; once the scheduler and its workers "
        f"are back, run the same command again to make the rest.")


def task_runner(config: RunConfig, device: str):
    """The Prefect task runner for the run: Dask when asked, else Prefect's default (in-process)."""
    if config.cluster:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=config.cluster)
    if config.workers:
        from prefect_dask import DaskTaskRunner

        if device.startswith("cuda"):
            gpus = visible_gpus()
            if config.workers > len(gpus):
                raise ClusterError(f"--workers {config.workers} gives each worker a GPU of its own, but this host has "
                                   f"{len(gpus)} ({', '.join(gpus) or 'none'}). Use --workers {len(gpus)} or fewer.")
            return DaskTaskRunner(cluster_class=gpu_cluster, cluster_kwargs={"gpus": gpus[:config.workers]})
        return DaskTaskRunner(cluster_class=local_cluster,
                              cluster_kwargs={"n_workers": config.workers, "processes": True,
                                              "threads_per_worker": SHARD_SLOTS, "resources": {"GPU": SHARD_SLOTS},
                                              "dashboard_address": "127.0.0.1:0"})
    return None


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indexes or UUIDs; each
    once, up to the first empty entry, where CUDA stops reading the list)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        gpus: list[str] = []
        for gpu in (entry.strip() for entry in listed.split(",")):
            if not gpu:
                break
            if gpu not in gpus:
                gpus.append(gpu)
        return gpus
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C while the block starts processes, which inherit it. A terminal sends SIGINT to the
    whole process group: a local cluster's workers died of it, and the run, which stops them itself
    after a Ctrl-C (cli.stopping_on_ctrl_c), waited for their shards forever."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def local_cluster(**kwargs):
    """``distributed.LocalCluster(**kwargs)`` whose worker processes ignore the terminal's Ctrl-C."""
    from distributed import LocalCluster

    with sigint_ignored():
        return LocalCluster(**kwargs)


def gpu_cluster(gpus: list[str]):
    """A local Dask cluster of one worker process per GPU, each seeing only its own
    (``CUDA_VISIBLE_DEVICES``), with two shard slots and an equal share of this host's memory: what
    dask-cuda's LocalCUDACluster did, without dask-cuda (no release of it installs beside the
    ``distributed`` this version needs)."""
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    options = {"nthreads": SHARD_SLOTS, "resources": {"GPU": SHARD_SLOTS}, "memory_limit": MEMORY_LIMIT // len(gpus),
               "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}  # loopback only: a worker runs what it is sent
    workers = {f"gpu-{gpu}": {"cls": Nanny, "options": {**options, "env": {"CUDA_VISIBLE_DEVICES": gpu}}} for gpu in gpus}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    with sigint_ignored():
        return SpecCluster(workers=workers, scheduler=scheduler, name="zimage-batch")


def shape(config: RunConfig) -> tuple[int, bool]:
    """(workers, whether to ask for a GPU resource) of the run's cluster; (1, False) without Dask."""
    if config.cluster:
        return cluster_workers(config.cluster, config.out)
    if config.workers:
        return config.workers, True
    return 1, False


def in_flight(config: RunConfig, workers: int) -> int:
    """How many shards the flow keeps submitted at once. Without Dask, Prefect's thread runner runs
    every submitted shard at once, so two: one generating while the other finishes (as on a worker)."""
    if not (config.cluster or config.workers):
        return SHARD_SLOTS
    return SHARDS_PER_WORKER * workers


def gpu_annotation(use_gpu_resource: bool):
    """``dask.annotate(resources={"GPU": 1})`` when the workers declare a GPU resource."""
    if not use_gpu_resource:
        return nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})


def configured_api() -> str | None:
    """The Prefect API this process is pointed at (``PREFECT_API_URL`` or Prefect's settings); None: none."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def check_prefect_api(cluster: bool = False) -> None:
    """Fail fast, before a model loads, when ``PREFECT_API_URL`` names a server that does not answer
    (asked with Prefect's own client, so its TLS and API-key settings apply). A ``cluster`` run needs
    the server: the advice then leaves out running on a local one."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = configured_api()
    if not url:
        return  # a local server will be started
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise ZImageBatchError(
            f"PREFECT_API_URL={url} cannot be used ({type(problem).__name__}: {problem}). Start that Prefect server "
            f"(`prefect server start`) or correct the URL (it ends in /api)"
            + (": --cluster needs a server every worker can reach." if cluster else
               ", or unset PREFECT_API_URL to run on a local server this run starts.")
        )


@contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API for a run and the worker processes it starts. Yields its URL.

    ``PREFECT_API_URL`` (or the current Prefect settings) when set; else a local Prefect server
    (`prefect server start` on a free loopback port) started here and stopped at the end. It is a
    whole server, scheduler included, so `serve`'s cron runs fire (Prefect's own embedded server
    leaves its scheduler off), and it runs in its own session, so a terminal's Ctrl-C stops the run,
    not the server the run reports its end to. A reaper stops it if this process is killed outright.
    The URL goes into the environment so Dask workers on this host use the same server: without one
    shared server each worker process started its own (seen: four workers on two cores timed out).
    Workers on other hosts need ``PREFECT_API_URL`` set to a server they can reach (infra/README.md).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = configured_api()
    if configured:
        with _environment("PREFECT_API_URL", configured):
            yield configured
        return
    with _local_server() as url, _environment("PREFECT_API_URL", url), temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


@contextmanager
def _local_server(timeout: float = 120.0) -> Iterator[str]:
    """`prefect server start` on a free loopback port, in its own session; yields its API URL once healthy."""
    import socket
    import tempfile
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    log = tempfile.TemporaryFile()  # the server's own output, shown only if it fails to start
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    reaper = subprocess.Popen([sys.executable, "-m", "zimage_batch.reaper", str(os.getpid()), str(server.pid)],
                              start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode("utf-8", "replace").strip()[-600:]
                why = "it exited" if server.poll() is not None else f"no answer in {timeout:.0f} s"
                raise ZImageBatchError(
                    f"The local Prefect server did not start ({why}; its output ends: {tail}). Check that PREFECT_HOME "
                    f"({os.environ.get('PREFECT_HOME', '~/.prefect')}) is writable, or point PREFECT_API_URL at a "
                    f"running Prefect server.")
            time.sleep(0.2)
        yield url
    finally:
        _drain_prefect()  # logs and events Prefect still holds go to the server before it stops
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        reaper.kill()
        reaper.wait()
        log.close()


def _drain_prefect(timeout: float = 10.0) -> None:
    """Send what Prefect's background workers still hold (flow-run logs, events) while the server is up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the duration (child processes inherit it), then as before."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
