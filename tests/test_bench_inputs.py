"""Spec-Bench-style jsonl inputs: every malformed file is refused with FILE:LINE and the problem."""
import json

import pytest

from specdec.bench.prompts import Prompt, PromptFileError, read_jsonl

GOOD = {"question_id": 1, "category": "qa", "turns": ["What is 2 + 2?"]}


def write(tmp_path, lines: list[bytes | str | dict]) -> str:
    path = tmp_path / "question.jsonl"
    data = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        data += (line.encode() if isinstance(line, str) else line) + b"\n"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("lines, lineno, problem", [
    ([], 1, "empty file: no prompts"),
    (["", "   "], 1, "empty file: no prompts"),   # blank lines only
    ([GOOD, '["a", "b"]'], 2, "not a JSON object"),
    ([GOOD, "42"], 2, "not a JSON object"),
    ([GOOD, {"question_id": 2, "category": "qa", "turns": "What is 3 + 3?"}], 2, "'turns' is a string"),
    ([{"question_id": 2, "category": "qa", "turns": ["Hi.", ""]}], 1, "turn 2 is empty"),
    ([{"question_id": 2, "category": "qa", "turns": ["   "]}], 1, "turn 1 is empty"),
    ([{"question_id": 2, "category": "qa", "turns": []}], 1, "'turns' is empty"),
    ([{"question_id": 2, "category": "qa", "turns": ["Hi.", 3]}], 1, "turn 2 is int"),
    ([GOOD, {"question_id": 5, "category": "qa", "turns": ["x"]}, GOOD], 3,
     "duplicate question_id 1 (first on line 1)"),
    ([GOOD, '{"question_id": 2, "category": "qa", "turns": ["x"]'], 2, "malformed JSON"),
    ([GOOD, b'{"question_id": 2, "category": "qa", "turns": ["caf\xe9"]}'], 2, "not UTF-8"),
    ([{"question_id": 2, "turns": ["x"]}], 1, "missing key(s) ['category']"),
    ([{"question_id": 2, "category": "", "turns": ["x"]}], 1, "'category' must be a non-empty string"),
    ([{"question_id": [2], "category": "qa", "turns": ["x"]}], 1, "'question_id' must be an int or a string"),
])
def test_each_malformed_file_names_the_file_the_line_and_the_problem(tmp_path, lines, lineno, problem):
    path = write(tmp_path, lines)
    with pytest.raises(PromptFileError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{lineno}: "), message
    assert problem in message, message
    assert isinstance(err.value, ValueError)   # callers that catch ValueError still do


def test_a_good_file_reads_every_prompt_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, [GOOD, "", {"question_id": "b", "category": "math", "turns": ["1+1?", "And 2+2?"]}])
    assert read_jsonl(path) == [Prompt(1, "qa", ("What is 2 + 2?",)), Prompt("b", "math", ("1+1?", "And 2+2?"))]


def test_a_utf8_byte_order_mark_is_not_an_error(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert read_jsonl(path) == [Prompt(1, "qa", ("What is 2 + 2?",))]


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_jsonl(tmp_path / "nowhere.jsonl")
