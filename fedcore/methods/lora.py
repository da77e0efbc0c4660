"""LoRA adapters in the global state: names, the shared initialisation of A, and merging.

Server and devices agree on one layout: for every targeted linear layer
``<module>`` (say ``encoder.block.0.layer.0.SelfAttention.q``) the global
state carries ``<module>.lora_A.weight`` (rank x in) and
``<module>.lora_B.weight`` (out x rank) next to the frozen ``<module>.weight``;
the layer computes ``W x + (alpha / rank) B A x``. These are peft's adapter
file names without its ``base_model.model.`` prefix.

Aggregation is FFA-LoRA (Sun et al. 2024): A is drawn once by the server,
sent with the first full download and never trained, B starts at zero and is
the only tensor devices train, upload and the server averages. With A common
and fixed, ``mean_i (s B_i A) = s mean_i(B_i) A``: averaging B is averaging
the weight updates exactly, which averaging A and B separately is not
(``mean(B) mean(A) != mean(B A)``).

The server side (the adapters in the global state, merging, the checkpoint)
is tensor code; the device side (`LoraAdapters`) injects peft's layers into
the model it trains, importing peft only then.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fedcore.wire import unique_tensors

from .base import Method, Trainee

if TYPE_CHECKING:
    from fedtune.v1 import fedtune_pb2 as pb

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
# The nn.Linear layers of a T5 by their attribute name (T5 v1.1 / FLAN-T5 have wi_0 and wi_1, T5 v1.0 wi).
T5_LINEAR = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo", "lm_head")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module, e.g. q,v")
        unknown = [t for t in self.targets if t not in T5_LINEAR]
        if unknown:
            raise ValueError(f"LoRA target(s) {', '.join(unknown)} are not T5 linear layers; choose from "
                             f"{', '.join(T5_LINEAR)}")

    def describe(self) -> str:
        return f"LoRA r{self.rank} alpha {self.alpha:g} on {','.join(self.targets)}"


def parse_targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def target_modules(state: Mapping[str, torch.Tensor], targets: tuple[str, ...]) -> list[str]:
    """Module paths, in state order, of the 2-D ``<module>.weight`` tensors whose last name is a target."""
    out = []
    for name, t in state.items():
        if not name.endswith(".weight") or is_adapter(name) or t.dim() != 2:
            continue
        module = name[:-len(".weight")]
        if module.rsplit(".", 1)[-1] in targets:
            out.append(module)
    return out


def init_adapters(state: Mapping[str, torch.Tensor], spec: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
    """A and B for every targeted layer: A as peft draws it (kaiming-uniform, bound 1/sqrt(in)), B zero.

    Seeded from the run seed only, so a restarted server or a second server
    of the same run draws the same A.
    """
    modules = target_modules(state, spec.targets)
    if not modules:
        raise ValueError(f"LoRA targets {','.join(spec.targets)} match no linear layer of the model")
    # A weight tied to another tensor (lm_head and the shared embedding of a tied T5) cannot take a merged
    # W + sBA under one name only: loading the merged model would push the adapter into its twin too.
    ties = {n: [e.name, *e.aliases] for e in unique_tensors(state) for n in (e.name, *e.aliases)}
    for m in modules:
        w = state[m + ".weight"]
        if w.device.type == "meta":  # shapes only (size estimates): no storage to tell ties by
            continue
        twins = [k for k in ties[m + ".weight"] if k != m + ".weight"]
        if twins:
            raise ValueError(f"LoRA target {m} is tied to {', '.join(twins)}; an adapter on a tied weight "
                             f"cannot be merged: leave {m.rsplit('.', 1)[-1]} out of lora_targets")
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        w = state[m + ".weight"]
        n_out, n_in = w.shape
        bound = 1.0 / math.sqrt(n_in)
        out[m + A_SUFFIX] = torch.empty(spec.rank, n_in, dtype=torch.float32).uniform_(-bound, bound, generator=g)
        out[m + B_SUFFIX] = torch.zeros(n_out, spec.rank, dtype=torch.float32)
    return out


def is_adapter(name: str) -> bool:
    return name.endswith((A_SUFFIX, B_SUFFIX))


def trainable_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The B matrices: the only tensors devices train and upload."""
    return [k for k in state if k.endswith(B_SUFFIX)]


def adapter_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module paths that carry an adapter pair in ``state``."""
    return [k[:-len(B_SUFFIX)] for k in state if k.endswith(B_SUFFIX)]


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """(alpha / rank) B A in fp32: what the adapter adds to its layer's weight."""
    return (b.float() @ a.float()) * scaling


def merged(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The plain model: W + (alpha / rank) B A for every adapted layer, adapters dropped.

    Untouched tensors are the same objects as in ``state``, so tied tensors stay tied.
    """
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for m in adapter_modules(state):
        w = state[m + ".weight"]
        out[m + ".weight"] = (w.float() + delta_weight(state[m + A_SUFFIX], state[m + B_SUFFIX], scaling)).to(w.dtype)
    return out


# Checkpoints hold the merged model under the model's own names (it loads into a T5 as is) and the unmerged
# weights of the adapted layers under this prefix, so a restarted server continues exactly.
BASE_PREFIX = "lora_base/"


@dataclass(frozen=True)
class FfaLora(Method):
    """FFA-LoRA on the method seam: A frozen at a shared init, only B trained, uploaded and averaged."""

    spec: LoraSpec
    name: ClassVar[str] = "lora"
    # Every version of a run shares the base weights and A: a device holding any of them needs only B.
    patches_trainable: ClassVar[bool] = True
    upload_hint: ClassVar[str] = " (LoRA: an update carries only the B matrices, <module>.lora_B.weight)"
    summary_note: ClassVar[str] = " B only"

    def describe(self) -> str:
        return self.spec.describe()

    def validate(self) -> None:
        self.spec.validate()

    def check_transfers(self, download_payload: str, download_encoding: str) -> None:
        if download_payload == "delta":
            raise ValueError("lora_rank > 0 with download_payload = 'delta': after the first download devices "
                             "already receive only the B matrices; set download_payload = 'weights'")
        if download_encoding.lower() != "fp32":
            raise ValueError(f"lora_rank > 0 needs download_encoding = 'fp32' (not {download_encoding!r}): "
                             f"adapter-only downloads replace B in the model a device holds, which must be the "
                             f"exact version the server sent")

    def to_task(self, training: pb.TrainingSettings) -> None:
        super().to_task(training)
        s = self.spec
        training.lora.rank, training.lora.alpha, training.lora.dropout = s.rank, s.alpha, s.dropout
        training.lora.target_modules.extend(s.targets)

    @classmethod
    def from_task(cls, training: pb.TrainingSettings) -> FfaLora:
        lo = training.lora
        return cls(LoraSpec(lo.rank, lo.alpha, tuple(lo.target_modules), lo.dropout))

    def init_global(self, state: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        # A drawn once from the run seed (every device trains on the same A), B zero: round 0's model is the base.
        return {**state, **init_adapters(state, self.spec, seed)}

    def trainable(self, state: Mapping[str, torch.Tensor]) -> list[str] | None:
        names = trainable_names(state)
        if not names:
            raise ValueError(f"{self.describe()}: the global state holds no LoRA adapters")
        return names

    def export(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        return merged(state, self.spec.scaling)

    def checkpoint_tensors(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {BASE_PREFIX + m + ".weight": state[m + ".weight"] for m in adapter_modules(state)}
        out.update({k: v for k, v in state.items() if is_adapter(k)})
        return out

    def restore(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The adapted layers' unmerged weights replace the merged ones.
        model = {k: v for k, v in tensors.items() if not k.startswith(BASE_PREFIX)}
        model.update({k[len(BASE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BASE_PREFIX)})
        return model

    def checkpoint_meta(self) -> dict[str, str]:
        # "lora" as checkpoints from before the method seam wrote it, so either reads the other's.
        return {**super().checkpoint_meta(), "lora": self.describe()}

    def summary_fields(self) -> dict[str, str]:
        return {"lora": self.describe()}

    def bind(self, model: torch.nn.Module) -> Trainee:
        return LoraAdapters(model, self)


class LoraAdapters(Trainee):
    """A T5 with peft LoRA layers on the spec's targets, trained FFA-LoRA style: A frozen, only B learns.

    peft injects its layers into ``model`` in place, so ``model`` itself is
    what fedclient.trainer trains. ``load`` and ``update_state`` speak the
    global state's names (``<module>.weight``, ``<module>.lora_A.weight``,
    ``<module>.lora_B.weight``), not peft's.
    """

    weight_grads: ClassVar[bool] = False
    alters_model: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module, method: FfaLora | LoraSpec) -> None:
        method = method if isinstance(method, FfaLora) else FfaLora(method)
        super().__init__(method, model)
        spec = self.spec = method.spec
        spec.validate()
        try:
            import peft
        except ImportError:
            raise ValueError(f"the server asked for {spec.describe()}, which needs peft on this device: "
                             f"pip install 'fedtune[lora]'") from None
        config = peft.LoraConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM, r=spec.rank, lora_alpha=spec.alpha,
                                 target_modules=list(spec.targets), lora_dropout=spec.dropout, bias="none")
        self.peft_model = peft.get_peft_model(model, config)
        # peft's names -> ours: "<m>.base_layer.weight" -> "<m>.weight", "<m>.lora_A.default.weight" -> "<m>.lora_A.weight"
        self.names = {k: k.replace(".base_layer.", ".").replace(".default.", ".") for k in model.state_dict()}
        params = dict(model.named_parameters())
        for k, p in params.items():
            p.requires_grad_(self.names.get(k, k).endswith(B_SUFFIX))
        self.b_params = {self.names[k]: p for k, p in params.items() if p.requires_grad}
        if not self.b_params:
            raise ValueError(f"{spec.describe()}: peft adapted no layer of this model")

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put the global state (base weights, A and B) into the model; names must match exactly."""
        ours = set(self.names.values())
        if ours != set(state):
            diff = sorted(ours ^ set(state))
            raise ValueError(f"the global model's tensors do not fit {self.spec.describe()} here: {len(diff)} "
                             f"differ, first {diff[0]!r}")
        self.model.load_state_dict({k: state[ours_k] for k, ours_k in self.names.items()}, strict=True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The B matrices, detached CPU copies under the global state's names: what the device uploads."""
        return {k: p.detach().to("cpu", copy=True) for k, p in self.b_params.items()}

    def update_state(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        # FFA-LoRA: only B changed, only B travels.
        state = self.trainable_state()
        return state, {k: [] for k in state}

    def describe(self) -> str:
        return f"{self.spec.describe()}: training {len(self.b_params)} B matrices; A stays as the server sent it"
