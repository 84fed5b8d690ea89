"""Writing a training run's directory (its layout: :mod:`soljax.runs`): the saved config, orbax
checkpoints of the whole :class:`~soljax.train.state.TrainState`, JSONL + TensorBoard metrics and
the training plot.

A run survives being killed at any moment: checkpoints are committed atomically by orbax (a
checkpoint torn by a kill is an uncommitted temporary directory, ignored and removed on resume),
``config.yaml`` is replaced atomically, every ``metrics.jsonl`` row is appended by one ``write`` and
on resume the rows after the restored checkpoint (and a torn last line) are dropped before the
batches are redone.

Test hook: ``SOLJAX_KILL_AT`` (comma-separated points) makes a run stop itself at a chosen point,
for the kill-and-resume tests: ``batch:N`` sends SIGKILL right after the metrics row of data batch N
is written, ``interrupt:N`` sends SIGINT there instead (the trainer's Ctrl-C path: it saves the state
and exits), ``terminate:N`` SIGTERM (the same path, as for a preempted job), and ``save:N`` sends
SIGKILL while checkpoint N is being written (its files are written, it is not committed yet). Unset,
it costs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import yaml

from soljax.config import TrainConfig
from soljax.errors import SoljaxError
from soljax.runs import read_metrics
from soljax.train.state import TrainState

# Keys that may change between a run and its resumption (a run may resume on another mesh);
# max_batches only with a constant learning rate (it sets the horizon of a decaying schedule).
RESUMABLE_CHANGES = {"max_batches", "checkpoint_every", "keep_checkpoints", "out_dir", "mesh_data", "mesh_model",
                     "shard_policy", "distributed", "coordinator_address", "num_processes", "process_id"}

KILL_AT_ENV = "SOLJAX_KILL_AT"
_KILL_SIGNALS = {"interrupt": signal.SIGINT, "terminate": signal.SIGTERM}  # other points: SIGKILL
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a checkpoint being written (not committed)


def kill_point(point: str, n: int) -> None:
    """Test hook (see the module docstring): stops this process when ``SOLJAX_KILL_AT`` names
    ``point:n``."""
    spec = os.environ.get(KILL_AT_ENV)
    if spec and f"{point}:{n}" in spec.replace(" ", "").split(","):
        os.kill(os.getpid(), _KILL_SIGNALS.get(point, signal.SIGKILL))


def _write_atomic(path: Path, text: str) -> None:
    """Replaces ``path`` by ``text`` in one step (a kill leaves the old or the new file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunWriter:
    """A run directory. In a multi-process run every process saves and restores checkpoints (each
    writes and reads its own shards; ``out_dir`` must be shared by all hosts), while only the
    ``primary`` process writes the config, metrics, TensorBoard events and plots."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, keep: int = 3, primary: bool = True):
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.keep = keep
        self.primary = primary
        self._tb = None
        self._manager = None
        self._saving = None  # the step being written (for the save:N test hook)

    # ------------------------------------------------------------------ checkpoints

    def _mgr(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            ckpts = self.out_dir / "checkpoints"
            if self.primary and ckpts.is_dir():  # checkpoints torn by a kill: never committed, never a step
                for torn in ckpts.glob(f"*{_TMP_SUFFIX}*"):
                    shutil.rmtree(torn)
            hook = ocp.AsyncOptions(post_finalization_callback=lambda: kill_point("save", self._saving)) \
                if os.environ.get(KILL_AT_ENV) else None
            opts = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True, async_options=hook)
            self._manager = ocp.CheckpointManager((self.out_dir / "checkpoints").absolute(), options=opts)
        return self._manager

    def start_fresh(self) -> None:
        """Starts a new run in ``out_dir`` (refusing to mix with an existing run's checkpoints)."""
        ckpts = self.out_dir / "checkpoints"
        if ckpts.is_dir() and any(_TMP_SUFFIX not in p.name for p in ckpts.iterdir()):
            raise SoljaxError(f"{self.out_dir} already holds a run: pass --resume to continue it or choose "
                              "another out_dir")
        if not self.primary:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.out_dir / "metrics.jsonl", "")
        _write_atomic(self.out_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def restore(self, abstract_state: TrainState) -> TrainState | None:
        """The latest checkpoint restored onto ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves;
        their shardings say where each array goes, whatever mesh saved it), or None."""
        import orbax.checkpoint as ocp

        if not (self.out_dir / "checkpoints").is_dir():
            return None
        saved = self.out_dir / "config.yaml"
        if saved.is_file():
            # a key the saved config lacks was added to soljax later: that run used its default
            old = {**TrainConfig().to_dict(), **(yaml.safe_load(saved.read_text()) or {})}
            new = self.cfg.to_dict()
            changed = sorted(k for k in set(old) | set(new)
                             if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
            if changed:
                raise SoljaxError(f"cannot resume {self.out_dir}: the config differs in {changed}")
            was, now, schedule = old.get("max_batches"), new.get("max_batches"), new.get("lr_schedule")
            if was != now and schedule != "constant":
                raise SoljaxError(f"cannot resume {self.out_dir} with max_batches={now}: it was {was}, the horizon "
                                  f"of its {schedule} learning-rate schedule (keep it, or continue as a new run)")
        step = self._mgr().latest_step()
        if step is None:
            return None
        try:
            state = TrainState.from_tree(self._mgr().restore(step, args=ocp.args.StandardRestore(abstract_state.to_tree())))
        except Exception as e:
            raise SoljaxError(f"cannot restore the checkpoint at {self.out_dir}/checkpoints/{step}: "
                              f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
        self._truncate_metrics(int(state.batch))
        print(f"soljax: resuming {self.out_dir} at data batch {int(state.batch)}", file=sys.stderr)
        return state

    def _truncate_metrics(self, batch: int) -> None:
        """Drops metric lines written after the restored checkpoint (they will be redone), and a
        last line torn by a kill."""
        path = self.out_dir / "metrics.jsonl"
        if not self.primary or not path.is_file():
            return
        keep = [row for row in read_metrics(path) if row["batch"] <= batch]
        _write_atomic(path, "".join(json.dumps(row) + "\n" for row in keep))

    def save(self, state: TrainState, final: bool = False) -> None:
        import orbax.checkpoint as ocp

        step = int(state.batch)
        mgr = self._mgr()
        if mgr.latest_step() != step:
            self._saving = step
            mgr.save(step, args=ocp.args.StandardSave(state.to_tree()), force=True)
        mgr.wait_until_finished()

    # ------------------------------------------------------------------ metrics

    def log(self, metrics: dict) -> None:
        if not self.primary:
            return
        fd = os.open(self.out_dir / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (json.dumps(metrics) + "\n").encode())  # one write call per row, never half buffered
        finally:
            os.close(fd)
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:
                self._tb = False
        if self._tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, metrics["batch"])
        kill_point("batch", metrics["batch"])
        kill_point("interrupt", metrics["batch"])
        kill_point("terminate", metrics["batch"])

    def progress(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc="train", unit="batch", disable=not (enabled and self.primary),
                    file=sys.stderr, dynamic_ncols=True)

    def close(self) -> None:
        """Flushes and releases the TensorBoard writer and the checkpoint manager (idempotent)."""
        if self._tb:
            self._tb.close()
        self._tb = None
        if self._manager is not None:
            self._manager.close()
        self._manager = None

    def plot(self) -> None:
        if self.primary:
            from soljax.plots import plot_training

            plot_training(read_metrics(self.out_dir / "metrics.jsonl"), self.out_dir / "training.png")
