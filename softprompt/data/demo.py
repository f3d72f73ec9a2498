"""A small bilingual (English / Chinese) instruction dataset for the prompt-tuning demo.

Every answer is one short word or number, checked by exact match. The base model (SmolLM2-135M) can
do each task but, asked zero-shot, answers in the wrong shape ("The opposite of "win" is "lose"."
instead of "lose", or "4 + 5 = 9" and rambling on); a soft prompt learns the shape, and to stop, in a
few minutes on a CPU. Each question is asked in English or in Chinese; the word lists are English or
Chinese. Eval items (a word, a sum, a list) never occur in training in either language.

Rows are Alpaca {"instruction", "input", "output"}; the demo formats them as
"Human: {instruction}\\n{input}".strip() + "\\n\\nAssistant: " followed by the output and eos.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path

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

PLURALS = {
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "house": "houses", "bird": "birds",
    "car": "cars", "apple": "apples", "river": "rivers", "chair": "chairs", "table": "tables",
    "flower": "flowers", "girl": "girls", "boy": "boys", "hand": "hands", "door": "doors", "bus": "buses",
    "box": "boxes", "glass": "glasses", "dish": "dishes", "watch": "watches", "baby": "babies",
    "city": "cities", "story": "stories", "lady": "ladies", "leaf": "leaves", "wolf": "wolves",
    "knife": "knives", "child": "children", "man": "men", "woman": "women", "foot": "feet",
    "tooth": "teeth", "mouse": "mice", "goose": "geese", "person": "people", "sheep": "sheep",
    "fish": "fish", "potato": "potatoes", "hero": "heroes",
}

WORDS = [
    "apple", "house", "river", "green", "music", "table", "water", "bread", "chair", "light",
    "happy", "stone", "cloud", "plant", "smile", "train", "horse", "paper", "dream", "night",
    "sugar", "beach", "glass", "money", "heart", "tiger", "lemon", "piano", "radio", "snake",
    "cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "road", "door", "milk",
]

LIST_WORDS = {
    "en": ["apple", "river", "garden", "window", "tiger", "pencil", "orange", "candle", "rabbit", "summer",
           "guitar", "island"],
    "zh": ["苹果", "河流", "花园", "窗户", "老虎", "铅笔", "橙子", "蜡烛", "兔子", "夏天", "吉他", "岛屿"],
}

# A task renders one of its items as (instruction, input, output) in a language. Questions are
# phrased the way the model met them in pretraining; only the answer's shape has to be learned.
Row = tuple[str, str, str]


def _antonym(lang: str, word: str) -> Row:
    q = f'What is the opposite of "{word}"?' if lang == "en" else f"“{word}”的反义词是？"
    return q, "", ANTONYMS[word]


def _plural(lang: str, word: str) -> Row:
    q = f'What is the plural of "{word}"?' if lang == "en" else f"“{word}”的复数是？"
    return q, "", PLURALS[word]


def _upper(lang: str, word: str) -> Row:
    q = f'Write "{word}" in capital letters.' if lang == "en" else f"把“{word}”改成大写。"
    return q, "", word.upper()


def _add(lang: str, pair: tuple[int, int]) -> Row:
    a, b = pair
    return ("Add the two numbers." if lang == "en" else "计算加法。"), f"{a} + {b}", str(a + b)


def _subtract(lang: str, pair: tuple[int, int]) -> Row:
    a, b = pair
    q = "Subtract the second number from the first." if lang == "en" else "计算减法。"
    return q, f"{a} - {b}", str(a - b)


def _last_word(lang: str, words: tuple[str, ...]) -> Row:
    q = "What is the last word in this list?" if lang == "en" else "列表的最后一个词是？"
    return q, ", ".join(words), words[-1]


TASKS: dict[str, tuple[list, Callable[[str, object], Row]]] = {
    "antonym": (sorted(ANTONYMS), _antonym),
    "plural": (sorted(PLURALS), _plural),
    "upper": (WORDS, _upper),
    "add": ([(a, b) for a in range(1, 10) for b in range(1, 10)], _add),
    "subtract": ([(a, b) for a in range(2, 19) for b in range(1, 10) if b < a], _subtract),
    "last_word": ([t for words in LIST_WORDS.values() for t in itertools.permutations(words, 3)], _last_word),
}
LANGS = ("en", "zh")


def make_demo_dataset(
    n_train: int, n_eval: int, seed: int = 0, tasks: list[str] | None = None, langs: tuple[str, ...] = LANGS
) -> tuple[list[dict], list[dict]]:
    """Alpaca rows ({"instruction", "input", "output"}) for training and for eval, asked in `langs`.

    Tasks take turns, so every task is in both splits. Eval rows depend only on (n_eval, seed, tasks, langs);
    no eval item is in training, in any language, and no eval item is asked twice.
    """
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"tasks={tasks!r} is not valid; known tasks: {', '.join(TASKS)}")
    langs = tuple(langs)
    if not langs or any(lang not in LANGS for lang in langs):
        raise ValueError(f"langs={langs!r} is not valid; give some of {', '.join(LANGS)}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train={n_train}, n_eval={n_eval}: both must be >= 0")
    rng = random.Random(seed)
    eval_pools, train_pools = [], []
    for t, name in enumerate(names):
        items, render = TASKS[name]
        items = list(items)
        rng.shuffle(items)
        n_eval_items = len(range(t, n_eval, len(names)))  # this task's turns in the round robin
        if n_eval_items >= len(items):
            raise ValueError(f"n_eval={n_eval} leaves no training items for task {name!r}; lower n_eval")
        eval_pools.append([render(rng.choice(langs), it) for it in items[:n_eval_items]])
        rows = [render(lang, it) for it in items[n_eval_items:] for lang in langs]
        rng.shuffle(rows)
        train_pools.append(rows)
    available = sum(len(p) for p in train_pools)
    if n_train > available:
        raise ValueError(f"n_train={n_train} is more than the {available} distinct training rows; lower it")
    return _round_robin(train_pools, n_train), _round_robin(eval_pools, n_eval)


def _round_robin(pools: list[list[Row]], n: int) -> list[dict]:
    """n rows taken from the pools in turn; the caller has checked that they hold n."""
    order = (p[d] for d in range(max(map(len, pools))) for p in pools if d < len(p))
    return [{"instruction": i, "input": x, "output": o} for i, x, o in itertools.islice(order, n)]


def write_demo_dataset(folder: str | Path, n_train: int, n_eval: int, seed: int = 0,
                       langs: tuple[str, ...] = LANGS) -> tuple[Path, Path]:
    """Write `train.jsonl` and `eval.jsonl` (UTF-8, Chinese unescaped) into `folder`; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "eval"), make_demo_dataset(n_train, n_eval, seed, langs=langs)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]
