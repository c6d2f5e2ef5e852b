"""`lecture3 generate`: continue prompts with a trained or a Hugging Face model, using the KV cache.

    lecture3 generate --workdir runs/tiny --prompt "Once upon a time" --max-new-tokens 64
    lecture3 generate --hf path/to/llama --prompt "The capital of France is" --temperature 0.7 --top-p 0.9
    lecture3 generate --hf path/to/model-without-tokenizer --tokens 1,2,3 --tokens 4,5
    lecture3 generate --hf path/to/llama --prompt "Hello" --stop-token 2 --logprobs   # EOS 2; scores

--hf reads a directory that `lecture3.hf.load_pretrained` reads; its tokenizer is the directory's
tokenizer.json (encoded as transformers would, special tokens such as BOS included). Without one, give
prompts as token ids with --tokens. --prompt and --tokens may be repeated: one batch, one row each.
A prompt plus --max-new-tokens past the model's max_seq_len is an error before anything runs (--allow-long
lets a RoPE / ALiBi / relative model extrapolate on purpose); more than a few hundred new tokens show a
progress bar on stderr. --stop-token ID (repeatable) ends a row when it emits that token: the row is
printed up to and including it. --logprobs prints, after each row, the log-probability of each new token
under the model (before temperature / top-k / top-p) and their sum. Sampling (--temperature above 0) draws a
fresh seed each run and prints it on stderr; --seed N repeats that run.
"""

from __future__ import annotations

import argparse
import pathlib
import secrets
import sys
import time


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `lecture3 generate`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training run's directory: generate from its latest checkpoint")
    source.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint directory (config.json, "
                        "model.safetensors, optionally tokenizer.json)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="text to continue (needs a tokenizer); repeat for a batch")
    parser.add_argument("--tokens", action="append", default=[], metavar="IDS",
                        help="a prompt as comma-separated token ids, e.g. 1,2,3; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", default=64,
                        help="tokens to generate per prompt (default: 64)")
    parser.add_argument("--temperature", type=float, metavar="T", default=0.0,
                        help="0 = greedy; else sample (default: 0, greedy)")
    parser.add_argument("--top-k", type=int, metavar="K", default=None,
                        help="sample from the k most likely tokens (default: none, every token)")
    parser.add_argument("--top-p", type=float, metavar="P", default=None,
                        help="nucleus sampling: smallest set of mass p (default: none, the whole distribution)")
    parser.add_argument("--seed", type=int, metavar="N", default=None,
                        help="random seed of the sampling (default: a fresh one each run, printed on stderr so "
                        "that --seed N repeats the run)")
    parser.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID",
                        help="a token id that ends a row when generated (e.g. the EOS id); repeat for several")
    parser.add_argument("--logprobs", action="store_true",
                        help="after each row, print the log-probability of each new token and their sum")
    parser.add_argument("--allow-long", action="store_true",
                        help="let prompt + new tokens go past the model's max_seq_len: extrapolation the model "
                        "was not trained for (rope, alibi, relative, none; never learned or sinusoidal tables)")


class _FileTokenizer:
    """A tokenizer.json through `tokenizers`, encoding as transformers' tokenizer(text) does."""

    def __init__(self, path: pathlib.Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _load(args: argparse.Namespace):
    """(cfg, params, tokenizer or None) from --hf or --workdir."""
    from lecture3.flags import UsageError

    if args.hf is not None:
        from lecture3 import hf

        path = pathlib.Path(args.hf)
        if not (path / "config.json").is_file():
            raise UsageError(f"--hf {path}: no config.json there; point it at a save_pretrained directory")
        cfg, params = hf.load_pretrained(path)
        tokenizer = _FileTokenizer(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
        return cfg, params, tokenizer
    path = pathlib.Path(args.workdir)
    if not path.is_dir():
        raise UsageError(f"--workdir {path}: no such directory")
    from lecture3.checkpoint import load_for_inference

    return load_for_inference(path)


def _prompts(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    from lecture3.flags import UsageError

    prompts = []
    for text in args.tokens:
        try:
            prompts.append([int(t) for t in text.replace(" ", "").split(",") if t])
        except ValueError:
            raise UsageError(f"--tokens {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if args.prompt and tokenizer is None:
        raise UsageError(f"{args.hf} has no tokenizer.json: give the prompt as token ids with --tokens 1,2,3")
    prompts += [tokenizer.encode(text) for text in args.prompt]
    if not prompts:
        raise UsageError("nothing to continue: give --prompt TEXT or --tokens IDS")
    return prompts


def sampling_seed(seed: int | None) -> int:
    """`seed`, or a fresh one (a run without --seed samples anew, not the training run's sample again)."""
    return secrets.randbelow(2**31) if seed is None else seed


def run_generate(args: argparse.Namespace) -> int:
    """Load the model, generate, print each row (text when there is a tokenizer, else ids); 0 if done."""
    import jax

    from lecture3.decoding import generate

    cfg, params, tokenizer = _load(args)  # bad input raises a Lecture3Error: `lecture3` prints one line
    prompts = _prompts(args, tokenizer)
    seed = sampling_seed(args.seed)
    start = time.perf_counter()
    res = generate(cfg, params, prompts, args.max_new_tokens, rng=jax.random.key(seed),
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   stop_tokens=tuple(args.stop_token), return_logprobs=True,
                   allow_past_max_seq_len=args.allow_long, progress=True)
    if args.temperature > 0:  # after generate's checks: a bad flag stays a one-line error
        print(f"[seed {seed}: --seed {seed} repeats this sample]", file=sys.stderr)
    seconds = time.perf_counter() - start
    generated = res.generated.tolist()
    for row, prompt in enumerate(prompts):
        ids = res.tokens[row, : len(prompt) + generated[row]].tolist()
        if tokenizer is None:
            print(" ".join(map(str, ids)))
        else:
            print(tokenizer.decode(ids))
        if args.logprobs:
            lp = res.logprobs[row, : generated[row]].tolist()
            print(f"logprobs (sum {sum(lp):.4f}): " + " ".join(f"{x:.4f}" for x in lp))
    n = sum(generated)
    print(f"[{n} tokens in {seconds:.2f} s, compilation included]", file=sys.stderr)
    return 0


def command():
    return ("continue prompts with a trained or Hugging Face model, using the KV cache", add_generate_args,
            run_generate)
