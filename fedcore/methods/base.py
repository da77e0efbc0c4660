"""The method seam: what a fine-tuning method decides, on the server, on the wire and on the device.

A method is a frozen dataclass of its settings (equal settings, equal
method) that answers four questions; the round loop, the gRPC service and
the device daemon ask them and never name a method:

- the global model: what the server adds to the pretrained weights
  (`init_global`), which tensors devices train, upload and the server's
  strategy moves (`trainable`), the plain model for evaluation and export
  (`export`), what a checkpoint keeps beside it (`checkpoint_tensors`,
  `restore`, `check_checkpoint`);
- the update: how one arriving update becomes the delta folded into the
  round's running mean (`update_delta`, after the generic checks of
  `check_update`), so server memory stays one accumulator whatever the
  number of devices;
- the download: whether a device holding an earlier version of this run
  needs only the trainable tensors (`patches_trainable`), else broadcast
  deltas or the full model; every path ends on the version's digest;
- the device: the task's settings (`to_task` / `from_task`), and the model
  prepared to train (`bind` -> `Trainee`: which parameters learn, what the
  update holds).

`fedcore.methods.full` and `fedcore.methods.lora` are the two methods;
docs/explanation/methods.md walks through adding a third.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch

from fedcore.flops import T5Shape
from fedcore.memory import training_memory
from fedcore.wire import unique_tensors

if TYPE_CHECKING:
    from fedtune.v1 import fedtune_pb2 as pb


class UpdateInvalid(ValueError):
    """An update that must not be folded, with the reason a person can act on."""


class Trainee:
    """A model prepared to train as its method asks (bound on the device, one per method setting)."""

    #: the backward pass computes the model's own weight gradients (False: only adapters learn; FLOP counts).
    weight_grads: ClassVar[bool] = True
    #: binding changed the model's modules (peft layers): a different method needs a freshly built model.
    alters_model: ClassVar[bool] = False

    def __init__(self, method: Method, model: torch.nn.Module) -> None:
        self.method = method
        self.model = model

    @property
    def update_form(self) -> str:
        """The method's: "tensors" (trained by backprop, streamed in chunks) or "seeds" ((seed, scalar) pairs of
        a zero-order method, which trains by its own forward-only steps: `start`)."""
        return self.method.update_form

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put the downloaded global state into the model."""
        raise NotImplementedError

    def update_state(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """(tensors to upload under the global state's names, detached on the CPU; their tied aliases)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One log line: what trains."""
        raise NotImplementedError

    def update_base(self, base: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The downloaded state as `update_state` shapes it (what a delta upload is taken from)."""
        return base

    def residual_key(self, name: str) -> str:
        """The key of a tensor's error-feedback residual: only the same part of a tensor reuses it."""
        return name

    def start(self, task_seed: int):  # -> fedcore.methods.zeroorder.Estimator
        """A "seeds" trainee's steps for one task (seeded by the task)."""
        raise NotImplementedError(f"{type(self).__name__} trains by backprop: it has no estimator")


class Method:
    """One fine-tuning method; subclasses are frozen dataclasses of their settings."""

    name: ClassVar[str]

    # ---------------------------------------------------------------- settings
    def describe(self) -> str:
        """The method and its settings in words; also the checkpoint's record of how it was written."""
        raise NotImplementedError

    def validate(self) -> None:
        """ValueError for settings no run can use."""

    def check_transfers(self, download_payload: str, download_encoding: str) -> None:
        """ValueError for download settings this method cannot work with."""

    def to_task(self, training: pb.TrainingSettings) -> None:
        """Write the method's settings into a task (the device reads them back with `from_task`)."""
        training.method = self.name

    @classmethod
    def from_task(cls, training: pb.TrainingSettings) -> Method:
        """The method as a task describes it (settings not validated yet)."""
        return cls()

    # -------------------------------------------------------- the global model
    def init_global(self, state: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """The run's round-0 global state from the pretrained weights (default: as they are)."""
        return dict(state)

    def trainable(self, state: Mapping[str, torch.Tensor]) -> list[str] | None:
        """Names of the tensors devices train and upload and the strategy moves; None: every tensor."""
        return None

    #: local steps run a backward pass (zero-order methods: forward passes only, so a step holds the weights)
    backpropagates: ClassVar[bool] = True

    def memory_need(self, state: Mapping[str, torch.Tensor], shape: T5Shape, batch: int, input_tokens: int,
                    target_tokens: int) -> int:
        """Peak bytes of one local step (fedcore.memory): a device whose stated budget is below it sits out.

        ``state`` is canonical (ties once). Backpropagation reaches the
        earliest trainable tensor, so LoRA keeps the activations of every block.
        """
        names = self.trainable(state)
        trained = [] if not self.backpropagates else list(state) if names is None else names
        return training_memory(shape, {k: t.numel() for k, t in state.items()}, trained, batch, input_tokens,
                               target_tokens).total

    def export(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The global state as a plain model (loads into a T5 as is), ties kept."""
        return state

    def checkpoint_tensors(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps beside `export(state)` so a restarted server continues exactly."""
        return {}

    def restore(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global state from what `export` and `checkpoint_tensors` wrote (the server's own state removed)."""
        return dict(tensors)

    def check_checkpoint(self, meta: Mapping[str, str]) -> str:
        """Why a checkpoint with this metadata cannot be continued by this method ("" if it can)."""
        written = written_by(meta)
        if written == self.describe():
            return ""
        return f"was written with {written}, this server is set for {self.describe()}"

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": self.describe()}

    # ----------------------------------------------------------- the download
    #: Every version of a run shares every tensor outside `trainable` (frozen base): a device holding any
    #: earlier version of the run needs only the trainable tensors of the new one.
    patches_trainable: ClassVar[bool] = False

    # ------------------------------------------------------------- the update
    #: "tensors": the update is a set of tensors (chunked, verified, folded into a running mean of deltas);
    #: "seeds": (seed, scalar) pairs (fedcore.methods.zeroorder), folded per seed and replayed by devices
    update_form: ClassVar[str] = "tensors"
    #: each sampled device gets its own TrainPlan a round (fedcore.methods.partial): what it trains and uploads
    plans: ClassVar[bool] = False
    #: added to an upload manifest's rejection, telling what this method's update carries ("": nothing to add)
    upload_hint: ClassVar[str] = ""
    #: added to the round summary's upload description
    summary_note: ClassVar[str] = ""

    def summary_fields(self) -> dict[str, str]:
        """Keys the round summary carries for this method."""
        return {}

    def update_delta(self, update: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor],
                     is_delta: bool) -> dict[str, torch.Tensor]:
        """The float update as an fp32 delta from the global trainable tensors (what the round averages)."""
        return {k: (v.float() if is_delta else v.float() - glob[k].float())
                for k, v in update.items() if v.is_floating_point()}

    def check_update(self, update: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor]) -> None:
        """UpdateInvalid for an update the round must not fold: other tensors, shapes or dtypes, NaN or Inf."""
        if set(update) != set(glob):
            raise UpdateInvalid(f"tensors {sorted(set(update) ^ set(glob))[:3]} differ from the model's")
        for name, t in update.items():
            g = glob[name]
            if t.dtype != g.dtype or t.shape != g.shape:
                raise UpdateInvalid(f"{name}: {t.dtype} {tuple(t.shape)} does not match the model's "
                                    f"{g.dtype} {tuple(g.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise UpdateInvalid(f"tensor {name} holds NaN or Inf")

    # ------------------------------------------------------------- the device
    def bind(self, model: torch.nn.Module) -> Trainee:
        """`model` prepared to train as this method asks (the device side)."""
        raise NotImplementedError


def written_by(meta: Mapping[str, str]) -> str:
    """The method a checkpoint was written with, as `Method.describe` said it.

    Checkpoints from before the method seam say only "lora" (a LoRA run's
    description) and nothing for full fine-tuning.
    """
    return meta.get("method") or meta.get("lora") or FULL_DESCRIPTION


FULL_DESCRIPTION = "full fine-tuning"


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of an update's delta, summed in fp64 (inf or nan when it overflows or is not finite)."""
    return float(torch.sqrt(sum((d.double().pow(2).sum() for d in delta.values()),
                                torch.zeros((), dtype=torch.float64))))


def canonical_update(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """A state's tensors once each (tied ones under their first name), detached on the CPU, and the ties."""
    entries = unique_tensors(state)
    return {e.name: e.tensor.detach().cpu() for e in entries}, {e.name: list(e.aliases) for e in entries}
