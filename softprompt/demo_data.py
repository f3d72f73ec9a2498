"""A small bilingual (English / Chinese) instruction dataset for the prompt-tuning demo.

Every answer is a few tokens and checkable by exact match. The tasks are ones a 135M model half-knows
but, asked zero-shot, answers in the wrong shape ("The answer is: Paris." instead of "Paris"); a soft
prompt learns the shape in a few minutes on a CPU. Eval items (a country, a word, a sum) never occur
in training in either language, so the eval measures the learned format on unseen facts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon",
    "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest",
    "Thailand": "Bangkok", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "Iran": "Tehran",
    "Iraq": "Baghdad", "England": "London", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "South Korea": "Seoul", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Turkey": "Ankara",
    "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra", "Chile": "Santiago",
    "Colombia": "Bogota", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Ukraine": "Kyiv",
}

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "open": "closed", "happy": "sad",
    "old": "new", "light": "dark", "long": "short", "rich": "poor", "early": "late", "wet": "dry",
    "hard": "soft", "strong": "weak", "high": "low", "full": "empty", "good": "bad", "true": "false",
    "in": "out", "left": "right", "day": "night", "win": "lose", "push": "pull", "buy": "sell",
    "love": "hate", "thick": "thin", "clean": "dirty", "heavy": "light", "loud": "quiet",
    "safe": "dangerous", "young": "old", "easy": "difficult", "first": "last", "north": "south",
    "east": "west", "alive": "dead", "inside": "outside", "before": "after", "black": "white",
    "start": "end",
}

WORDS = [
    "apple", "house", "river", "green", "music", "table", "water", "bread", "chair", "light",
    "happy", "stone", "cloud", "plant", "smile", "train", "horse", "paper", "dream", "night",
    "sugar", "beach", "glass", "money", "heart", "tiger", "lemon", "piano", "radio", "snake",
    "cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "road", "door", "milk",
]

_ZH_DIGITS = "零一二三四五六七八九"


def chinese_numeral(n: int) -> str:
    """1..99 in Chinese numerals: 7 -> 七, 17 -> 十七, 70 -> 七十, 77 -> 七十七."""
    if not 1 <= n <= 99:
        raise ValueError(f"n={n} is not valid; chinese_numeral takes 1..99")
    tens, ones = divmod(n, 10)
    head = "" if tens == 0 else ("十" if tens == 1 else _ZH_DIGITS[tens] + "十")
    return head + (_ZH_DIGITS[ones] if ones else "")


# Each task: item keys, and per language a function item -> (instruction, input, output).
Row = tuple[str, str, str]


def _capital(lang: str, country: str) -> Row:
    if lang == "en":
        return "Capital city of this country?", country, CAPITALS[country]
    return "这个国家的首都？", country, CAPITALS[country]


def _antonym(lang: str, word: str) -> Row:
    if lang == "en":
        return "Opposite of this word?", word, ANTONYMS[word]
    return "写出反义词。", word, ANTONYMS[word]


def _upper(lang: str, word: str) -> Row:
    if lang == "en":
        return "Write in capital letters.", word, word.upper()
    return "改成大写字母。", word, word.upper()


def _add(lang: str, pair: tuple[int, int]) -> Row:
    a, b = pair
    if lang == "en":
        return f"What is {a} + {b}?", "", str(a + b)
    return f"{a} 加 {b} 等于几？", "", str(a + b)


def _zh_to_digits(lang: str, n: int) -> Row:
    if lang == "en":
        return "Write this Chinese number in digits.", chinese_numeral(n), str(n)
    return "写成阿拉伯数字。", chinese_numeral(n), str(n)


def _digits_to_zh(lang: str, n: int) -> Row:
    if lang == "en":
        return "Write this number in Chinese.", str(n), chinese_numeral(n)
    return "写成中文数字。", str(n), chinese_numeral(n)


TASKS: dict[str, tuple[list, Callable[[str, object], Row]]] = {
    "capital": (sorted(CAPITALS), _capital),
    "antonym": (sorted(ANTONYMS), _antonym),
    "upper": (WORDS, _upper),
    "add": ([(a, b) for a in range(1, 21) for b in range(1, 21)], _add),
    "zh_to_digits": (list(range(1, 100)), _zh_to_digits),
    "digits_to_zh": (list(range(1, 100)), _digits_to_zh),
}
LANGS = ("en", "zh")


def make_demo_dataset(
    n_train: int, n_eval: int, seed: int = 0, tasks: list[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """Alpaca rows ({"instruction", "input", "output"}) for training and for eval.

    Tasks take turns, so every task is present in both splits. Eval rows depend only on
    (n_eval, seed, tasks); no eval item appears in training, in any language.
    """
    names = list(TASKS) if tasks is None else tasks
    for name in names:
        if name not in TASKS:
            raise ValueError(f"tasks contains {name!r}; known tasks: {', '.join(TASKS)}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train={n_train}, n_eval={n_eval}: both must be >= 0")
    rng = random.Random(seed)
    eval_pools, train_pools = [], []
    for t, name in enumerate(names):
        items, render = TASKS[name]
        items = list(items)
        rng.shuffle(items)
        n_eval_items = len(range(t, n_eval, len(names)))  # this task's share of the round robin
        if n_eval_items >= len(items):
            raise ValueError(f"n_eval={n_eval} leaves no training items for task {name!r}; lower n_eval")
        # One language per eval item: eval never shows the same fact twice.
        eval_pools.append([render(rng.choice(LANGS), it) for it in items[:n_eval_items]])
        rows = [render(lang, it) for it in items[n_eval_items:] for lang in LANGS]
        rng.shuffle(rows)
        train_pools.append(rows)
    available = sum(len(p) for p in train_pools)
    if n_train > available:
        raise ValueError(f"n_train={n_train} is more than the {available} distinct training rows; lower it")
    return _round_robin(train_pools, n_train), _round_robin(eval_pools, n_eval)


def _round_robin(pools: list[list[Row]], n: int) -> list[dict]:
    rows, depth = [], 0
    while len(rows) < n:
        for pool in pools:
            if depth < len(pool) and len(rows) < n:
                instruction, input_, output = pool[depth]
                rows.append({"instruction": instruction, "input": input_, "output": output})
        depth += 1
    return rows


def write_demo_dataset(folder: str | Path, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.jsonl` and `eval.jsonl` into `folder`; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "eval"), make_demo_dataset(n_train, n_eval, seed)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]
