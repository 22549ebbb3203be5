"""A progress bar over steps, or over seconds when a time budget ends the run first."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


class Progress:
    """``update(step, elapsed)`` once per step; the bar counts steps, or seconds of the budget when one is set."""

    def __init__(self, desc: str, total_steps: int, budget_s: float | None, step: int = 0, disable: bool = False):
        self.timed = budget_s is not None and budget_s > 0
        disable = disable or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
        if self.timed:
            fmt = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}"
            self.bar = tqdm(total=round(budget_s), desc=desc, bar_format=fmt, disable=disable)
        else:
            self.bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=disable)
        self.postfix: dict[str, str] = {}

    def update(self, step: int, elapsed: float, **postfix: str) -> None:
        self.postfix.update(postfix)
        if self.timed:
            self.bar.n = min(elapsed, self.bar.total)
            self.bar.set_postfix(step=step, **self.postfix, refresh=False)
            self.bar.update(0)  # redraws at tqdm's own pace (mininterval), not once per step
        else:
            self.bar.update(step - self.bar.n)
            if postfix:
                self.bar.set_postfix(**self.postfix)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # before an error is printed: a bar left open is drawn again when the interpreter exits
