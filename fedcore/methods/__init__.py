"""Fine-tuning methods, one module each, on one seam (fedcore.methods.base).

`from_task` is how a device learns the method of its task; a server builds
its method from its config (fedserver.config.ServerConfig.method).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method, Trainee, UpdateInvalid
from .fedkseed import FedKSeed
from .fedspzo import FedSPZO
from .full import FullFineTuning
from .layerwise import LayerWise
from .lora import FfaLora
from .mezo import MeZO
from .partial import PartialMethod, Plan
from .smha import SelectiveHeads
from .zeroorder import ZeroOrderMethod

if TYPE_CHECKING:
    from fedtune.v1 import fedtune_pb2 as pb

#: every method by the name a task carries (TrainingSettings.method)
METHODS: dict[str, type[Method]] = {m.name: m for m in (FullFineTuning, FfaLora, MeZO, FedKSeed, FedSPZO, LayerWise,
                                                         SelectiveHeads)}
#: the zero-order methods by name: their updates are (seed, scalar) pairs (fedcore.methods.zeroorder)
ZERO_ORDER: dict[str, type[ZeroOrderMethod]] = {m.name: m for m in (MeZO, FedKSeed, FedSPZO)}
#: the methods that give each device its own part to train (a TrainPlan a round: fedcore.methods.partial)
PARTIAL: dict[str, type[PartialMethod]] = {m.name: m for m in (LayerWise, SelectiveHeads)}


def from_task(training: pb.TrainingSettings) -> Method:
    """The task's method; ValueError, naming it, for a method this device does not know.

    A task from a server older than the method seam names none: LoRA when it
    carries a LoRA rank, else full fine-tuning.
    """
    name = training.method or ("lora" if training.lora.rank > 0 else "full")
    cls = METHODS.get(name)
    if cls is None:
        raise ValueError(f"the task asks for fine-tuning method {name!r}, which this device does not know "
                         f"(it knows {', '.join(sorted(METHODS))}): update fedtune on the device")
    method = cls.from_task(training)
    method.validate()
    return method


__all__ = ["METHODS", "PARTIAL", "ZERO_ORDER", "FedKSeed", "FedSPZO", "FfaLora", "FullFineTuning", "LayerWise", "MeZO",
           "Method", "PartialMethod", "Plan", "SelectiveHeads", "Trainee", "UpdateInvalid", "ZeroOrderMethod",
           "from_task"]
