"""The global model of a run: its state, its method, its versions and the steps between them.

Not thread-safe by itself: the coordinator reads it freely while a round
is open (the model does not change then) and changes it only under its
lock, with `commit`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedcore.methods import Method
from fedcore.methods.partial import Plan
from fedcore.methods.zeroorder import SeedPairs, apply_steps
from fedcore.wire import (ErrorFeedback, clone_tied, FrozenStream, StateEncoder, TransferSpec, apply_delta, layout_of,
                          state_digest, subtract, tensor_wire_bytes, unique_tensors)

from .errors import StateMismatch
from .storage import CheckpointError
from .strategy import RunningMean, SeedMean, ServerStrategy
from .versions import SEED_PREFIX, DeltaHistory, DeltaStep, SeedHistory, SeedStep

log = logging.getLogger("fedserver.model")

OPT_PREFIX = "server_opt/"
EF_PREFIX = "server_ef/"  # the broadcast-delta quantization residual, checkpointed with the model


@dataclass
class NextVersion:
    """A round's result before it is committed: the new state and, with broadcast deltas, the step to it."""

    canonical: dict[str, torch.Tensor]
    aliases: dict[str, list[str]]
    base: str
    delta: dict[str, torch.Tensor] | None = None  # the broadcast delta to send, tied like the state
    delta_spec: TransferSpec | None = None
    seeds: SeedPairs | None = None  # a zero-order round's steps (kept for replay)
    round: int = 0


@dataclass(frozen=True)
class Change:
    """The canonical tensors that changed from one version to the next."""

    base: str
    target: str
    names: tuple[str, ...]


# Versions whose changed tensors are kept (and checkpointed): a device further behind gets the full model.
CHANGES_KEEP = 64


@dataclass
class Resumed:
    """A checkpoint taken apart for a resumed server."""

    model: dict[str, torch.Tensor]
    version: str
    opt: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor]
    versions: list[str] | None
    seeds: SeedHistory | None
    records: list[dict[str, Any]] | None
    summary: dict[str, Any] | None
    changes: list[Change] = field(default_factory=list)


class GlobalModel:
    """The run's global state as its method keeps it (tied tensors under all their names)."""

    def __init__(self, state: Mapping[str, torch.Tensor], method: Method, delta_keep: int) -> None:
        self.method = method
        self.state = clone_tied(state)
        # What devices train and upload, and the strategy updates (None: every tensor).
        self.trainable_names: list[str] | None = method.trainable(self.state)
        self.layout = layout_of(self.state)
        self.upload_layout = (self.layout if self.trainable_names is None
                              else {k: self.layout[k] for k in self.trainable_names})
        self.version = state_digest(unique_tensors(self.state))
        self.initial_version = self.version  # round 0's model: devices holding these weights skip the first download
        # The versions of this run: with a method whose versions share every frozen tensor, a device holding
        # any of them needs only the trainable tensors of the current one.
        self.versions: list[str] = [self.version]
        self.history = DeltaHistory(delta_keep)
        self.broadcast_ef = ErrorFeedback()
        self.seeds = SeedHistory()  # zero-order methods: every round's steps, for replay
        # (version, the canonical tensors that changed to reach it) for the last CHANGES_KEEP versions: a device
        # holding one of them needs only the tensors changed since (methods whose devices train parts: plans).
        self.changes: list[Change] = []
        self._round_method: tuple[str, Method] | None = None  # (version, the method as its tasks carry it)

    # ------------------------------------------------------------------ views
    def canonical(self) -> dict[str, torch.Tensor]:
        return {e.name: e.tensor for e in unique_tensors(self.state)}

    def trainable(self) -> dict[str, torch.Tensor]:
        canonical = self.canonical()
        return canonical if self.trainable_names is None else {k: canonical[k] for k in self.trainable_names}

    def export(self) -> Mapping[str, torch.Tensor]:
        """The global model as a plain T5 (whatever the method keeps apart merged in), ties kept."""
        return self.method.export(self.state)

    def aliases(self) -> dict[str, list[str]]:
        return {e.name: e.aliases for e in unique_tensors(self.state)}

    def wire_bytes(self, spec: TransferSpec, state: Mapping[str, torch.Tensor] | None = None) -> int:
        """Wire bytes of the full model (or of `state`) at spec, before compression."""
        return sum(tensor_wire_bytes(e.tensor.dtype, e.tensor.numel(), spec.encoding_id, spec.block_size,
                                     spec.chunk_elems) for e in unique_tensors(self.state if state is None else state))

    def max_update_bytes(self) -> int:
        """A default bound on one upload's bytes: twice the trainable tensors at fp32, plus 1 MiB."""
        return 2 * sum(t.numel() * 4 for t in self.trainable().values()) + (1 << 20)

    def upload_layout_for(self, plan: Plan | None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """What an update must hold: the trainable tensors, or exactly a device's plan."""
        if plan is None:
            return self.upload_layout
        layout = plan.layout(self.layout)
        aliases = self.aliases()
        # A tied tensor travels once, under its first name, with the others as its aliases.
        return {**layout, **{a: layout[n] for n in layout for a in aliases.get(n, [])}}

    def changed_since(self, base: str) -> list[str] | None:
        """Canonical names of the tensors that changed from version `base` to the current one, in state order;
        None when `base` is not among the versions whose changes are kept."""
        names: set[str] = set()
        cur = self.version
        for step in reversed(self.changes):
            if cur == base:
                break
            if step.target != cur:
                return None
            names.update(step.names)
            cur = step.base
        if cur != base:
            return None
        return [e.name for e in unique_tensors(self.state) if e.name in names]

    def round_method(self) -> Method:
        """The method as this version's tasks carry it (FedKSeed-Pro: with the seeds' scores so far)."""
        if self.method.update_form != "seeds":
            return self.method
        if self._round_method is None or self._round_method[0] != self.version:
            self._round_method = (self.version, self.method.round_settings([st.pairs for st in self.seeds.steps]))
        return self._round_method[1]

    # ------------------------------------------------------------------ steps
    def new_mean(self) -> RunningMean | SeedMean:
        """The round's accumulator for this method's updates."""
        return SeedMean() if self.method.update_form == "seeds" else RunningMean(self.trainable())

    def seed_step(self, mean: SeedMean, number: int) -> NextVersion:
        """A zero-order round's next version: the steps the method makes of the mean values, added to a copy."""
        pairs = self.method.round_steps(mean.mean(), mean.scale())
        new = clone_tied(self.state)
        apply_steps(new, pairs, self.method.spec.second_block)
        return NextVersion({e.name: e.tensor for e in unique_tensors(new)}, self.aliases(), self.version,
                           seeds=pairs, round=number)

    def step(self, strategy: ServerStrategy, mean_delta: Mapping[str, torch.Tensor],
             delta_spec: TransferSpec | None, covered: Mapping[str, torch.Tensor | None] | None = None
             ) -> NextVersion:
        """The next version from the round's mean delta, through the server strategy (not committed yet).

        With `delta_spec` (broadcast deltas) the server moves its own model
        by exactly the decoded delta, so a device that adds the same decoded
        delta to the same version holds the same bits (digest-checked on
        arrival). What quantization left out is kept as a residual and added
        to the next round's step.
        """
        aliases = self.aliases()
        old = self.canonical()
        new = {**old, **strategy.apply(self.trainable(), mean_delta, covered)}
        if delta_spec is None:
            return NextVersion(new, aliases, self.version)
        send, received, residual = self.broadcast_ef.compensate(subtract(new, old), delta_spec.encoding_id,
                                                                delta_spec.block_size, delta_spec.chunk_elems)
        self.broadcast_ef.commit(residual)
        tied = dict(send)
        for name, names in aliases.items():
            for a in names:
                tied[a] = send[name]
        return NextVersion(apply_delta(old, received), aliases, self.version, {k: tied[k] for k in self.state},
                           delta_spec)

    def commit(self, nxt: NextVersion) -> None:
        if self.method.plans:
            old = self.canonical()
            changed = tuple(k for k, t in nxt.canonical.items() if t is not old[k] and not torch.equal(t, old[k]))
        self.state = self._tie(nxt.canonical, nxt.aliases)
        self.version = state_digest(unique_tensors(self.state))
        self.versions.append(self.version)
        if self.method.plans:
            self.changes.append(Change(nxt.base, self.version, changed))
            del self.changes[:-CHANGES_KEEP]
        if nxt.seeds is not None:
            self.seeds.add(SeedStep(nxt.round, nxt.base, self.version, nxt.seeds))
        if nxt.delta is not None:
            self.history.add(DeltaStep(nxt.base, self.version, FrozenStream(StateEncoder(
                nxt.delta, nxt.delta_spec, digest=self.version, base_version=nxt.base))))

    def _tie(self, canonical: Mapping[str, torch.Tensor], aliases: Mapping[str, list[str]]) -> dict[str, torch.Tensor]:
        new: dict[str, torch.Tensor] = {}
        for name, t in canonical.items():
            new[name] = t
            for a in aliases.get(name, []):
                new[a] = t
        # Keep the state dict's order so manifests and digests are stable.
        return {k: new[k] for k in self.state}

    # ------------------------------------------------------------- checkpoints
    def checkpoint(self, strategy: ServerStrategy) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) of the model's part of a checkpoint."""
        # Aliases included: storage keeps ties, and the model part of the file loads into a T5 as is.
        tensors = dict(self.export())
        tensors.update(self.method.checkpoint_tensors(self.state))
        for k, v in strategy.state_dict().items():
            tensors[OPT_PREFIX + k] = v
        for k, v in self.broadcast_ef.residual.items():
            tensors[EF_PREFIX + k] = v
        meta = {"version": self.version, "strategy": strategy.name, **self.method.checkpoint_meta()}
        if self.method.patches_trainable:
            meta["versions"] = json.dumps(self.versions)
        if self.method.plans:
            meta["changes"] = json.dumps([[c.base, c.target, list(c.names)] for c in self.changes])
        if self.method.update_form == "seeds":
            seeds, meta["seed_history"] = self.seeds.to_checkpoint()
            tensors.update(seeds)
        return tensors, meta

    def resumable(self, rnd: int, tensors: dict[str, torch.Tensor], meta: dict[str, str], strategy_name: str,
                  where: str) -> Resumed:
        """Split a verified checkpoint into what a resumed server uses.

        Raises StateMismatch for a run this server's settings cannot continue
        (another preset, method setting or strategy: nothing to fall back on) and
        CheckpointError for content that is not what the file says it is.
        """
        def mismatch(why: str) -> StateMismatch:
            return StateMismatch(f"checkpoint round {rnd} in {where} {why}; use the run's settings or another --out")

        why = self.method.check_checkpoint(meta)
        if why:
            raise mismatch(why)
        if meta.get("strategy", strategy_name) != strategy_name:
            raise mismatch(f"was written by strategy {meta['strategy']}, this server runs {strategy_name}")
        model = self.method.restore({k: v for k, v in tensors.items()
                                     if not k.startswith((OPT_PREFIX, EF_PREFIX, SEED_PREFIX))})
        missing = set(self.state) - set(model)
        if missing:
            raise mismatch(f"lacks {len(missing)} model tensors, e.g. {sorted(missing)[0]} (a run of another "
                           f"preset?)")
        for k, t in self.state.items():
            if (model[k].dtype, model[k].shape) != (t.dtype, t.shape):
                raise mismatch(f"holds {k} as {model[k].dtype} {tuple(model[k].shape)}, this model has "
                               f"{t.dtype} {tuple(t.shape)} (a run of another preset?)")
        model = {k: model[k] for k in self.state}
        version = state_digest(unique_tensors(model))
        if meta.get("version") and meta["version"] != version:
            raise CheckpointError(f"checkpoint round {rnd}: its model has digest {version[:19]}..., the "
                                  f"checkpoint says {meta['version'][:19]}...; the file is damaged")
        seeds = None
        if self.method.update_form == "seeds":
            try:
                seeds = SeedHistory.from_checkpoint({k: v for k, v in tensors.items() if k.startswith(SEED_PREFIX)},
                                                    meta.get("seed_history", "[]"))
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"checkpoint round {rnd}: its seed history is damaged ({e})") from None
            if seeds.steps and seeds.steps[-1].target != version:
                raise CheckpointError(f"checkpoint round {rnd}: its seed history ends on "
                                      f"{seeds.steps[-1].target[:19]}..., its model is {version[:19]}...")
        raw = meta_json(meta, "changes", list, rnd) or []
        if not all(len(c) == 3 and all(isinstance(x, str) for x in (c[0], c[1], *c[2])) for c in raw):
            raise CheckpointError(f"checkpoint round {rnd}: its record of changed tensors is damaged")
        changes = [Change(c[0], c[1], tuple(c[2])) for c in raw]
        return Resumed(model, version,
                       {k[len(OPT_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPT_PREFIX)},
                       {k[len(EF_PREFIX):]: v for k, v in tensors.items() if k.startswith(EF_PREFIX)},
                       meta_json(meta, "versions", str, rnd), seeds, meta_json(meta, "round_records", dict, rnd),
                       meta_json(meta, "round_summary", None, rnd), changes)

    def resume(self, found: Resumed) -> None:
        self.state, self.version = found.model, found.version
        self.versions = found.versions or [self.version]
        self.broadcast_ef.commit(found.residual)
        if found.seeds is not None:
            self.seeds = found.seeds
        self.changes = list(found.changes)


def meta_json(meta: Mapping[str, str], key: str, item: type | None, rnd: int) -> Any:
    """A JSON list of `item`s (item None: an object) from a checkpoint's metadata, None if absent."""
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint round {rnd}: metadata {key} is not JSON ({e})") from None
    ok = isinstance(value, dict) if item is None else (
        isinstance(value, list) and all(isinstance(v, item) for v in value))
    if not ok:
        raise CheckpointError(f"checkpoint round {rnd}: metadata {key} is not "
                              f"{'a JSON object' if item is None else 'a list of ' + item.__name__}")
    return value

