"""Tests of the dataset readers, layouts, labellers and the embedded HH-RLHF sample."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import datasets
import pytest
from datasets import Dataset

from peft_panacea import data
from peft_panacea.data import (
    check_columns,
    conversation_id,
    demo_data_dir,
    label_conciseness,
    layout1_to_pairs,
    pairs_to_layout1,
    read_hh_rlhf,
    read_pku_saferlhf,
    split_by_conversation,
    split_hh_dialogues,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_RAW = SHARED_DATA / "hh-rlhf" / "raw"
PKU_SAMPLE = SHARED_DATA / "pku-saferlhf-sample" / "train.jsonl"
DEMO_SUBSETS = ("helpful-base", "harmless-base")
DEMO_ROWS_PER_FILE = 600

needs_shared_data = pytest.mark.shared_data


def skip_without_shared_data() -> None:
    if not HH_RAW.is_dir():
        pytest.skip(f"needs the curated data at {SHARED_DATA} (beside the repository), which is absent")


def dialogue(*turns: str) -> str:
    """Build a raw HH-RLHF dialogue from alternating Human/Assistant turns."""
    tags = ["Human", "Assistant"]
    return "".join(f"\n\n{tags[index % 2]}: {text}" for index, text in enumerate(turns))


def raw_pair(prompt_turns: tuple[str, ...], chosen: str, rejected: str) -> dict[str, str]:
    return {"chosen": dialogue(*prompt_turns, chosen), "rejected": dialogue(*prompt_turns, rejected)}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


GOOD_ROWS = [
    raw_pair(("Hi", "Hello! How can I help?", "Name a red fruit."), "An apple.", "A strawberry is a red fruit."),
    raw_pair(("What is 2+2?",), "4", "It is four, of course."),
]
BAD_ROWS = [
    raw_pair(("Say hi",), "hi", "hi"),  # identical replies
    raw_pair(("Say hi",), "", "hello"),  # empty reply
    {"chosen": dialogue("A", "B", "C", "D"), "rejected": dialogue("A", "B", "X", "D")},  # prompts differ
]


@pytest.fixture
def hh_folder(tmp_path: Path) -> Path:
    """A folder in the Anthropic layout: 2 good rows + 3 bad ones in helpful-base, 1 good row in harmless-base."""
    write_jsonl(tmp_path / "helpful-base" / "test.jsonl.gz", [GOOD_ROWS[0], *BAD_ROWS, GOOD_ROWS[1]])
    write_jsonl(tmp_path / "harmless-base" / "test.jsonl", [raw_pair(("How do I pick a lock?",), "I won't.", "Ok.")])
    write_jsonl(tmp_path / "harmless-base" / "train.jsonl", [raw_pair(("train only",), "a", "bb")])
    return tmp_path


def pairs_dataset(replies: list[tuple[str, str]]) -> Dataset:
    """A layout-2 dataset with one single-turn prompt per (chosen, rejected) reply pair."""
    rows = [
        {"prompt": [user(f"question {index}")], "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}
        for index, (chosen, rejected) in enumerate(replies)
    ]
    return Dataset.from_list(rows)


# --------------------------------------------------------------------------- splitting dialogues


def test_split_hh_dialogues_cuts_at_the_last_assistant_turn():
    prompt, chosen, rejected = split_hh_dialogues(GOOD_ROWS[0]["chosen"], GOOD_ROWS[0]["rejected"])

    assert prompt == [user("Hi"), assistant("Hello! How can I help?"), user("Name a red fruit.")]
    assert chosen == "An apple."
    assert rejected == "A strawberry is a red fruit."


def test_split_hh_dialogues_merges_consecutive_turns_of_one_role():
    text = "\n\nHuman: Q1\n\nAssistant: A1\n\nAssistant: A1 again\n\nHuman: Q2\n\nAssistant: "
    prompt, chosen, _ = split_hh_dialogues(text + "yes", text + "no")

    assert prompt == [user("Q1"), assistant("A1\n\nA1 again"), user("Q2")]
    assert chosen == "yes"


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        (dialogue("Q", "same"), dialogue("Q", "same"), "with identical replies"),
        (dialogue("Q", ""), dialogue("Q", "ok"), "with an empty reply"),
        (dialogue("Q", "a\n\nAssistant: b"), dialogue("Q", "c"), "with different prompts"),
        (dialogue("Q", "a\n\nHuman: b"), dialogue("Q", "c"), "with a Human turn inside a reply"),
        ("no turns at all", "none here", "without an Assistant turn"),
        ("preamble" + dialogue("Q", "a"), "preamble" + dialogue("Q", "b"), "with a malformed prompt"),
        ("\n\nAssistant: hi\n\nAssistant: a", "\n\nAssistant: hi\n\nAssistant: b", "with a malformed prompt"),
    ],
)
def test_split_hh_dialogues_names_why_a_pair_is_unusable(chosen, rejected, reason):
    assert reason in split_hh_dialogues(chosen, rejected)


def test_conversation_id_groups_one_conversation_at_several_depths():
    short = [user("Plan a trip to Rome")]
    deeper = [user("Plan a trip to Rome"), assistant("Sure."), user("Three days?")]

    assert conversation_id(short) == conversation_id(deeper) == conversation_id("  Plan a trip to Rome ")
    assert conversation_id(short) != conversation_id([user("Plan a trip to Paris")])
    assert len(conversation_id(short)) == data.CONVERSATION_ID_HEX_CHARS
    with pytest.raises(TypeError, match="`prompt` must be a string or a non-empty list"):
        conversation_id([])


# --------------------------------------------------------------------------- HH-RLHF reader


def test_read_hh_rlhf_reads_a_folder_and_counts_dropped_rows(hh_folder):
    with pytest.warns(
        UserWarning, match=r"dropped 3 of 6 rows: 1 with an empty reply, 1 with different prompts, 1 with"
    ):
        dataset = read_hh_rlhf(hh_folder)

    assert dataset.column_names == ["prompt", "chosen", "rejected", "conversation_id", "subset"]
    assert dataset["subset"] == ["harmless-base", "helpful-base", "helpful-base"]  # sorted by path
    row = dataset[1]
    assert row["prompt"] == [user("Hi"), assistant("Hello! How can I help?"), user("Name a red fruit.")]
    assert row["chosen"] == [assistant("An apple.")]
    assert row["rejected"] == [assistant("A strawberry is a red fruit.")]
    assert row["conversation_id"] == conversation_id("Hi")


def test_read_hh_rlhf_selects_subsets_split_and_single_files(hh_folder):
    with pytest.warns(UserWarning):
        ordered = read_hh_rlhf(hh_folder, subsets=["helpful-base", "harmless-base"])
    train = read_hh_rlhf(hh_folder, split="train")
    single = read_hh_rlhf(hh_folder / "harmless-base" / "test.jsonl")

    assert ordered["subset"] == ["helpful-base", "helpful-base", "harmless-base"]
    assert train["prompt"] == [[user("train only")]]
    assert single["chosen"] == [[assistant("I won't.")]]


def test_read_hh_rlhf_rejects_bad_sources(hh_folder, tmp_path):
    with pytest.raises(ValueError, match=r"`subsets` \['red-team'\] not found .* \['harmless-base', 'helpful-base'\]"):
        read_hh_rlhf(hh_folder, subsets=["red-team"])
    with pytest.raises(ValueError, match="has no `valid.jsonl` or `valid.jsonl.gz` file"):
        read_hh_rlhf(hh_folder, split="valid")
    with pytest.raises(FileNotFoundError, match="looks like a local path but does not exist"):
        read_hh_rlhf(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="looks like a local path"):
        read_hh_rlhf("./no/such/folder")
    with pytest.raises(TypeError, match="`subsets` must be a list of folder names"):
        read_hh_rlhf(hh_folder, subsets="helpful-base")

    write_jsonl(tmp_path / "odd" / "test.jsonl", [{"prompt": "x", "chosen": 3}])
    with pytest.raises(ValueError, match=r"line 1 must have a string field 'chosen'"):
        read_hh_rlhf(tmp_path / "odd")

    latin = tmp_path / "latin" / "test.jsonl"
    latin.parent.mkdir()
    latin.write_bytes('{"chosen": "caf\u00e9", "rejected": "x"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"`.*latin/test\.jsonl` must be UTF-8 text"):
        read_hh_rlhf(latin)
    fake_gzip = tmp_path / "fake" / "test.jsonl.gz"
    fake_gzip.parent.mkdir()
    fake_gzip.write_text('{"chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ValueError, match=r"`.*fake/test\.jsonl\.gz` must be gzip-compressed UTF-8 text"):
        read_hh_rlhf(fake_gzip.parent)


def test_read_hh_rlhf_reads_hub_ids_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, data_dir=None, split=None):
        calls.append((path, data_dir, split))
        return Dataset.from_list([GOOD_ROWS[1]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = read_hh_rlhf("Anthropic/hh-rlhf", split="train", subsets=["helpful-base", "harmless-base"])

    assert calls == [("Anthropic/hh-rlhf", "helpful-base", "train"), ("Anthropic/hh-rlhf", "harmless-base", "train")]
    assert dataset["subset"] == ["helpful-base", "harmless-base"]
    assert dataset["chosen"] == [[assistant("4")], [assistant("4")]]


# --------------------------------------------------------------------------- PKU-SafeRLHF reader


PKU_ROWS = [
    {"prompt": "How do I bake bread?", "response_0": "Knead.", "response_1": "Mix, knead, bake.",
     "better_response_id": 1, "safer_response_id": 0},
    {"prompt": "Tell me a joke", "response_0": "No.", "response_1": "Why did...", "better_response_id": 1},
    {"prompt": "Same?", "response_0": "Yes", "response_1": "Yes", "better_response_id": 0, "safer_response_id": 0},
]  # fmt: skip


def test_read_pku_saferlhf_reads_jsonl_and_json(tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps(PKU_ROWS[:2]))
    write_jsonl(tmp_path / "pairs.jsonl", PKU_ROWS)

    with pytest.warns(UserWarning, match="dropped 1 of 3 rows: 1 with identical responses"):
        from_jsonl = read_pku_saferlhf(tmp_path / "pairs.jsonl")
    from_json = read_pku_saferlhf(tmp_path / "pairs.json")

    assert from_jsonl.to_list() == from_json.to_list()
    assert from_jsonl.column_names == [
        "prompt", "response_0", "response_1", "better_response_id", "safer_response_id", "conversation_id",
    ]  # fmt: skip
    assert from_jsonl[0]["prompt"] == [user("How do I bake bread?")]
    assert from_jsonl[0]["response_1"] == [assistant("Mix, knead, bake.")]
    assert from_jsonl["better_response_id"] == [1, 1]
    assert from_jsonl["safer_response_id"] == [0, None]


def test_read_pku_saferlhf_rejects_bad_labels_and_ambiguous_folders(tmp_path):
    write_jsonl(tmp_path / "bad" / "train.jsonl", [{**PKU_ROWS[0], "safer_response_id": True}])
    with pytest.raises(ValueError, match=r"`safer_response_id` must be 0, 1 or null, but is True"):
        read_pku_saferlhf(tmp_path / "bad")

    write_jsonl(tmp_path / "two" / "train.jsonl", PKU_ROWS[:1])
    (tmp_path / "two" / "train.json").write_text(json.dumps(PKU_ROWS[:1]))
    with pytest.raises(ValueError, match="but 2 were found"):
        read_pku_saferlhf(tmp_path / "two")


@needs_shared_data
def test_read_pku_saferlhf_on_the_shared_sample():
    if not PKU_SAMPLE.is_file():
        pytest.skip(f"needs {PKU_SAMPLE}, which is absent")
    dataset = read_pku_saferlhf(PKU_SAMPLE)

    assert len(dataset) == 32
    assert dataset[0]["prompt"] == [user("How can I seduce my friend's husband?")]
    assert (dataset[0]["better_response_id"], dataset[0]["safer_response_id"]) == (0, 1)
    disagreements = sum(a != b for a, b in zip(dataset["better_response_id"], dataset["safer_response_id"]))
    assert disagreements == 19  # as the sample's README states


# --------------------------------------------------------------------------- layouts and labellers


def test_pairs_to_layout1_and_back_round_trip():
    pairs = pairs_dataset([(f"chosen {index}", f"rejected {index}") for index in range(40)])
    layout1 = pairs_to_layout1(pairs, "helpful_response_id")

    assert layout1.column_names == ["prompt", "response_0", "response_1", "helpful_response_id"]
    labels = layout1["helpful_response_id"]
    assert 10 < sum(labels) < 30  # the order is mixed, not always "chosen first"
    for row in layout1:
        assert row[f"response_{row['helpful_response_id']}"][0]["content"].startswith("chosen")
    assert pairs_to_layout1(pairs, "helpful_response_id")["helpful_response_id"] == labels
    assert pairs_to_layout1(pairs, "helpful_response_id", seed=1)["helpful_response_id"] != labels
    assert layout1_to_pairs(layout1, "helpful_response_id").to_list() == pairs.to_list()


def test_layout1_to_pairs_drops_unlabelled_rows_and_other_labels():
    layout1 = Dataset.from_list(
        [
            {"prompt": [user("q0")], "response_0": [assistant("a")], "response_1": [assistant("b")],
             "safer_response_id": 1, "better_response_id": 0, "conversation_id": "c0"},
            {"prompt": [user("q1")], "response_0": [assistant("c")], "response_1": [assistant("d")],
             "safer_response_id": None, "better_response_id": 1, "conversation_id": "c1"},
        ]
    )  # fmt: skip
    pairs = layout1_to_pairs(layout1, "safer_response_id")

    assert pairs.column_names == ["prompt", "chosen", "rejected", "conversation_id"]
    assert pairs.to_list() == [
        {"prompt": [user("q0")], "chosen": [assistant("b")], "rejected": [assistant("a")], "conversation_id": "c0"}
    ]


def test_label_conciseness_prefers_the_shorter_reply():
    """Lengths (characters, whitespace stripped): 2 vs 10, 12 vs 3, 3 vs 3 (a tie), 4 vs 5 after stripping."""
    pairs = pairs_dataset([("ok", "much wordy"), ("long and rich", "no!"), ("abc", "xyz"), ("  four  ", "fiver")])
    labelled = label_conciseness(pairs, preference_column="helpful_response_id")

    assert labelled.column_names == [
        "prompt", "response_0", "response_1", "helpful_response_id", "concise_response_id",
    ]  # fmt: skip
    concise_replies = [
        None if label is None else row[f"response_{label}"][0]["content"]
        for row, label in zip(labelled, labelled["concise_response_id"])
    ]
    assert concise_replies == ["ok", "no!", None, "  four  "]
    chosen_replies = [row[f"response_{row['helpful_response_id']}"][0]["content"] for row in labelled]
    assert chosen_replies == ["ok", "long and rich", "abc", "  four  "]

    without_ties = label_conciseness(pairs, preference_column="helpful_response_id", drop_ties=True)
    assert len(without_ties) == 3


def test_label_conciseness_adds_a_column_to_layout1():
    layout1 = Dataset.from_list(
        [{"prompt": [user("q")], "response_0": [assistant("short")], "response_1": "longer reply", "x_response_id": 0}]
    )
    labelled = label_conciseness(layout1)

    assert labelled["concise_response_id"] == [0]
    assert labelled["x_response_id"] == [0]


def test_label_conciseness_rejects_unclear_requests():
    pairs = pairs_dataset([("a", "bb")])
    with pytest.raises(ValueError, match="`preference_column` is required"):
        label_conciseness(pairs)
    layout1 = pairs_to_layout1(pairs, "helpful_response_id")
    with pytest.raises(ValueError, match="only applies to a"):
        label_conciseness(layout1, preference_column="helpful_response_id")
    with pytest.raises(ValueError, match="`label_column` 'helpful_response_id' is already a column"):
        label_conciseness(layout1, label_column="helpful_response_id")
    with pytest.raises(ValueError, match=r"`label_conciseness` needs the column\(s\) \['response_0', 'response_1'\]"):
        label_conciseness(Dataset.from_list([{"prompt": "q", "completion": "a"}]))


def test_check_columns_names_missing_and_present_columns():
    dataset = Dataset.from_list([{"prompt": "q", "chosen": "a"}])
    check_columns(dataset, ["prompt"], "anything")

    expected = r'objective "harmless" needs the column\(s\) \[\'rejected\'\], but the dataset has only \[\'prompt\''
    with pytest.raises(ValueError, match=expected):
        check_columns(dataset, ["prompt", "rejected"], 'objective "harmless"')
    with pytest.raises(TypeError, match=r"Pick one split, e.g. `dataset\['train'\]`"):
        check_columns(datasets.DatasetDict({"train": dataset}), ["prompt"], "anything")


# --------------------------------------------------------------------------- train/eval split


def test_split_by_conversation_keeps_conversations_whole():
    rows = []
    for conversation in range(60):
        prompt = [user(f"opening {conversation}")]
        for depth in range(1 + conversation % 3):  # one conversation at 1 to 3 depths
            if depth:
                prompt = [*prompt, assistant(f"reply {depth}"), user(f"follow-up {depth}")]
            rows.append({"prompt": prompt, "chosen": [assistant("a")], "rejected": [assistant("b")]})
    dataset = Dataset.from_list(rows)

    train, evaluation = split_by_conversation(dataset, eval_fraction=0.25, seed=3)

    train_ids = {conversation_id(prompt) for prompt in train["prompt"]}
    eval_ids = {conversation_id(prompt) for prompt in evaluation["prompt"]}
    assert not train_ids & eval_ids
    assert len(train) + len(evaluation) == len(dataset) == 120
    assert 5 <= len(eval_ids) <= 25
    again_train, _ = split_by_conversation(dataset.shuffle(seed=0), eval_fraction=0.25, seed=3)
    assert sorted(map(str, again_train["prompt"])) == sorted(map(str, train["prompt"]))


def test_split_by_conversation_rejects_bad_fractions_and_tiny_data():
    dataset = pairs_dataset([("a", "b")])
    with pytest.raises(ValueError, match=r"`eval_fraction` must be a number strictly between 0 and 1, but got 1.5"):
        split_by_conversation(dataset, eval_fraction=1.5)
    with pytest.raises(ValueError, match="would leave the .* side empty: 1 conversation"):
        split_by_conversation(dataset, eval_fraction=0.5)


# --------------------------------------------------------------------------- the embedded sample


def embedded_lines(subset: str) -> list[bytes]:
    return gzip.decompress((demo_data_dir() / subset / "test.jsonl.gz").read_bytes()).splitlines()


def test_the_embedded_sample_reads_and_matches_its_provenance():
    folder = demo_data_dir()
    provenance = (folder / "PROVENANCE.md").read_text()
    assert (folder / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2022 Anthropic")
    for subset in DEMO_SUBSETS:
        digest = hashlib.sha256((folder / subset / "test.jsonl.gz").read_bytes()).hexdigest()
        assert f"| `{subset}/test.jsonl.gz` | {DEMO_ROWS_PER_FILE} |" in provenance
        assert digest in provenance
        assert len(embedded_lines(subset)) == DEMO_ROWS_PER_FILE

    with pytest.warns(UserWarning, match="dropped 4 of 1200 rows"):
        dataset = read_hh_rlhf(folder, subsets=list(DEMO_SUBSETS))

    assert dataset["subset"].count("helpful-base") == 598
    assert dataset["subset"].count("harmless-base") == 598
    prompt = [user("When was Domino's Pizza founded?"), assistant("In 1960, by two brothers.")]
    prompt.append(user("Do you know the two brothers names?"))
    row = dataset[dataset["prompt"].index(prompt)]
    assert row["chosen"] == [assistant("Their names were Thomas and James Monaghan.")]
    assert row["rejected"] == [assistant("They were Tom and James Monaghan.")]


@needs_shared_data
def test_every_embedded_row_is_a_byte_identical_source_row():
    skip_without_shared_data()
    for subset in DEMO_SUBSETS:
        source = set(gzip.decompress((HH_RAW / subset / "test.jsonl.gz").read_bytes()).splitlines())
        lines = embedded_lines(subset)
        assert len(set(lines)) == len(lines)
        assert set(lines) <= source
    licence = (SHARED_DATA / "hh-rlhf" / "LICENSE").read_bytes()
    assert (demo_data_dir() / "LICENSE").read_bytes() == licence


# --------------------------------------------------------------------------- the curated data beside the repo


@needs_shared_data
def test_read_hh_rlhf_on_all_shared_test_splits():
    skip_without_shared_data()
    subsets = ["helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled"]
    with pytest.warns(UserWarning, match="dropped 66 of 8552 rows"):
        dataset = read_hh_rlhf(HH_RAW, subsets=subsets)

    counts = {subset: dataset["subset"].count(subset) for subset in subsets}
    assert counts == {"helpful-base": 2339, "harmless-base": 2303, "helpful-online": 1130,
                      "helpful-rejection-sampled": 2714}  # fmt: skip
    assert all(prompt[0]["role"] == prompt[-1]["role"] == "user" for prompt in dataset["prompt"])

    # helpful-base line 356: a prompt with two Assistant turns in a row, and an inline "Human:" left as text.
    knives = next(
        row for row in dataset if row["prompt"][0]["content"] == "What's a good way to sharpen my kitchen knives?"
    )
    assert [message["role"] for message in knives["prompt"]] == ["user", "assistant", "user"]
    assert knives["prompt"][1]["content"].endswith("Human:  Thanks.\n\nDo you have any other questions?")
    assert knives["chosen"][0]["content"].startswith("Then you can take a small metal file")


@needs_shared_data
def test_helpfulness_and_conciseness_conflict_on_helpful_base():
    skip_without_shared_data()
    with pytest.warns(UserWarning, match="dropped 15 of 2354 rows"):
        helpful = read_hh_rlhf(HH_RAW, subsets=["helpful-base"])
    labelled = label_conciseness(helpful, preference_column="helpful_response_id")

    concise, chosen = labelled["concise_response_id"], labelled["helpful_response_id"]
    assert concise.count(None) == 15
    agreement = sum(a == b for a, b in zip(concise, chosen)) / len(labelled)
    assert 0.38 < agreement < 0.42  # the human-chosen reply is the longer one in about 60% of pairs

    train, evaluation = split_by_conversation(labelled, eval_fraction=0.1, seed=0)
    assert not set(train["conversation_id"]) & set(evaluation["conversation_id"])
    assert 0.08 < len(evaluation) / len(labelled) < 0.12
