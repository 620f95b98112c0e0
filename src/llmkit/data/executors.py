"""Where the pipeline's shard tasks run: a local process pool, or a Dask cluster.

A task is a module-level function and a tuple of plain arguments (the work
directory, the phase, the shard), so it pickles by reference and runs in any
process that can import llmkit and see the work directory.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Callable

from tqdm import tqdm

from llmkit.errors import InputError


class LocalExecutor:
    """Tasks in a process pool (fork), or in this process when one worker is asked for."""

    def __init__(self, workers: int):
        self.workers = workers

    def run(self, function: Callable, arguments: list[tuple], description: str) -> None:
        progress = tqdm(total=len(arguments), desc=description, unit="shard")
        if self.workers == 1 or len(arguments) == 1:
            for task in arguments:
                function(*task)
                progress.update()
        else:
            with multiprocessing.Pool(min(self.workers, len(arguments)), initializer=_limit_threads) as pool:
                for _ in pool.imap_unordered(_call, [(function, task) for task in arguments]):
                    progress.update()
        progress.close()

    def close(self) -> None:
        pass


def _limit_threads() -> None:
    # The processes are the parallelism; threads inside each (torch, tokenizers, numpy's BLAS) would
    # oversubscribe the CPUs: langid's matrix-vector products ran 3-5x slower with two BLAS threads per worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import threadpoolctl
    import torch

    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)


def _call(function_and_arguments: tuple[Callable, tuple]):
    function, arguments = function_and_arguments
    return function(*arguments)


class DaskExecutor:
    """Tasks on a Dask cluster: a scheduler address, or a local cluster of ``workers`` processes."""

    def __init__(self, workers: int, scheduler: str | None):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise InputError("executor 'dask' needs dask.distributed (pip install 'llmkit[dask]')") from None
        if scheduler:
            self.client = Client(scheduler)
        else:
            self.client = Client(
                LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            )
        self.client.run(_limit_threads)

    def run(self, function: Callable, arguments: list[tuple], description: str) -> None:
        from dask.distributed import as_completed

        futures = [self.client.submit(function, *task, pure=False) for task in arguments]
        for future in tqdm(as_completed(futures), total=len(futures), desc=description, unit="shard"):
            future.result()  # a failed task raises here, with its traceback

    def close(self) -> None:
        cluster = self.client.cluster
        self.client.close()
        if cluster is not None:
            cluster.close()
