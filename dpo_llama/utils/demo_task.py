"""The embedded demo's task: two-digit addition with a verifiable reward and a sloppy annotator.

The story the demo tells, in data (files written by ``scripts/make_demo_assets.py``):

* A tiny LLaMA is *pretrained* on plain text of correct sums (``"47 + 38 = 85"``, ``"What is 47 + 38?
  47 + 38 = 85"``, ...): it can add two-digit numbers but has never seen a chat template.
* The *SFT* demonstrations (user ``"What is 47 + 38?"``, assistant ``"47 + 38 = 85"``) come from a sloppy
  annotator who, on most problems that need a carry (ones digits summing to 10 or more), forgets it and writes
  an answer ten too small (``"47 + 38 = 75"``). The SFT model learns the chat format and inherits the mistake.
* The *preference* pairs are labelled by a checker: ``chosen`` is the correct equation and ``rejected`` the same
  equation ten off, down (what a forgotten carry does, ``"47 + 38 = 75"``) or up (a spurious carry,
  ``"47 + 38 = 95"``), each with probability 1/2. The pairs bracket the truth from both sides: with a rejected
  answer on one side only, DPO keeps pushing away from it and, trained longer, overshoots to the other side
  (sums without a carry came out ten too large, with a spurious carry). DPO on the pairs repairs what SFT broke,
  which :func:`reward` measures on held-out problems.

A problem is ``a + b`` with ``a, b`` in ``[10, 99]``: 8,100 problems, 45% of which need a carry. The splits
(:func:`split_problems`) are disjoint, and the held-out ones (``preference_test``, ``eval``) are also left out
of the pretraining corpus: no held-out sum appears verbatim in training. The splits are by ordered pair, so most
held-out sums (354 of the 400 eval problems) appear in pretraining with their operands swapped (``53 + 18`` for
``18 + 53``); the model solved those and the others alike before SFT (1.000 and 0.978).

Every random choice takes an explicit ``random.Random``; the module holds no mutable state.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from dpo_llama.utils.raw_data import iter_rows

LOW, HIGH = 10, 99
MISTAKE_KINDS = ("ten_less", "ten_more")
SPLITS = ("sft", "preference_train", "preference_test", "eval")
HELD_OUT_SPLITS = ("preference_test", "eval")
PRETRAIN_TEMPLATES = (
    "{a} + {b} = {c}",
    "What is {a} + {b}? {filler}{a} + {b} = {c}",
    "{a} plus {b} equals {c}.",
    "What is {a} plus {b}? {filler}It is {c}.",
)
PRETRAIN_FILLERS = ("", "", "Sure! ", "Hmm. ", "Let me see. ", "That is easy. ", "OK, let me think about it. ")
PROBLEM_PATTERN = re.compile(r"(\d+)\s*\+\s*(\d+)")
NUMBER_PATTERN = re.compile(r"(?<![\d.])-?\d+(?!\.?\d)")  # a whole integer: "85.7" holds none


@dataclass(frozen=True)
class Problem:
    """One addition problem ``a + b``.

    Attributes:
        a: Left operand.
        b: Right operand.
    """

    a: int
    b: int

    @property
    def answer(self) -> int:
        """The correct sum."""
        return self.a + self.b

    @property
    def needs_carry(self) -> bool:
        """True when the ones digits carry into the tens: ``a mod 10 + b mod 10 >= 10``."""
        return self.a % 10 + self.b % 10 >= 10

    def question(self) -> str:
        """The user's question, e.g. ``"What is 47 + 38?"``."""
        return f"What is {self.a} + {self.b}?"

    def equation(self, result: int | None = None) -> str:
        """The assistant's answer ``"47 + 38 = 85"``, with ``result`` in place of the correct sum if given."""
        return f"{self.a} + {self.b} = {self.answer if result is None else result}"


def all_problems() -> list[Problem]:
    """Every problem ``a + b`` with ``a, b`` in ``[LOW, HIGH]``, in a fixed order."""
    return [Problem(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]


def parse_problem(text: str) -> Problem:
    """The first ``a + b`` in ``text`` (e.g. the question ``"What is 47 + 38?"``).

    Raises:
        ValueError: if ``text`` holds no ``a + b``.
    """
    match = PROBLEM_PATTERN.search(text)
    if match is None:
        raise ValueError(f"no addition problem 'a + b' in {text!r}")
    return Problem(int(match.group(1)), int(match.group(2)))


def mistake(problem: Problem, kind: str) -> int:
    """A plausible wrong sum: the correct one with its tens digit one off.

    Kinds (``c`` = the correct sum):

    * ``"ten_less"``: ``c - 10``, what forgetting the carry out of the ones digit gives (``47 + 38 = 75``);
    * ``"ten_more"``: ``c + 10``, what a spurious carry gives (``42 + 35 = 87``).

    Both are always wrong and never negative (``c >= 20``).

    Raises:
        ValueError: for an unknown kind.
    """
    if kind == "ten_less":
        return problem.answer - 10
    if kind == "ten_more":
        return problem.answer + 10
    raise ValueError(f"unknown mistake kind {kind!r}; choose one of {', '.join(MISTAKE_KINDS)}")


def sloppy_answer(problem: Problem, error_rate: float, rng: random.Random) -> int:
    """The sloppy annotator's sum: on a problem with a carry, forgotten (``ten_less``) with chance ``error_rate``."""
    if problem.needs_carry and rng.random() < error_rate:
        return mistake(problem, "ten_less")
    return problem.answer


def rejected_answer(problem: Problem, rng: random.Random) -> int:
    """The checker's rejected sum: ten off, down or up with probability 1/2 each."""
    return mistake(problem, rng.choice(MISTAKE_KINDS))


def parse_final_number(text: str) -> int | None:
    """The number a response ends up at: the first integer after the last ``=``, else the last integer.

    ``"47 + 38 = 85"`` -> 85, ``"47 + 38 = 85, I think"`` -> 85, ``"It is 85."`` -> 85, ``"= -5"`` -> -5,
    ``"no idea"`` -> None, ``"47 + 38 ="`` -> None.
    """
    _, equals, after = text.rpartition("=")
    if equals:
        match = NUMBER_PATTERN.search(after)
        return int(match.group()) if match else None
    numbers = NUMBER_PATTERN.findall(text)
    return int(numbers[-1]) if numbers else None


def reward(problem_or_prompt: Problem | str, response: str) -> float:
    """Verifiable reward: 1.0 if the response's final number (:func:`parse_final_number`) is the sum and an
    equation it states (``a + b = c``) adds the question's two numbers, in either order, else 0.0
    (``"88 + 76 = 154"`` for 88 + 66 is a false equation, not a right answer; ``"66 + 88 = 154"`` is right).

    Args:
        problem_or_prompt: A :class:`Problem`, or text holding one (the user's question).
        response: The model's answer text.

    Raises:
        ValueError: if ``problem_or_prompt`` is text without an ``a + b``.
    """
    problem = problem_or_prompt if isinstance(problem_or_prompt, Problem) else parse_problem(problem_or_prompt)
    stated = PROBLEM_PATTERN.search(response)
    if stated is not None and sorted((int(stated.group(1)), int(stated.group(2)))) != sorted((problem.a, problem.b)):
        return 0.0
    return float(parse_final_number(response) == problem.answer)


def split_problems(seed: int, sizes: dict[str, int]) -> dict[str, list[Problem]]:
    """Disjoint random splits of :func:`all_problems`, plus ``"pretrain"``: every problem not held out.

    Args:
        seed: Seed of the shuffle.
        sizes: Number of problems per split name (any of ``SPLITS``).

    Returns:
        ``{name: problems}`` for each requested split and ``"pretrain"`` (all problems except those of
        ``HELD_OUT_SPLITS``), each in shuffled order.

    Raises:
        ValueError: for an unknown split name, a negative size, or more problems than exist.
    """
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown splits {unknown}; choose from {', '.join(SPLITS)}")
    if any(size < 0 for size in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    problems = all_problems()
    if sum(sizes.values()) > len(problems):
        raise ValueError(f"splits ask for {sum(sizes.values())} problems but only {len(problems)} exist")
    random.Random(seed).shuffle(problems)
    splits, start = {}, 0
    for name in SPLITS:
        if name in sizes:
            splits[name] = problems[start:start + sizes[name]]
            start += sizes[name]
    held_out = {problem for name in HELD_OUT_SPLITS for problem in splits.get(name, [])}
    splits["pretrain"] = [problem for problem in problems if problem not in held_out]
    return splits


def pretraining_line(problem: Problem, rng: random.Random) -> str:
    """One line of plain pretraining text stating the correct sum, in a randomly picked phrasing.

    Questions are answered after a random filler (0 to 26 tokens), so the model learns to find the operands
    by content, not at a fixed distance: a chat template's markers between question and answer then do not
    break its copying of the problem.
    """
    template, filler = rng.choice(PRETRAIN_TEMPLATES), rng.choice(PRETRAIN_FILLERS)
    return template.format(a=problem.a, b=problem.b, c=problem.answer, filler=filler)


def user_prompt(problem: Problem) -> list[dict]:
    """The prompt messages of a problem: one user turn with its question."""
    return [{"role": "user", "content": problem.question()}]


def sft_row(problem: Problem, result: int) -> dict:
    """An OpenAI / TRL ``messages`` row whose assistant writes ``result`` as the sum."""
    return {"messages": [*user_prompt(problem), {"role": "assistant", "content": problem.equation(result)}]}


def preference_row(problem: Problem, rejected: int) -> dict:
    """A TRL conversational preference row: the correct equation chosen, the one with ``rejected`` rejected."""
    return {
        "prompt": user_prompt(problem),
        "chosen": [{"role": "assistant", "content": problem.equation()}],
        "rejected": [{"role": "assistant", "content": problem.equation(rejected)}],
    }


def eval_row(problem: Problem) -> dict:
    """A held-out evaluation row: the prompt messages and the correct sum."""
    return {"prompt": user_prompt(problem), "answer": problem.answer}


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Writes one JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSON Lines file (blank lines ignored), through :func:`dpo_llama.utils.raw_data.iter_rows`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file and line of a line that is not a JSON object.
    """
    return [row for row, _ in iter_rows(path)]


def load_eval_problems(path: str | os.PathLike) -> list[Problem]:
    """The held-out evaluation problems of an ``eval.jsonl`` file (rows of :func:`eval_row`).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file and row of a row that :func:`eval_problem` rejects.
    """
    problems = []
    for index, row in enumerate(read_jsonl(path)):
        try:
            problems.append(eval_problem(row))
        except ValueError as error:
            raise ValueError(f"{path} row {index}: {error}") from error
    return problems


def eval_problem(row: dict) -> Problem:
    """The problem of one :func:`eval_row` row, checked against its ``answer``.

    Raises:
        ValueError: if the row lacks a ``prompt`` message list or an ``answer``, its last message holds no
            ``a + b``, or the answer is not that sum.
    """
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict) or "answer" not in row:
        raise ValueError(f"needs a 'prompt' message list and an 'answer', got {row}")
    problem = parse_problem(str(prompt[-1].get("content", "")))
    if problem.answer != row["answer"]:
        raise ValueError(f"answer {row['answer']} but {problem.equation()}")
    return problem
