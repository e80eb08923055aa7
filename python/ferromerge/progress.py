"""A tqdm progress bar on stderr fed by the engine's progress callback: tensors done, GB/s and ETA (and, for a run
on Ray, a status line of tasks and nodes: the rate is then the cluster's)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class ProgressBar:
    """Callable as ``progress(tensors_done, tensors_total, bytes_done, bytes_total)``; the bar advances by bytes
    (tensors differ widely in size, so a byte-based rate and ETA are the meaningful ones)."""

    def __init__(self, desc: str = "merging") -> None:
        self._desc = desc
        self._bar: tqdm[Any] | None = None
        self._status = ""

    def __call__(self, tensors_done: int, tensors_total: int, bytes_done: int, bytes_total: int) -> None:
        bar = self._bar
        if bar is None:
            bar = self._bar = tqdm(
                total=bytes_total,
                desc=self._desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]",  # noqa: E501
            )
        status = f", {self._status}" if self._status else ""
        bar.set_description_str(f"{self._desc} {tensors_done}/{tensors_total} tensors{status}", refresh=False)
        bar.update(bytes_done - bar.n)

    def status(self, text: str) -> None:
        """A few words shown after the tensor count from the next update on (``3/10 tasks, 3 node(s)``)."""
        self._status = text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
