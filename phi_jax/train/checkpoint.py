"""Training checkpoints with Orbax's CheckpointManager: parameters, optimizer state, step, data position and
RNG seed, every N steps and at the end, keeping the last K.

Arrays restore straight into their mesh shardings (the abstract state carries them), in one process or many.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class TrainCheckpoints:
    """`save(step, state, meta)` / `restore(abstract_state) -> (state, meta)` under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        # every `save_every` steps, and when JAX's distributed preemption notice arrives; not Orbax's default
        # extra save of a run's first step (a whole model and optimizer state written after one step)
        policies = ocp.checkpoint_managers
        policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(max(1, save_every)),
                                         policies.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); asynchronous, `wait()` before exiting."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None) -> tuple[dict, dict]:
        """Restores the latest (or `step`) checkpoint onto `abstract_state`'s shapes, dtypes and shardings."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def meta(self, step: int) -> dict:
        """The JSON meta saved with `step` alone (no arrays read)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings=None):
    """`jax.ShapeDtypeStruct`s (with shardings) for a tree of arrays, the target of a restore."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
