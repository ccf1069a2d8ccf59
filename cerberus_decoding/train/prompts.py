"""Training prompts: the project's own generator, and readers for user prompt files.

The generator crosses topics with task templates across the categories the heads will meet
(writing, roleplay, reasoning, math, coding, extraction, STEM, humanities, translation,
summarisation, question answering, retrieval-style context + question). It is written for this
project and shares nothing with MT-Bench or Spec-Bench: evaluation data stays out of training.
"""

from __future__ import annotations

import json
import random
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


def read_prompts(path: str | Path) -> list[str]:
    """First-turn prompts from ShareGPT JSON, Alpaca JSON or Spec-Bench/MT-Bench question.jsonl."""
    path = Path(path)
    if not path.is_file():
        raise CerberusError(f"Prompt file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CerberusError(f"Prompt file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8.") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise CerberusError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}).") from e
        return [_prompt_from_record(r, path, f"record {i + 1}") for i, r in enumerate(records)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CerberusError(f"{path}: line {lineno}: not a JSON object ({e.msg}).") from e
        out.append(_prompt_from_record(record, path, f"line {lineno}"))
    if not out:
        raise CerberusError(f"{path} holds no prompts.")
    return out


def _prompt_from_record(r, path: Path, where: str) -> str:
    if isinstance(r, dict):
        if isinstance(r.get("conversations"), list):  # ShareGPT
            for turn in r["conversations"]:
                is_user = isinstance(turn, dict) and turn.get("from") in ("human", "user")
                if is_user and isinstance(turn.get("value"), str):
                    return turn["value"]
        elif isinstance(r.get("instruction"), str):  # Alpaca
            extra = r.get("input") or ""
            return r["instruction"] + (f"\n\n{extra}" if extra else "")
        elif isinstance(r.get("turns"), list) and r["turns"] and isinstance(r["turns"][0], str):  # Spec-Bench
            return r["turns"][0]
    raise CerberusError(
        f'{path}: {where}: unrecognised prompt record. Expected ShareGPT ({{"conversations": [{{"from": '
        '"human", "value": ...}]}), Alpaca ({"instruction": ..., "input": ...}) or Spec-Bench '
        '({"turns": [...]}).'
    )
