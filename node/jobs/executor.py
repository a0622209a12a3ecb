"""The executors: queued jobs run in a local process pool, or as Ray tasks.

The runner claims the next due job (:func:`node.jobs.scheduler.next_job`),
submits :func:`node.jobs.worker.execute` and, on each tick, forgets finished
work, turns a worker that died into a ``crash`` and a stage past its limit
into a ``timeout`` (both under the one retry policy, :mod:`node.jobs.state`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from node.config import Settings
from node.db.models import Job, JobStage, utcnow
from node.db.session import Database
from node.jobs import state
from node.jobs.scheduler import context, next_job, radiomics_workers
from node.jobs.worker import execute, init_worker, ready
from node.pipelines import Pipeline
from node.stages import JobContext, Warm
from pipelines.errors import BadInput

log = logging.getLogger("node.jobs")


def gpu_lock_dir(settings: Settings) -> Path:
    """The folder of the GPU lock files (one per CUDA device index) under the storage root."""
    return settings.storage.root / "run" / "gpu"


class Runner:
    """The local executor: queued jobs run in a process pool, ``jobs.max_parallel`` at a time."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        pipelines: Sequence[Pipeline],
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        """Start the pool; :meth:`tick` claims and submits.

        ``on_finished`` is called (in a pool thread) each time a job's run
        ends, so the caller can deliver what it queued without waiting.
        """
        self.db, self.settings = db, settings
        self.pipelines = {p.name: p for p in pipelines}
        self.policy = state.RetryPolicy.from_settings(settings.jobs)
        self.on_finished = on_finished
        self.running: dict[int, Any] = {}
        self._mutex = threading.Lock()
        self._start()

    def warm_spec(self) -> Warm:
        """What a job worker loads when it starts: the extraction pool and the pipelines' models."""
        device = self.settings.jobs.device
        models = sorted({(p.segmentation_model, device) for p in self.pipelines.values()})
        return Warm(radiomics_workers(self.settings), tuple(models))

    def _start(self) -> None:
        # The GPU lock is a file lock, not a lock of this pool: a pool rebuilt
        # after a time-out kill shares it with the old pool's workers still running.
        logging_settings = self.settings.logging
        self.pool = ProcessPoolExecutor(
            max_workers=self.settings.jobs.max_parallel,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=init_worker,
            initargs=(
                gpu_lock_dir(self.settings),
                os.getpid(),
                logging_settings.level,
                logging_settings.file,
                self.warm_spec(),
            ),
        )
        self._warm()

    def _warm(self) -> None:
        """Start the pool's job workers now rather than when the first job comes.

        A worker's start-up (:func:`node.jobs.worker.init_worker`) imports the
        stages, loads the segmentation models and starts the warm extraction
        pool: seconds that would otherwise count in the first job's time.
        """
        for _ in range(self.settings.jobs.max_parallel):  # each submit starts one more worker
            self.pool.submit(ready)

    def _submit(self, ctx: JobContext, stages: list[str]) -> Any:
        future = self.pool.submit(execute, ctx, stages, policy=self.policy)
        if self.on_finished is not None:
            callback = self.on_finished
            future.add_done_callback(lambda _: callback())
        return future

    @staticmethod
    def _finished(handle: Any) -> tuple[bool, BaseException | None]:
        future: Future[str] = handle
        if not future.done():
            return False, None
        return True, future.exception()

    def tick(self, now: datetime | None = None) -> list[int]:
        """Forget finished futures, then submit queued jobs while slots are free."""
        with self._mutex:
            for job_id, handle in list(self.running.items()):
                finished, error = self._finished(handle)
                if finished:
                    del self.running[job_id]
                    if error is not None:
                        self._crashed(job_id, error)
            self._enforce_timeouts()
            submitted = []
            while len(self.running) < self.settings.jobs.max_parallel:
                claimed = self._claim(now or utcnow())
                if claimed is None:
                    break
                submitted.append(claimed)
            return submitted

    def _claim(self, now: datetime) -> int | None:
        with self.db.session() as s:
            job = next_job(
                s.scalars(select(Job).where(Job.state == state.QUEUED)).all(),
                now=now,
                policy=self.policy,
                in_offpeak=self.settings.jobs.in_offpeak,
                skip=self.running.keys(),
                pipelines=self.pipelines.keys(),
            )
            if job is None:
                return None
            pipeline = self.pipelines[job.pipeline]
            stages = [
                r.stage
                for r in s.scalars(
                    select(JobStage).where(JobStage.job_id == job.id).order_by(JobStage.id)
                )
            ]
            job_id = job.id
        try:
            ctx = context(self.db, self.settings, job, pipeline)
        except BadInput as exc:
            with self.db.session() as s:
                row = s.get(Job, job_id)
                assert row is not None
                state.transition(s, row, "reject", error=str(exc))
            return job_id
        self.running[job_id] = self._submit(ctx, stages or list(pipeline.stages))
        return job_id

    def _enforce_timeouts(self) -> None:
        """Kill a stage that runs past its pipeline's limit; the job retries or goes dead."""
        for job_id in list(self.running):
            with self.db.session() as s:
                job = s.get(Job, job_id)
                folder = Path(str(job.folder)) if job is not None and job.folder else None
                pipeline = self.pipelines.get(job.pipeline) if job is not None else None
            if folder is None or pipeline is None:
                continue
            try:
                info = json.loads((folder / "running.json").read_text())
            except (OSError, ValueError):
                continue
            stage = str(info.get("stage"))
            limit = pipeline.timeouts_s.get(stage)
            if limit is None or time.time() - float(info.get("started", 0)) <= limit:
                continue
            self._kill(self.running.pop(job_id), int(info.get("pid", 0)))
            self._timed_out(job_id, stage, limit)

    def _kill(self, handle: Any, pid: int) -> None:
        """Stop the process running a stage (the local pool is rebuilt: it breaks)."""
        import signal

        if pid > 0:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._start()

    def _timed_out(self, job_id: int, stage: str, limit: float) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            row = s.scalar(
                select(JobStage).where(JobStage.job_id == job_id, JobStage.stage == stage)
            )
            if job is None or row is None or job.state != state.RUNNING:
                return
            error = f"{stage} timed out after {limit:g} s"
            state.stage_failed(row, error)
            state.fail_attempt(
                s,
                job,
                "timeout",
                self.policy,
                error=error,
                detail={"stage": stage, "limit_s": limit},
            )

    def _crashed(self, job_id: int, error: BaseException) -> None:
        """A worker died under the job (not an error the stage raised): retried, or dead."""
        log.error("job %d: its worker ended abnormally", job_id, exc_info=error)
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None or job.state != state.RUNNING:
                return
            state.fail_attempt(
                s, job, "crash", self.policy, error=f"worker crashed: {error!r}"[:2000]
            )

    def shutdown(self) -> None:
        """Stop accepting work; running stages are abandoned (they resume after restart)."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def stop(self, grace_s: float) -> list[int]:
        """Give running jobs ``grace_s`` to finish, then end their workers.

        Returns the jobs still running at the deadline: their stage's work since
        its last checkpoint is lost, and the caller re-queues them
        (:func:`node.jobs.scheduler.recover`), so the next start resumes them at that stage.
        """
        with self._mutex:
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and not all(
                self._finished(h)[0] for h in self.running.values()
            ):
                time.sleep(0.1)
            left = [j for j, h in self.running.items() if not self._finished(h)[0]]
            self._terminate()
            return left

    def _terminate(self) -> None:
        # The pool's worker processes (a private attribute of ProcessPoolExecutor:
        # shutdown() alone lets a running stage go on and the interpreter wait for it).
        processes = dict(getattr(self.pool, "_processes", None) or {})
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes.values():
            with contextlib.suppress(OSError, ValueError):
                process.kill()


class RayRunner(Runner):
    """The Ray executor: the same :func:`execute` as a Ray task, GPUs as Ray resources.

    With ``jobs.executor.address`` it joins that cluster (``ray://head:10001``
    or ``auto``); without, it starts a local Ray instance. A job whose device
    is CUDA asks Ray for one GPU, so Ray runs one such job per GPU at a time.
    Workers reach the database and the job folders by the same URL and paths,
    so on a multi-machine cluster these must be shared (PostgreSQL and a
    shared file system).
    """

    def _start(self) -> None:
        import ray

        executor = self.settings.jobs.executor
        if not ray.is_initialized():
            if executor.address:
                ray.init(address=executor.address, include_dashboard=False)
            else:
                ray.init(num_cpus=executor.num_cpus, include_dashboard=False)
        # Any: ray's overloads type a function by its count of parameters, defaults aside.
        self._task: Any = ray.remote(execute)

    def _submit(self, ctx: JobContext, stages: list[str]) -> Any:
        gpus = 1 if ctx.device == "cuda" else 0
        return self._task.options(num_gpus=gpus, max_retries=0).remote(
            ctx, stages, self.policy.max_attempts, self.policy
        )

    @staticmethod
    def _finished(handle: Any) -> tuple[bool, BaseException | None]:
        import ray

        ready, _ = ray.wait([handle], timeout=0)
        if not ready:
            return False, None
        try:
            ray.get(handle)
        except Exception as exc:  # a worker died, or the task raised (not a stage error)
            return True, exc
        return True, None

    def _kill(self, handle: Any, pid: int) -> None:
        import ray

        ray.cancel(handle, force=True)

    def _terminate(self) -> None:
        for handle in self.running.values():
            self._kill(handle, 0)
        self.shutdown()

    def shutdown(self) -> None:
        """Leave the cluster (a local instance stops with it)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()


def make_runner(
    db: Database,
    settings: Settings,
    pipelines: Sequence[Pipeline],
    on_finished: Callable[[], None] | None = None,
) -> Runner:
    """The executor the configuration names (``jobs.executor.kind``)."""
    if settings.jobs.executor.kind == "ray":
        return RayRunner(db, settings, pipelines, on_finished)
    return Runner(db, settings, pipelines, on_finished)
