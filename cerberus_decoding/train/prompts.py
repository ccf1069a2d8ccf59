"""Training prompts: the project's own generator, and readers for user prompt files.

The generator crosses topics with task templates across the categories the heads will meet
(writing, roleplay, reasoning, math, coding, extraction, STEM, humanities, translation,
summarisation, question answering, retrieval-style context + question). It is written for this
project and shares nothing with MT-Bench or Spec-Bench: evaluation data stays out of training.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import random
from dataclasses import dataclass
from pathlib import Path

from ..models import CerberusError

TOPICS = [
    "beekeeping",
    "volcanoes",
    "the printing press",
    "coral reefs",
    "electric bicycles",
    "sourdough bread",
    "the Roman aqueducts",
    "black holes",
    "urban gardening",
    "chess openings",
    "the water cycle",
    "solar panels",
    "jazz improvisation",
    "the Silk Road",
    "penguins",
    "public libraries",
    "3D printing",
    "the immune system",
    "medieval castles",
    "recycling plastics",
    "marathon training",
    "origami",
    "the stock market",
    "rainforests",
    "lighthouses",
    "vaccines",
    "the French Revolution",
    "glaciers",
    "honeybees and pollination",
    "remote work",
    "video game design",
    "the human heart",
    "tea ceremonies",
    "wind turbines",
    "ancient Egypt",
    "photosynthesis",
    "smartphones",
    "bird migration",
    "cryptography",
    "the Moon landing",
    "coffee farming",
    "earthquakes",
    "minimalism",
    "the Olympic Games",
    "dinosaurs",
    "machine learning",
    "sleep",
    "the Great Barrier Reef",
    "bridges",
    "climate change",
    "pottery",
    "the periodic table",
    "submarines",
    "folk music",
    "time management",
    "mushrooms",
    "railways",
    "the Renaissance",
    "desert ecosystems",
    "electric cars",
    "volunteering",
    "the internet",
    "ocean tides",
    "knitting",
    "antibiotics",
    "the Amazon river",
    "space telescopes",
    "board games",
    "nutrition",
    "city planning",
    "the Industrial Revolution",
    "octopuses",
    "hiking safety",
    "banking",
    "poetry",
    "the solar system",
    "robots",
    "composting",
    "the Great Wall of China",
    "cheese making",
]

NAMES = ["Maya", "Tomas", "Aisha", "Liam", "Chen", "Sofia", "Kwame", "Elena", "Ravi", "Noor", "Hugo", "Yuki"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
ROLES = [
    "a ship captain",
    "a museum guide",
    "a medieval blacksmith",
    "a friendly robot",
    "a park ranger",
    "a detective",
    "a chef",
    "a time traveller",
    "a lighthouse keeper",
    "a travel agent",
]

TEMPLATES = {
    "writing": [
        "Write a short blog post about {topic}.",
        "Write a four-line poem about {topic}.",
        "Write a persuasive paragraph encouraging people to learn about {topic}.",
        "Draft a friendly email to {name} inviting them to a talk on {topic}.",
        "Write a short story in which {name} discovers something surprising about {topic}.",
        "Give me five catchy titles for an article about {topic}.",
        "Write a product description for a gadget related to {topic}.",
    ],
    "roleplay": [
        "Pretend you are {role}. Describe your day and mention {topic}.",
        "You are {role}. A visitor asks you about {topic}. How do you answer?",
        "Act as {role} and give advice to a beginner interested in {topic}.",
    ],
    "reasoning": [
        "What are the pros and cons of {topic}? Reason step by step.",
        "If {topic} disappeared tomorrow, what would change? Think it through.",
        "{name} says {topic} is overrated. Give arguments for and against that view.",
        "Explain the cause and effect relationships involved in {topic}.",
    ],
    "math": [
        "{name} has {a} apples and buys {b} more, then gives away {c}. How many are left? Show your work.",
        "A train travels {a} km in {b} hours. What is its average speed? Explain.",
        "What is {a} multiplied by {b}, plus {c}? Show the steps.",
        "A rectangle is {a} cm long and {b} cm wide. Find its area and perimeter.",
        "Solve for x: {a}x + {b} = {c}. Explain each step.",
        "If a shirt costs ${a} and is discounted by {p} percent, what is the new price?",
    ],
    "coding": [
        "Write a Python function that {task}.",
        "Explain what this Python code does:\n\n```python\n{code}\n```",
        "Write a JavaScript function that {task}.",
        "How would you test a function that {task}? Give example test cases.",
        "Find and fix the bug in this code:\n\n```python\n{buggy}\n```",
    ],
    "extraction": [
        'Extract the names and numbers from this text: "{name} bought {a} tickets for the {topic} exhibition '
        'on day {b} and paid {c} dollars."',
        'List the key facts in this sentence as bullet points: "{topic} has been studied by {name} for {a} '
        'years, with {b} publications and {c} students."',
        'Return a JSON object with the fields name, count and subject from: "{name} wrote {a} essays about {topic}."',
    ],
    "stem": [
        "Explain the science behind {topic} in simple terms.",
        "What are the main engineering challenges related to {topic}?",
        "Describe how {topic} works to a high-school student.",
        "What recent scientific discoveries relate to {topic}?",
    ],
    "humanities": [
        "Discuss the cultural significance of {topic}.",
        "How has {topic} influenced history and society?",
        "What ethical questions does {topic} raise?",
        "Compare how two different cultures view {topic}.",
    ],
    "translation": [
        'Translate into {language}: "{sentence}"',
        'Translate this sentence to {language} and explain any tricky words: "{sentence}"',
        'How would you say "{sentence}" in {language}? Give a formal and an informal version.',
    ],
    "summarization": [
        "Summarize the following text in two sentences:\n\n{passage}",
        "Give a one-line summary of this paragraph:\n\n{passage}",
        "Summarize the main points of this passage as a bulleted list:\n\n{passage}",
    ],
    "qa": [
        "What is {topic}?",
        "Why is {topic} important?",
        "How did {topic} begin?",
        "What are three interesting facts about {topic}?",
        "Who would benefit from learning about {topic}, and why?",
    ],
    "rag": [
        "Use the context to answer the question.\n\nContext: {passage}\n\nQuestion: What is the main subject of "
        "the context, and what does it say about it?",
        "Read the document and answer.\n\nDocument: {passage}\n\nQuestion: Which details in the document "
        "concern {name}?",
    ],
}

TASKS = [
    "reverses a string",
    "checks whether a number is prime",
    "counts the vowels in a sentence",
    "returns the largest element of a list",
    "merges two sorted lists",
    "computes the factorial of n",
    "removes duplicates from a list while keeping order",
    "converts Celsius to Fahrenheit",
    "checks whether a word is a palindrome",
    "returns the n-th Fibonacci number",
    "sums the digits of an integer",
    "finds the most common word in a text",
]

CODES = [
    "def f(xs):\n    return [x * x for x in xs if x % 2 == 0]",
    "def g(s):\n    return ''.join(reversed(s.split()))",
    "total = 0\nfor i in range(10):\n    total += i\nprint(total)",
    "def h(d):\n    return sorted(d, key=d.get, reverse=True)[:3]",
]

BUGGY = [
    "def average(xs):\n    return sum(xs) / len(xs) + 1",
    "def is_even(n):\n    return n % 2 == 1",
    "def last(xs):\n    return xs[len(xs)]",
    "def count(s, c):\n    n = 0\n    for ch in s:\n        if ch == c:\n            n =+ 1\n    return n",
]

SENTENCES = [
    "The library opens at nine in the morning.",
    "I would like a cup of tea, please.",
    "The weather is beautiful today.",
    "Where is the nearest train station?",
    "My brother is learning to play the guitar.",
    "We are going to the mountains next week.",
    "The museum is closed on Mondays.",
    "Could you recommend a good restaurant nearby?",
    "She has been reading the same book for a month.",
    "The children played in the garden until dark.",
    "Please send me the report before Friday.",
    "Our flight was delayed by two hours.",
    "He forgot his umbrella at the office.",
    "The concert starts at eight o'clock tonight.",
    "I need to buy bread, milk and eggs.",
    "They painted the kitchen a bright yellow.",
    "The river flooded the village last spring.",
    "This recipe needs fresh basil and garlic.",
]


def _passage(rng: random.Random, topic: str, name: str) -> str:
    facts = [
        f"{topic.capitalize()} has fascinated people for generations.",
        f"Researchers such as {name} have spent years studying {topic}.",
        f"Many schools now include {topic} in their lessons.",
        f"Critics argue that the importance of {topic} is often exaggerated.",
        f"A recent survey found that {rng.randint(20, 90)} percent of people had heard of {topic}.",
        f"Local groups organise events about {topic} every {rng.choice(['month', 'spring', 'weekend'])}.",
        f"The history of {topic} includes both successes and failures.",
    ]
    rng.shuffle(facts)
    return " ".join(facts[: rng.randint(3, 6)])


def builtin_prompts(n: int = 4000, seed: int = 0) -> list[str]:
    """``n`` distinct prompts, cycling through categories so any prefix is balanced."""
    rng = random.Random(seed)
    categories = list(TEMPLATES)
    seen, out = set(), []
    attempts = 0
    while len(out) < n and attempts < n * 20:
        attempts += 1
        category = categories[attempts % len(categories)]  # a category that runs out just stops adding
        topic, name = rng.choice(TOPICS), rng.choice(NAMES)
        a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(1, 90)
        prompt = rng.choice(TEMPLATES[category]).format(
            topic=topic,
            name=name,
            role=rng.choice(ROLES),
            language=rng.choice(LANGUAGES),
            task=rng.choice(TASKS),
            code=rng.choice(CODES),
            buggy=rng.choice(BUGGY),
            sentence=rng.choice(SENTENCES),
            passage=_passage(rng, topic, name),
            a=a,
            b=b,
            c=c,
            p=rng.choice([10, 15, 20, 25, 30, 50]),
        )
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str  # the file it came from (its name without extensions) or "builtin"
    category: str = ""


PROMPT_SUFFIXES = (".jsonl", ".json", ".txt", ".jsonl.xz", ".jsonl.gz", ".txt.xz", ".txt.gz")


def read_prompts(path: str | Path) -> list[str]:
    """First-turn prompt texts of one file (see ``read_prompt_file``)."""
    return [p.text for p in read_prompt_file(path)]


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from one file: JSONL with a ``prompt`` field (``{"id", "source", "category", "prompt"}``),
    ShareGPT JSON, Alpaca JSON, Spec-Bench/MT-Bench question.jsonl, or ``.txt`` with one prompt per
    line; ``.xz`` / ``.gz`` compressed files are read as they are."""
    path = Path(path)
    if not path.is_file():
        raise CerberusError(f"Prompt file {path} does not exist.")
    source = path.name.split(".")[0]
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CerberusError(f"Prompt file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8.") from None
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise CerberusError(f"Cannot read prompt file {path} ({e}); is it corrupt or truncated?") from None
    if path.name.endswith((".txt", ".txt.xz", ".txt.gz")):
        out = [Prompt(line.strip(), source) for line in text.splitlines() if line.strip()]
    elif text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise CerberusError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}).") from e
        out = [_prompt_from_record(r, path, f"record {i + 1}", source) for i, r in enumerate(records)]
    else:
        out = []
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CerberusError(f"{path}: line {lineno}: not a JSON object ({e.msg}).") from e
            out.append(_prompt_from_record(record, path, f"line {lineno}", source))
    if not out:
        raise CerberusError(f"{path} holds no prompts.")
    return out


def parse_mix(spec: str) -> dict[str, float]:
    """``"dolly15k=0.5,math=0.3,builtin=0.2"`` -> {key: share}; the shares must add up to 1."""
    mix = {}
    for part in spec.split(","):
        key, sep, share = part.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not sep or not key.strip() or not 0 < value <= 1:
            raise CerberusError(f"--mix: {part.strip()!r} is not KEY=SHARE with 0 < SHARE <= 1 (e.g. dolly15k=0.4).")
        mix[key.strip()] = value
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise CerberusError(f"--mix: the shares add up to {total:g}, not 1; adjust them.")
    return mix


def load_prompts(spec: str, num_prompts: int, mix: str | None = None, seed: int = 0) -> tuple[list[Prompt], str]:
    """The prompts ``cerberus distill --prompts SPEC`` runs on, in their fixed order, and an identifier
    of that selection (recorded with the answers so a rebuild can check it).

    SPEC is ``builtin``, a prompt file or a directory of them. Without ``mix`` a single file keeps its
    order and several sources are shuffled together (seeded). With ``mix`` (``parse_mix``) each key
    names a source (file name without extensions, or ``builtin``) or a category, and gets
    round(share * num_prompts) prompts drawn at random (seeded); the result is shuffled (seeded)."""
    by_source: dict[str, list[Prompt]] = {}
    if spec != "builtin":
        path = Path(spec)
        if not path.exists():
            raise CerberusError(f"--prompts {spec}: no such file or directory (or use 'builtin').")
        files = [path] if path.is_file() else sorted(f for f in path.glob("*") if f.name.endswith(PROMPT_SUFFIXES))
        if not files:
            kinds = ", ".join(PROMPT_SUFFIXES)
            raise CerberusError(f"--prompts {spec}: the directory holds no prompt files ({kinds}).")
        for f in files:
            by_source.setdefault(f.name.split(".")[0], []).extend(read_prompt_file(f))
    rng = random.Random(seed)
    if mix is None:
        if spec == "builtin":
            chosen = [Prompt(t, "builtin", "") for t in builtin_prompts(num_prompts, seed)]
        else:
            chosen = [p for ps in by_source.values() for p in ps]
            if len(by_source) > 1:
                rng.shuffle(chosen)
            chosen = chosen[:num_prompts]
    else:
        chosen = _mixed(by_source, parse_mix(mix), num_prompts, rng, seed)
    digest = hashlib.sha256("\x00".join(p.text for p in chosen).encode()).hexdigest()[:16]
    if spec == "builtin" and mix is None:  # the identifier the committed builtin answers were made with
        return chosen, f"builtin:{num_prompts}:{seed}"
    return chosen, f"{Path(spec).name}:{num_prompts}:{mix or ''}:{seed}:{digest}"


def _mixed(by_source: dict[str, list[Prompt]], mix: dict[str, float], n: int, rng, seed: int) -> list[Prompt]:
    categories = {p.category for ps in by_source.values() for p in ps if p.category}
    exact = {k: v * n for k, v in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1  # largest remainders: the counts add up to n exactly
    chosen: list[Prompt] = []
    taken: set[str] = set()
    for key, count in counts.items():
        if key == "builtin":
            spare = count + count // 10 + 10  # the generator can fall a few prompts short of n distinct ones
            pool = [Prompt(t, "builtin", "") for t in builtin_prompts(spare, seed)]
        elif key in by_source:
            pool = list(by_source[key])
        elif key in categories:
            pool = [p for ps in by_source.values() for p in ps if p.category == key]
        else:
            known = ", ".join(sorted(by_source) + ["builtin"])
            raise CerberusError(f"--mix: {key!r} is neither a source ({known}) nor a category of these prompts.")
        pool = [p for p in pool if p.text not in taken]  # a key that overlaps an earlier one takes other prompts
        if len(pool) < count:
            raise CerberusError(
                f"--mix asks for {count} prompts from {key!r}, which has only {len(pool)}; "
                "lower its share or --num-prompts."
            )
        picked = rng.sample(pool, count)
        taken.update(p.text for p in picked)
        chosen.extend(picked)
    rng.shuffle(chosen)
    return chosen


def _prompt_from_record(r, path: Path, where: str, source: str) -> Prompt:
    if isinstance(r, dict):
        if isinstance(r.get("prompt"), str) and r["prompt"].strip():  # {id, source, category, prompt}
            return Prompt(r["prompt"], source, str(r.get("category") or ""))
        if isinstance(r.get("conversations"), list):  # ShareGPT
            for turn in r["conversations"]:
                is_user = isinstance(turn, dict) and turn.get("from") in ("human", "user")
                if is_user and isinstance(turn.get("value"), str):
                    return Prompt(turn["value"], source)
        elif isinstance(r.get("instruction"), str):  # Alpaca
            extra = r.get("input") or ""
            return Prompt(r["instruction"] + (f"\n\n{extra}" if extra else ""), source)
        elif isinstance(r.get("turns"), list) and r["turns"] and isinstance(r["turns"][0], str):  # Spec-Bench
            return Prompt(r["turns"][0], source, str(r.get("category") or ""))
    raise CerberusError(
        f'{path}: {where}: unrecognised prompt record. Expected {{"prompt": ...}}, ShareGPT '
        '({"conversations": [{"from": "human", "value": ...}]}), Alpaca ({"instruction": ..., "input": ...}) '
        'or Spec-Bench ({"turns": [...]}).'
    )
