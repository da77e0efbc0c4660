"""Download planning: what a device holding version v is sent to reach the current version.

In order of preference: for a zero-order method, the seeds of every round
since the version it holds (a few KB a round, replayed by the device);
only the trainable tensors, put into the version it holds (a method whose
versions share every frozen tensor, such as LoRA), or only the tensors
changed since that version (methods whose devices train parts: plans);
the chain of broadcast deltas the model kept (`download_payload = "delta"`)
while it costs less than the model; else the full model. Every path ends
on the version's digest, which the device checks. Encoders are built once a
version and shared by every device's stream.
"""
from __future__ import annotations

import logging
import threading

import torch

from fedcore import directions
from fedcore.wire import FrozenStream, StateEncoder, TransferSpec, codec_name, encoding_name
from fedtune.v1 import fedtune_pb2 as pb

from .model import GlobalModel

log = logging.getLogger("fedserver.downloads")


class DownloadPlanner:
    def __init__(self, model: GlobalModel, spec: TransferSpec, payload: str) -> None:
        self.model = model
        self.spec = spec  # full-model downloads, unless a device asks for another encoding or codec
        self.payload = payload  # "weights" or "delta" (broadcast deltas kept for devices a few versions behind)
        self._encoders: dict[tuple, StateEncoder] = {}  # (version, encoding, codec[, base version])
        self._sent_lock = threading.Lock()
        self._sent: dict[tuple[str, str], tuple[set[tuple[str, int]], list[int]]] = {}

    def encoder(self, device_id: str, encoding: int, codec: int, base_version: str = ""
                ) -> StateEncoder | FrozenStream | pb.SeedReplay:
        """What a download of the current version streams to a device that holds `base_version` ("" none)."""
        m = self.model
        if self._encoders and next(iter(self._encoders))[0] != m.version:
            self._encoders.clear()  # a new version: the old encoders serve nobody now
        spec = self.spec
        codec_ = spec.codec if codec == pb.CODEC_UNSPECIFIED else codec_name(codec)
        if base_version and base_version != m.version and m.method.update_form == "seeds":
            replay = self.replay(base_version)
            if replay is not None:
                return replay
            log.info("download for %s: full model; its version %s... is not one of this run's", device_id,
                     base_version[7:19])
        if base_version and base_version != m.version:
            names = self._patch_names(base_version)
            if names is not None:
                return self._patch(device_id, base_version, codec_, names)
            if self.payload == "delta":
                step = self._delta_step(device_id, base_version)
                if step is not None:
                    return step
        enc_name = spec.encoding if encoding == pb.ENCODING_UNSPECIFIED else encoding_name(encoding)
        spec = TransferSpec(enc_name, codec_, spec.zstd_level, 0, spec.block_size, spec.chunk_elems)
        key = (m.version, spec.encoding_id, spec.codec_id)
        enc = self._encoders.get(key)
        if enc is None:
            enc = StateEncoder(m.state, spec, digest=m.version)
            self._encoders[key] = enc
        return enc

    def replay(self, base: str) -> pb.SeedReplay | None:
        """The seeds that take a device holding `base` to the current version; None when base is not in the run."""
        m = self.model
        chain = m.seeds.chain(base, m.version)
        if not chain:
            return None
        msg = pb.SeedReplay(base_version=base, second_block=list(m.method.spec.second_block),
                            directions=directions.SCHEME)
        for st in chain:
            r = msg.rounds.add(round=st.round, version=st.target, scale=st.pairs.scale if st.pairs.scale != 1 else 0)
            r.seeds[:], r.values[:] = st.pairs.seeds, st.pairs.values
            r.blocks[:] = st.pairs.blocks if any(st.pairs.blocks) else []
        return msg

    def expected_bytes(self, base_version: str) -> int:
        """Wire bytes (before compression) a device holding `base_version` will download, at most the model's."""
        m = self.model
        if base_version == m.version:
            return 0
        if base_version and m.method.update_form == "seeds":
            replay = self.replay(base_version)
            if replay is not None:
                return replay.ByteSize()
        full = m.wire_bytes(self.spec)
        names = self._patch_names(base_version)
        if names is not None:
            return m.wire_bytes(self.spec, self._patch_state(names))
        chain = m.history.chain(base_version, m.version) if base_version and self.payload == "delta" else None
        return min(sum(s.stream.wire_bytes for s in chain), full) if chain is not None else full

    def _patch_names(self, base: str) -> list[str] | None:
        """The tensors a device holding `base` needs (the rest of its version is the current one's); None when
        it needs more than a patch."""
        m = self.model
        if not base or base == m.version:
            return None
        if m.method.patches_trainable and base in m.versions:
            return list(m.trainable())  # every version of the run shares the frozen tensors
        if m.method.plans:
            return m.changed_since(base)  # devices trained parts: only those changed
        return None

    def _patch(self, device_id: str, base: str, codec: str, names: list[str]) -> StateEncoder:
        """The listed tensors of the current version, to be put into the version the device holds."""
        m, s = self.model, self.spec
        spec = TransferSpec(s.encoding, codec, s.zstd_level, 0, s.block_size, s.chunk_elems)
        key = (m.version, spec.encoding_id, spec.codec_id, base)
        enc = self._encoders.get(key)
        if enc is None:
            enc = StateEncoder(self._patch_state(names), spec, digest=m.version, base_version=base)
            self._encoders[key] = enc
            log.info("download for %s: %d changed tensor(s) only, %.3f MB on top of its %s... (the full model is "
                     "%.1f MB)", device_id, len(names), m.wire_bytes(spec, self._patch_state(names)) / 1e6,
                     base[7:19], m.wire_bytes(spec) / 1e6)
        return enc

    def _patch_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named canonical tensors under all their names (a patch of a tied tensor replaces every alias)."""
        aliases = self.model.aliases()
        return {a: self.model.state[n] for n in names for a in (n, *aliases[n])}

    def _delta_step(self, device_id: str, base: str) -> FrozenStream | None:
        m = self.model
        chain = m.history.chain(base, m.version)
        full = m.wire_bytes(self.spec)
        if chain is None:
            log.info("download for %s: full model; its version %s... is not among the last %d", device_id,
                     base[7:19], m.history.keep)
            return None
        cost = sum(s.stream.wire_bytes for s in chain)
        if cost >= full:
            log.info("download for %s: full model; %d delta(s) from %s... take %.1f MB, the model %.1f MB",
                     device_id, len(chain), base[7:19], cost / 1e6, full / 1e6)
            return None
        log.info("download for %s: delta %s... -> %s... (%.1f MB; %d step(s) to the current version, %.1f MB, "
                 "instead of %.1f MB)", device_id, base[7:19], chain[0].target[7:19], chain[0].stream.wire_bytes / 1e6,
                 len(chain), cost / 1e6, full / 1e6)
        return chain[0].stream

    # ---------------------------------------------------------- re-sent bytes
    def note_sent(self, device_id: str, version: str, base_version: str, chunk: pb.Chunk) -> None:
        """Count a chunk sent towards `version` (from `base_version` for a broadcast delta, else "");
        one sent before to the same device counts as re-sent."""
        n = len(chunk.payload) + len(chunk.scales)
        with self._sent_lock:
            sent, resent = self._sent.setdefault((device_id, version), (set(), [0]))
            key = (base_version, chunk.tensor, chunk.offset)
            if key in sent:
                resent[0] += n
            sent.add(key)

    def resent(self, device_id: str, version: str) -> int:
        with self._sent_lock:
            entry = self._sent.get((device_id, version))
            return entry[1][0] if entry else 0

