"""The fixture files' folder and chat-message builders shared by the data-format tests.

    from tests.data_fixtures import FIXTURES, assistant, first_row, user
    rows = [user("2+2?"), assistant("4")]
    row = first_row("dpo_en_demo.json")   # the first raw row of tests/fixtures/dpo_en_demo.json
"""

from pathlib import Path

from dpo_llama.utils.raw_data import iter_rows

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def first_row(name: str) -> dict:
    """The first raw row of ``tests/fixtures/<name>``."""
    return next(iter_rows(FIXTURES / name))[0]
