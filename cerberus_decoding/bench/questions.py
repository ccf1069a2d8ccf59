"""Benchmark questions: Spec-Bench / MT-Bench ``question.jsonl`` files and the builtin set.

One JSON object per line with ``question_id``, ``category`` and ``turns`` (a list of user messages;
a second turn is asked after the model's own answer to the first). Other keys are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..models import CerberusError

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).resolve().parent.parent / "data" / "builtin_questions.jsonl"
# the builtin set covers these; the first eight are two-turn conversations
BUILTIN_CATEGORIES = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
    "translation",
    "summarization",
    "qa",
    "math_reasoning",
    "rag",
)


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


def parse_questions(path: str | Path) -> list[Question]:
    """Read a question.jsonl; any bad line raises CerberusError naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise CerberusError(f"Questions file {path} does not exist; pass a question.jsonl or 'builtin'.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CerberusError(f"{path}: not UTF-8 text ({e}).") from e
    questions, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        q = _parse_line(line, f"{path}, line {number}")
        if q.question_id in seen:
            raise CerberusError(f"{path}, line {number}: duplicate question_id {q.question_id!r}.")
        seen.add(q.question_id)
        questions.append(q)
    if not questions:
        raise CerberusError(f"{path} holds no questions.")
    return questions


def _parse_line(line: str, where: str) -> Question:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CerberusError(f"{where}: not valid JSON ({e.msg}).") from e
    if not isinstance(obj, dict):
        raise CerberusError(f"{where}: expected a JSON object with question_id, category and turns.")
    missing = [k for k in ("question_id", "category", "turns") if k not in obj]
    if missing:
        raise CerberusError(f"{where}: missing {', '.join(missing)}.")
    qid, category, turns = obj["question_id"], obj["category"], obj["turns"]
    # bool is an int subclass; a true/false id is certainly a mistake
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise CerberusError(f"{where}: question_id must be an integer or a string.")
    if not isinstance(category, str) or not category.strip():
        raise CerberusError(f"{where}: category must be a non-empty string.")
    if not isinstance(turns, list) or not turns:
        raise CerberusError(f"{where}: turns must be a non-empty list of strings.")
    if not all(isinstance(t, str) and t.strip() for t in turns):
        raise CerberusError(f"{where}: every turn must be a non-empty string.")
    return Question(qid, category.strip(), tuple(turns))


def load_questions(source: str | Path) -> list[Question]:
    """``builtin`` or a path to a question.jsonl."""
    return parse_questions(BUILTIN_PATH if str(source) == BUILTIN else source)


def select_questions(
    questions: list[Question], categories: list[str] | None = None, limit: int | None = None
) -> list[Question]:
    """Keep the given categories (all when None) and the first ``limit`` questions of each, in file order."""
    present = list(dict.fromkeys(q.category for q in questions))
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise CerberusError(f"No questions in categories {', '.join(unknown)}; the file has: {', '.join(present)}.")
    wanted = set(categories or present)
    counts: dict[str, int] = {}
    chosen = []
    for q in questions:
        if q.category not in wanted or (limit is not None and counts.get(q.category, 0) >= limit):
            continue
        counts[q.category] = counts.get(q.category, 0) + 1
        chosen.append(q)
    return chosen
