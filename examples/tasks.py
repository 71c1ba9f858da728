"""A small instruction task set whose answers can be checked exactly, made offline from a seed.

Usage: python examples/tasks.py OUT_DIR [--train N] [--held-out M] [--seed S]

Writes ``OUT_DIR/train.jsonl`` and ``OUT_DIR/held_out.jsonl``: chat records, each a user prompt and
the assistant's one correct answer (``{"messages": [...], "kind": ...}``), which ``logitcache build
--format chat``, ``logitcache generate`` and ``logitcache evaluate`` read. The kinds (:data:`TASKS`),
taken in turn:

- ``add``: the sum of two numbers below 1000;
- ``reverse``: a list of words in reverse order;
- ``sort``: numbers in ascending order;
- ``upper``: words copied in capital letters;
- ``count``: how many times a letter occurs in a string of letters.

No held-out prompt occurs among the training prompts. The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS = (
    "apple river stone cloud green tiger lemon paper window garden silver orange planet bridge candle "
    "forest marble rocket violin yellow castle dragon pepper summer winter spring autumn meadow harbor "
    "island jungle ladder mirror needle pillow rabbit saddle tunnel valley wizard"
).split()


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(1000), rng.randrange(1000)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randrange(100) for _ in range(rng.randint(3, 7))]
    return f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Copy these words in capital letters: {' '.join(words)}", " ".join(words).upper()


def _count(rng: random.Random) -> tuple[str, str]:
    letters = "".join(rng.choice("abcdef") for _ in range(rng.randint(6, 12)))
    letter = rng.choice("abcdefg")  # g: a letter the string lacks, answer 0
    return f"How many times does the letter {letter} occur in {letters}? Answer with the number only.", str(letters.count(letter))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "reverse": _reverse, "sort": _sort, "upper": _upper, "count": _count,
}


def task_record(kind: str, prompt: str, answer: str) -> dict:
    """A chat record: the prompt as the user's turn, the answer as the assistant's."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "kind": kind}


def make_tasks(seed: int, train: int, held_out: int) -> tuple[list[dict], list[dict]]:
    """``train`` and ``held_out`` chat records, the kinds in turn; no held-out prompt is a training prompt.

    Raises ValueError when the kinds cannot give that many distinct prompts (far beyond a few thousand).
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    kinds = list(TASKS)

    def distinct(count: int) -> list[dict]:
        records, attempts = [], 0
        while len(records) < count:
            attempts += 1
            if attempts > 100 * (count + 10):
                raise ValueError(f"cannot make {count} distinct prompts of kinds {', '.join(kinds)}")
            kind = kinds[len(records) % len(kinds)]
            prompt, answer = TASKS[kind](rng)
            if prompt not in seen:
                seen.add(prompt)
                records.append(task_record(kind, prompt, answer))
        return records

    held = distinct(held_out)  # first, so that the held-out set does not depend on the size of the training set
    return distinct(train), held


def write_records(path: Path, records: list[dict]) -> None:
    """Write ``records`` as JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for train.jsonl and held_out.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="training prompts (default 2000)")
    parser.add_argument("--held-out", type=int, default=200, help="held-out prompts (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task set (default 0)")
    args = parser.parse_args()
    train, held_out = make_tasks(args.seed, args.train, args.held_out)
    write_records(args.out / "train.jsonl", train)
    write_records(args.out / "held_out.jsonl", held_out)
    print(f"{len(train)} training and {len(held_out)} held-out prompts in {args.out}")


if __name__ == "__main__":
    main()
