"""The offline pretrained base: a tiny T5 pretrained centrally on fedlab.basecorpus, built once and cached.

FLAN-T5 weights cannot be downloaded everywhere, and a method comparison on
a random-init model says little (LoRA only steers a pretrained base). This
builds the lab's stand-in for a pretrained checkpoint: deterministically
(same recipe, same machine, same torch -> same digest), in a few minutes on
two cores, saved as a Hugging Face model directory that `--weights-dir` and
every other loader read like real FLAN-T5.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedclient.trainer import StepTimes, timed_step
from fedcore.batching import EncodedExample, collate, encode_examples
from fedcore.data import train_eval_split
from fedcore.models import count_parameters, init_model
from fedcore.wire import digest
from fedlab.basecorpus import BASE_PRESET, Chat, Denoising, corrupt, dialogue_corpus

INFO_FILE = "fedtune-base.json"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the base's weights; its hash names the cache entry."""

    preset: str = BASE_PRESET
    steps: int = 360
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    examples: int = 6000
    held_out: int = 64
    denoise_share: float = 0.2
    question_share: float = 0.3
    denoising: Denoising = Denoising()
    seed: int = 0
    # Fixed, not the machine's core count: CPU kernels split reductions by thread, so the thread count is
    # part of what makes two builds bit-identical.
    threads: int = 2
    corpus_version: int = 1  # bump when fedlab.basecorpus changes what it generates

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def cache_root() -> Path:
    """$FEDTUNE_CACHE, else $XDG_CACHE_HOME/fedtune, else ~/.cache/fedtune."""
    if os.environ.get("FEDTUNE_CACHE"):
        return Path(os.environ["FEDTUNE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedtune"


def shown(path: Path) -> str:
    """A path as a person would type it: under the home directory as ~/..."""
    try:
        return "~/" + str(Path(path).resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)


def cached_dir(recipe: Recipe = Recipe()) -> Path:
    return cache_root() / "base" / f"{recipe.preset}-{recipe.key()}"


@dataclass
class BaseInfo:
    """What fedtune-base.json in a base directory says."""

    digest: str
    recipe: dict[str, Any]
    build_s: float
    parameters: int
    torch: str
    final_loss: float
    held_out: dict[str, float]  # on held-out chats of its own distribution: summaries, and answers to questions

    @classmethod
    def read(cls, path: Path) -> BaseInfo:
        data = json.loads((path / INFO_FILE).read_text())
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def _encode(tokenizer, recipe: Recipe, chats: Sequence[Chat], rng: random.Random) -> list[EncodedExample]:
    """Each dialogue becomes one pair: a span-corruption pair of the dialogue itself (denoise_share), a
    question about it ("who: ...", question_share), or its summary ("summarize: ...", the rest)."""
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    eos = tokenizer.eos_token_id
    summarize = encode_examples(tokenizer, [c.example for c in chats])

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for chat, pair in zip(chats, summarize):
        u = rng.random()
        if u < recipe.denoise_share:
            inp, tgt = corrupt(ids(chat.example.dialogue), sentinels, rng, recipe.denoising)
            out.append(EncodedExample(inp + [eos], tgt + [eos]))
        elif u < recipe.denoise_share + recipe.question_share:
            question, answer = rng.choice(chat.facts)
            out.append(EncodedExample(ids(f"{question}: {chat.example.dialogue}") + [eos], ids(answer) + [eos]))
        else:
            out.append(pair)
    return out


def _lr_factor(recipe: Recipe) -> Callable[[int], float]:
    """Linear warm-up, then a cosine down to a tenth."""
    def f(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return f


def pretrain(recipe: Recipe, progress: Callable[[int, float, float], None] | None = None
             ) -> tuple[torch.nn.Module, Any, list[Chat], float]:
    """(model, tokenizer, held-out pretraining chats, last loss), deterministically from the recipe."""
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    corpus = dialogue_corpus(recipe.examples + recipe.held_out, recipe.seed)
    train, held = train_eval_split(corpus, recipe.held_out, recipe.seed)
    encoded = _encode(tokenizer, recipe, train, random.Random(recipe.seed))
    model = init_model(recipe.preset, recipe.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(recipe))
    order = np.random.default_rng(recipe.seed)

    def batches():
        while True:
            perm = order.permutation(len(encoded))
            for start in range(0, len(perm) - recipe.batch_size + 1, recipe.batch_size):
                yield collate([encoded[int(i)] for i in perm[start:start + recipe.batch_size]])

    stream = batches()
    times = StepTimes()
    loss = float("nan")
    for step in range(recipe.steps):
        _, loss, _ = timed_step(model, opt, stream, torch.device("cpu"), times)
        sched.step()
        if progress:
            progress(step + 1, loss, times.total_s)
    model.eval()
    return model, tokenizer, held, loss


def answer_accuracy(model: torch.nn.Module, tokenizer, chats: Sequence[Chat]) -> dict[str, float]:
    """Exact-match share of greedy answers to each question kind ("who", "when", "where") over ``chats``."""
    pad = tokenizer.pad_token_id
    out: dict[str, float] = {}
    for question in (q for q, _ in chats[0].facts):
        prompts = tokenizer([f"{question}: {c.example.dialogue}" for c in chats], padding=True, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**prompts, max_new_tokens=40, do_sample=False, num_beams=1, pad_token_id=pad,
                                 decoder_start_token_id=model.config.decoder_start_token_id,
                                 suppress_tokens=list(range(len(tokenizer), model.config.vocab_size)) or None)
        answers = [a.strip() for a in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        out[question] = round(sum(a == dict(c.facts)[question] for a, c in zip(answers, chats)) / len(chats), 4)
    return out


def build(recipe: Recipe = Recipe(), out: Path | None = None,
          progress: Callable[[int, float, float], None] | None = None) -> Path:
    """Pretrain and save as a Hugging Face directory at ``out`` (default: the cache entry); returns it.

    Written to a temporary sibling and renamed into place, so a reader never sees half a base.
    """
    from fedserver.evaluate import evaluate

    out = Path(out) if out is not None else cached_dir(recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    t0 = time.monotonic()
    try:
        torch.set_num_threads(recipe.threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model, tokenizer, held, loss = pretrain(recipe, progress)
            figures = evaluate(model, tokenizer, [c.example for c in held], torch.device("cpu"), batch_size=32)
            answers = answer_accuracy(model, tokenizer, held)
    finally:
        torch.set_num_threads(threads)
    build_s = time.monotonic() - t0
    state = model.state_dict()
    info = BaseInfo(digest=digest(state), recipe=dataclasses.asdict(recipe), build_s=round(build_s, 1),
                    parameters=count_parameters(model), torch=torch.__version__, final_loss=round(loss, 4),
                    held_out={"n": figures.n, "summary_loss": round(figures.loss, 4),
                              "summary_rougeL": round(figures.rougeL, 2),
                              **{f"answer_{q}": v for q, v in answers.items()}})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_state_digest(path: Path) -> str:
    """The version digest of the weights saved in a base directory (as the server computes it)."""
    from transformers import T5ForConditionalGeneration

    return digest(T5ForConditionalGeneration.from_pretrained(path, local_files_only=True).state_dict())


def ensure(recipe: Recipe = Recipe(), echo: Callable[[str], None] = print, force: bool = False
           ) -> tuple[Path, BaseInfo]:
    """The cached base, built first if missing, damaged (its weights must match the digest it was saved with)
    or ``force``d.

    Runs started together on a fresh machine build it once: the others wait on a lock, then reuse it.
    """
    path = cached_dir(recipe)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f".{path.name}.lock", "a")
    except OSError as exc:
        raise _unwritable(path, exc) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"base: another process is building {shown(path)}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / INFO_FILE).exists() and not force:
            try:
                info = BaseInfo.read(path)
                if load_state_digest(path) == info.digest:
                    return path, info
                echo(f"base: {shown(path)} does not match its recorded digest; building it again")
            except Exception as exc:  # noqa: BLE001 - whatever makes a cache entry unreadable, it is rebuilt
                echo(f"base: {shown(path)} is unreadable ({exc}); building it again")
        echo(f"base: building the offline pretrained base ({recipe.preset}, {recipe.steps} steps on "
             f"{recipe.threads} threads) into {shown(path)}; this is done once per machine")
        try:
            build(recipe, path, progress_echo(recipe, echo))
        except OSError as exc:
            raise _unwritable(path, exc) from None
        info = BaseInfo.read(path)
    echo(f"base: built in {info.build_s:.0f} s, digest {info.digest[:19]}...")
    return path, info


def _unwritable(path: Path, exc: OSError) -> OSError:
    return OSError(exc.errno, f"cannot write the pretrained base to {shown(path)} ({exc.strerror or exc}); set "
                              f"FEDTUNE_CACHE to a writable directory, or run with --base random")


def progress_echo(recipe: Recipe, echo: Callable[[str], None], every_s: float = 15.0
                  ) -> Callable[[int, float, float], None]:
    """A progress callback for :func:`build` that prints a line at most every ``every_s`` seconds."""
    last = [time.monotonic()]

    def progress(step: int, loss: float, elapsed: float) -> None:
        if step == recipe.steps or time.monotonic() - last[0] > every_s:
            last[0] = time.monotonic()
            echo(f"base: step {step}/{recipe.steps}, loss {loss:.3f}, {elapsed:.0f} s")
    return progress


def describe(path: Path, info: BaseInfo, held_out: int = 48) -> list[str]:
    """What a base is and knows: its figures on its own distribution, and on the federated task's held-out set
    (the set `fedserver simulate` evaluates as round 0) when ``held_out`` > 0."""
    r, h = info.recipe, info.held_out
    lines = [f"base: {shown(path)}",
             f"  digest {info.digest}",
             f"  {info.parameters:,} parameters ({r['preset']}), {r['steps']} steps of {r['batch_size']} on "
             f"{r['threads']} threads, built in {info.build_s:.0f} s with torch {info.torch}",
             f"  its own distribution, {h['n']} held-out chats: summary loss {h['summary_loss']:.4f}, ROUGE-L "
             f"{h['summary_rougeL']:.2f}; exact answers who {h['answer_who']:.0%}, when {h['answer_when']:.0%}, "
             f"where {h['answer_where']:.0%}"]
    if held_out > 0:
        from fedcore.data import load_corpus
        from fedcore.models import load_tokenizer
        from fedserver.app import EVAL_CORPUS_SEED
        from fedserver.evaluate import evaluate
        from transformers import T5ForConditionalGeneration

        model = T5ForConditionalGeneration.from_pretrained(path, local_files_only=True)
        r0 = evaluate(model, load_tokenizer(path), load_corpus("builtin", held_out, EVAL_CORPUS_SEED),
                      torch.device("cpu"))
        lines.append(f"  the federated task (never seen), {r0.n} held-out dialogues: loss {r0.loss:.4f}, ROUGE-L "
                     f"{r0.rougeL:.2f} (simulate's round 0)")
    lines.append(f"  used by `fedserver simulate` (preset {r['preset']}) by default; elsewhere --weights-dir {shown(path)}")
    return lines
