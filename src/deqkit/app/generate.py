"""``deqkit generate``: sample text from a character-level language model run.

The checkpoint must come from ``deqkit train --model deq_transformer --data text`` (or
``--model transformer``). Its recorded config says which text the model was trained on; the
vocabulary is rebuilt from that text exactly as at training time (the sorted characters of
the corpus, :func:`deqkit.data.load_dataset`), so token ids mean the same characters.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch
from torch import nn

from deqkit import zoo
from deqkit.data import encode, load_dataset

from . import config, names
from .train import WeightEMA, build_model, load_checkpoint

_LANGUAGE_MODELS = (zoo.DEQTransformerLM, zoo.TransformerLM)


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "generate", help="sample text from a character-level language model run",
        description="Sample text from a run of `deqkit train --model deq_transformer --data "
        "text` (or --model transformer): prints the prompt and its continuation.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_FOLDER",
                   help="a checkpoint (.pt) or a run folder (its best.pt, else last.pt)")
    p.add_argument("--prompt", required=True, help="text to continue (characters of the "
                   "training text only)")
    p.add_argument("--tokens", type=int, default=200,
                   help="characters to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 = greedy, always the likeliest (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the K likeliest characters only (default: all)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed: the same seed gives the same text (default: random)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(func=run_generate)
    return p


def _checkpoint_file(path: str) -> str:
    """``path``, or a run folder's ``best.pt`` (else ``last.pt``)."""
    if not os.path.isdir(path):
        return path
    for name in ("best.pt", "last.pt"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ValueError(f"run folder {path!r} holds no checkpoint (best.pt or last.pt): no epoch "
                     "has finished yet.")


def load_language_model(path: str, device: str = "cpu") -> tuple[nn.Module, str]:
    """The language model of a checkpoint or run folder (averaged weights for an ``--ema``
    run), in eval mode, and its vocabulary (index -> character)."""
    path = _checkpoint_file(path)
    ckpt = load_checkpoint(path)
    cfg = config.from_mapping(dict(ckpt["config"]), source=f"checkpoint {path!r}")
    factory = names.MODELS[cfg.model]
    if not (isinstance(factory, type) and issubclass(factory, _LANGUAGE_MODELS)):
        raise ValueError(
            f"checkpoint {path!r} holds a {cfg.model!r} model trained on {cfg.data!r}, not a "
            "character-level language model; generate needs a run of `deqkit train --model "
            "deq_transformer --data text` (or --model transformer).")
    splits = load_dataset(cfg.data, root=cfg.data_root, seed=cfg.seed, subset=cfg.subset,
                          **cfg.data_args)
    model = build_model(cfg, splits.spec)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path!r}: 'model' does not fit the model of its config "
                         f"(was the training text changed since?): {str(err).splitlines()[0]}"
                         ) from None
    if "ema" in ckpt:
        ema = WeightEMA(model, float(ckpt["ema"]["decay"]))
        ema.load_state_dict(ckpt["ema"])
        ema.copy_to(model)
    return model.to(config.resolve_device(device)).eval(), splits.spec.vocab


def check_prompt(prompt: str, vocab: str) -> torch.Tensor:
    """The prompt's character ids; ValueError listing the characters outside ``vocab``."""
    if not prompt:
        raise ValueError("--prompt is empty: give at least one character to continue.")
    missing = sorted(set(prompt) - set(vocab))
    if missing:
        raise ValueError(f"--prompt has {len(missing)} character(s) not in the model's "
                         f"vocabulary: {missing}; its {len(vocab)} characters are "
                         f"{vocab!r}.")
    return encode(prompt, vocab)


def check_options(tokens: int, temperature: float, top_k: int | None) -> None:
    """Refuse a negative length, temperature or top-k."""
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}.")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}.")


@torch.no_grad()
def sample(model: nn.Module, ids: torch.Tensor, tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``ids`` followed by ``tokens`` sampled ids; the model sees at most its ``block_size``
    last ids. ``temperature`` 0 picks the likeliest id (greedy)."""
    check_options(tokens, temperature, top_k)
    device = next(model.parameters()).device
    out = ids.reshape(-1).cpu()
    window = int(getattr(model, "block_size", len(out) + tokens))
    for _ in range(tokens):
        context = out[-window:].unsqueeze(0).to(device)
        logits = model(context)[0, -1].double().cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=generator))
        out = torch.cat([out, torch.tensor([nxt], dtype=out.dtype)])
    return out


def generate(path: str, prompt: str, tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, device: str = "cpu") -> str:
    """The prompt and ``tokens`` characters sampled from the language model at ``path``."""
    check_options(tokens, temperature, top_k)
    model, vocab = load_language_model(path, device)
    ids = check_prompt(prompt, vocab)
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    out = sample(model, ids, tokens, temperature=temperature, top_k=top_k, generator=gen)
    return "".join(vocab[i] for i in out.tolist())


def run_generate(args: argparse.Namespace) -> int:
    """``deqkit generate``: print the prompt and its continuation."""
    print(generate(args.checkpoint, args.prompt, args.tokens, temperature=args.temperature,
                   top_k=args.top_k, seed=args.seed, device=args.device))
    return 0
