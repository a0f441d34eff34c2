"""Guarding a run: its directory lock, a fresh start's old logs, preemption signals, watchdogs.

- `claim_run_dir` creates <run_dir>/run.lock (pid, host, process start time), refuses a directory
  another live process holds, replaces a stale lock, releases it at exit, and removes a run
  directory it created when the run fails before its first step.
- A fresh start (step 0) moves an earlier metrics.jsonl and tensorboard/ aside (`set_aside_logs`).
- `StopSignal` turns the first SIGTERM/SIGINT of the training loop into "finish this step, save,
  exit EXIT_PREEMPTED"; a second one exits at once with 128 + the signal number.
- Watchdogs: `stop_for_nonfinite` (max_nonfinite_skips, 0 = never stop) and
  `zero_reward_warning` (zero_reward_warn_steps steps in a row with reward 0).
- Bad inputs: inside `exit_on_bad_input()` a ValueError or OSError ends the script with its message
  and exit status 1 (train_rl and eval_rl load every input there, before writing anything).

Test: `python -m pytest -q tests/test_run_safety.py -m "not slow"` (the trainer-level cases are `slow`).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from jaxrl.run_state.paths import RunPaths, RunStateError

EXIT_PREEMPTED = 5  # stopped by SIGTERM/SIGINT after saving; a second signal exits 128 + signum at once


# ------------------------------------------------------------------------------------------
# The run-directory lock


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = _start_time(pid)
    return holder.get("start_time") is None or started is None or started == holder["start_time"]


class RunClaim:
    """The lock on a run directory; `training_started` keeps the directory when the run then fails."""

    def __init__(self, run_dir: Path, lock: Path, created: Path | None):
        self.run_dir, self.lock, self.created, self.training_started = run_dir, lock, created, False

    def release(self) -> None:
        """Remove the lock if it is ours, and the folders this run created (the run directory, and
        out_dir if it was new) if it never trained."""
        try:
            if json.loads(self.lock.read_text(encoding="utf-8")).get("pid") == os.getpid():
                self.lock.unlink()
        except (OSError, ValueError):
            pass
        if self.created is not None and not self.training_started:
            shutil.rmtree(self.created, ignore_errors=True)


def _busy_message(run_dir: Path, lock: Path, holder: dict | None) -> str:
    if holder is None:
        return (f"run directory {run_dir} is locked by {lock}, which cannot be read; if no other run uses "
                f"this directory, delete the lock (rm {lock}) and start again")
    host, here = holder.get("host"), socket.gethostname()
    check = "it is still running" if host == here else f"on {host} jaxrl cannot check from {here} whether it still runs"
    return (f"run directory {run_dir} is in use by pid {holder.get('pid')} on host {host} (since "
            f"{holder.get('started')}; {check}). Wait for that run to end or stop it, or choose another run "
            f"name or out_dir; if that process is gone, delete the lock: rm {lock}")


def _read_holder(lock: Path) -> dict | None:
    for _ in range(3):  # a lock just created may not hold its record yet
        try:
            holder = json.loads(lock.read_text(encoding="utf-8"))
            if isinstance(holder, dict):
                return holder
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return None


def claim_run_dir(run_dir: str | os.PathLike) -> RunClaim:
    """Create `run_dir` (parents too) and take its lock, released at exit (see RunClaim.release).
    Raises RunStateError naming the holder's pid and host when another live process holds it."""
    run_dir = Path(run_dir)
    created = None  # the topmost folder this call creates
    if not run_dir.exists():
        created = run_dir
        while not created.parent.exists():
            created = created.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunPaths(run_dir).lock
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            if holder == {}:
                continue  # released meanwhile
            if holder is None or holder.get("host") != me["host"] or _alive(holder):
                if created is not None:
                    shutil.rmtree(created, ignore_errors=True)
                raise RunStateError(_busy_message(run_dir, lock, holder)) from None
            print(f"note: replacing the stale lock {lock} of pid {holder.get('pid')} on {holder.get('host')} "
                  "(that process is gone)", file=sys.stderr, flush=True)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        claim = RunClaim(run_dir, lock, created)
        atexit.register(claim.release)
        return claim
    raise RunStateError(f"could not take the lock {lock}: another run keeps taking it; choose another run name")


# ------------------------------------------------------------------------------------------
# Fresh start, preemption, watchdogs


def set_aside_logs(run_dir: str | os.PathLike) -> list[Path]:
    """A run starting at step 0: move an earlier metrics.jsonl and tensorboard/ to
    metrics.before-restart-<UTC time>.jsonl and tensorboard.before-restart-<UTC time>; returns the new paths."""
    paths, stamp = RunPaths(run_dir), time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for old in (paths.metrics, paths.tensorboard):
        new = old.with_name(f"{old.stem}.before-restart-{stamp}{old.suffix}")
        if old.exists():
            os.replace(old, new)
            moved.append(new)
    return moved


class StopSignal:
    """SIGTERM/SIGINT handling. Before `defer()` a signal exits at once (nothing is trained yet);
    after it, the first signal sets `signum` (the loop finishes its step, saves and exits
    EXIT_PREEMPTED) and a second one runs `on_exit` and exits at once with 128 + its number."""

    def __init__(self, on_exit=None):
        self.signum, self.deferring, self.on_exit = None, False, on_exit
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def defer(self) -> None:
        self.deferring = True

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.deferring:
            print(f"\n{name}: stopping before the first step (nothing to save)", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        if self.signum is not None:
            print(f"\n{name} again: exiting now without saving (the last checkpoint is intact)",
                  file=sys.stderr, flush=True)
            if self.on_exit is not None:
                self.on_exit()
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{name}: finishing this step, then saving a checkpoint and exiting "
              f"(exit {EXIT_PREEMPTED}); send it again to exit at once", file=sys.stderr, flush=True)


def resume_command(argv: list[str]) -> str:
    """The command line that resumes a run started with `argv` (sys.argv)."""
    import shlex

    args = [a for a in argv[1:] if a not in ("--resume", "--resume=true")]
    return "python " + shlex.join([argv[0], *args, "--resume"])


def stop_for_nonfinite(consecutive: int, limit: int) -> bool:
    """max_nonfinite_skips: stop after `limit` consecutive skipped steps; 0 never stops."""
    return limit > 0 and consecutive >= limit


def zero_reward_warning(streak: list[int], limit: int, last_eval: dict | None) -> str | None:
    """The warning when the reward was 0 on every sample in each of the last `limit` steps (`streak`
    lists those steps); repeated every `limit` steps while it lasts; limit 0 never warns."""
    if limit <= 0 or not streak or len(streak) % limit:
        return None
    ks = sorted(k for k in (last_eval or {}) if k.startswith("pass@"))
    seen = ("no pass@k eval yet" if not ks else f"the last eval (step {last_eval['step']}) had "
            + ("pass@k 0 for every k" if all(last_eval[k] == 0 for k in ks) else
               ", ".join(f"{k} {last_eval[k]:.3f}" for k in ks)))
    return (f"warning: the reward was 0 on every sample for {len(streak)} consecutive steps (steps {streak[0]}-"
            f"{streak[-1]}; {seen}): every advantage is 0, so nothing is learned. Likely causes: broken weights "
            "(NaN or garbage in the checkpoint; try eval_rl.py on it) or a reward that never fires (answers the "
            "task cannot parse or the model cannot produce: check task and data_dir). zero_reward_warn_steps=0 "
            "silences this")


@contextlib.contextmanager
def exit_on_bad_input():
    """A bad input found while loading (a damaged checkpoint, an empty data file, a prompt that does not
    fit) ends the script with its message and exit status 1, before the script writes anything."""
    try:
        yield
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError and RunStateError are ValueErrors
        raise SystemExit(f"error: {e}") from None
