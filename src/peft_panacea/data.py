"""Preference-data layouts, the HH-RLHF and PKU-SafeRLHF readers, and rule labellers.

Panacea trains one loss per objective. The trainers accept two layouts (see `DESIGN.md`):

* **layout 1**, one pair and one label per objective (PKU-SafeRLHF style): `prompt`, `response_0`, `response_1` and
  one label column per objective. A label column holds the index (0 or 1) of the preferred response, or `None` where
  the pair has no label for that objective. Label columns are named `<objective>_response_id`
  (`better_response_id`, `safer_response_id`, `concise_response_id`, ...).
* **layout 2**, one standard preference dataset per objective (HH-RLHF style): `prompt`, `chosen`, `rejected`.

Every text column is in TRL's conversational form: `prompt` is a list of chat messages
(`{"role": "user" | "assistant", "content": str}`, alternating, first and last from the user) and each response
(`chosen`, `rejected`, `response_0`, `response_1`) is a one-message list `[{"role": "assistant", "content": str}]`.

The readers add a `conversation_id` column: a hash of the conversation's opening user turn. HH-RLHF holds the same
conversation at several depths (one row's prompt is often the first turns of another row's), so grouping by the
opening turn, as `split_by_conversation` does, keeps one conversation out of both the train and the eval side.

Example:

```python
>>> from peft_panacea.data import demo_data_dir, read_hh_rlhf, label_conciseness, split_by_conversation
>>> helpful = read_hh_rlhf(demo_data_dir(), subsets=["helpful-base"])
>>> helpful_and_concise = label_conciseness(helpful, preference_column="helpful_response_id")
>>> train, evaluation = split_by_conversation(helpful_and_concise, eval_fraction=0.1, seed=0)
```
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, List, Value

HUMAN_TAG = "\n\nHuman:"
ASSISTANT_TAG = "\n\nAssistant:"
_TURN_PATTERN = re.compile(r"\n\n(Human|Assistant):")
_ROLE_OF_TAG = {"Human": "user", "Assistant": "assistant"}

PKU_LABEL_COLUMNS = ("better_response_id", "safer_response_id")
LABEL_SUFFIX = "_response_id"
_PAIR_COLUMNS = ("prompt", "chosen", "rejected")
_LAYOUT1_COLUMNS = ("prompt", "response_0", "response_1")

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_JSON_SUFFIXES = (".json", ".jsonl", ".jsonl.gz")
CONVERSATION_ID_HEX_CHARS = 16
_HASH_SCALE = 16**CONVERSATION_ID_HEX_CHARS

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
_HH_FEATURES = Features(
    {
        "prompt": _MESSAGES,
        "chosen": _MESSAGES,
        "rejected": _MESSAGES,
        "conversation_id": Value("string"),
        "subset": Value("string"),
    }
)
_PKU_FEATURES = Features(
    {
        "prompt": _MESSAGES,
        "response_0": _MESSAGES,
        "response_1": _MESSAGES,
        "better_response_id": Value("int64"),
        "safer_response_id": Value("int64"),
        "conversation_id": Value("string"),
    }
)

Messages = list[dict[str, str]]


# --------------------------------------------------------------------------- small helpers


def demo_data_dir() -> Path:
    """Return the folder of the HH-RLHF sample shipped inside the package.

    It holds `helpful-base/test.jsonl.gz` and `harmless-base/test.jsonl.gz` (raw HH-RLHF rows, MIT licence, see
    `LICENSE` and `PROVENANCE.md` beside them), ready for `read_hh_rlhf(demo_data_dir())`.

    Raises:
        FileNotFoundError: If the package was installed without its data files.
    """
    folder = Path(str(resources.files("peft_panacea").joinpath("demo_data")))
    if not (folder / "PROVENANCE.md").is_file():
        raise FileNotFoundError(
            f"The demo data folder `{folder}` is missing or incomplete: this installation of `peft_panacea` lacks its "
            "package data. Reinstall the package from a wheel or sdist (`pip install --force-reinstall peft-panacea`)."
        )
    return folder


def conversation_id(prompt: str | Messages) -> str:
    """Return a stable id for the conversation a prompt belongs to: a hash of its opening user turn.

    Rows that continue the same conversation (their prompts share the first user turn) get the same id.

    Args:
        prompt (`str` or `list[dict]`): A plain prompt or a list of chat messages.

    Raises:
        TypeError: If `prompt` is neither a string nor a non-empty list of messages.
    """
    if isinstance(prompt, str):
        opening = prompt.strip()
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        user_turns = [message["content"] for message in prompt if message.get("role") == "user"]
        opening = (user_turns[0] if user_turns else prompt[0]["content"]).strip()
    else:
        raise TypeError(
            f"`prompt` must be a string or a non-empty list of chat messages, but got {type(prompt).__name__}: "
            f"{prompt!r:.80}."
        )
    return hashlib.sha256(opening.encode("utf-8")).hexdigest()[:CONVERSATION_ID_HEX_CHARS]


def check_columns(dataset: Dataset, required: Iterable[str], what: str) -> None:
    """Check that `dataset` has every column in `required`.

    Args:
        dataset (`datasets.Dataset`): The dataset to check.
        required (`list[str]`): The columns `what` needs.
        what (`str`): Who needs them, for the message, e.g. `'objective "harmless"'`.

    Raises:
        TypeError: If `dataset` is not a `datasets.Dataset`.
        ValueError: If a column is missing; the message names the missing and the present columns.
    """
    _check_is_dataset(dataset)
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{what} needs the column(s) {missing}, but the dataset has only {dataset.column_names}. Pass a dataset "
            "in the layout it expects: (`prompt`, `chosen`, `rejected`) or (`prompt`, `response_0`, `response_1` and "
            "one `<objective>_response_id` label column per objective); `pairs_to_layout1`, `layout1_to_pairs` and "
            "`label_conciseness` convert and label datasets."
        )


def _check_is_dataset(dataset: Any) -> None:
    if not isinstance(dataset, Dataset):
        hint = " Pick one split, e.g. `dataset['train']`." if isinstance(dataset, datasets.DatasetDict) else ""
        raise TypeError(f"`dataset` must be a `datasets.Dataset`, but got {type(dataset).__name__}.{hint}")


def _check_label_column_name(dataset: Dataset, label_column: str) -> None:
    if not isinstance(label_column, str) or not label_column:
        raise TypeError(f"`label_column` must be a non-empty string, but got {label_column!r}.")
    if label_column in dataset.column_names:
        raise ValueError(
            f"`label_column` {label_column!r} is already a column of the dataset ({dataset.column_names}); pick "
            "another name, or remove the column first with `dataset.remove_columns`."
        )


def _seeded_unit(seed: int, *parts: Any) -> float:
    """A number in [0, 1) that depends only on `seed` and the content of `parts`."""
    payload = json.dumps([seed, *parts], sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    return int(digest[:CONVERSATION_ID_HEX_CHARS], 16) / _HASH_SCALE


def _reply_text(response: str | Messages) -> str:
    """The text of a response: a plain string, or the content of the last message of a message list."""
    if isinstance(response, str):
        return response
    return response[-1]["content"] if response else ""


def _assistant(content: str) -> Messages:
    return [{"role": "assistant", "content": content}]


def _warn_dropped(function: str, dropped: Counter, total: int) -> None:
    if dropped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(dropped.items()))
        warnings.warn(
            f"`{function}` dropped {sum(dropped.values())} of {total} rows: {reasons}.", UserWarning, stacklevel=3
        )


# --------------------------------------------------------------------------- finding and reading files


def _is_local(source: str | os.PathLike) -> bool:
    """True when `source` names a local path; raise when it looks like a path but does not exist."""
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"`source` must be a path or a Hub dataset id (a string), but got {type(source).__name__}.")
    path = Path(source).expanduser()
    if path.exists():
        return True
    text = os.fspath(source)
    looks_like_path = (
        isinstance(source, os.PathLike)
        or path.is_absolute()
        or text.startswith((".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith((".json", ".jsonl", ".gz"))
    )
    if looks_like_path:
        raise FileNotFoundError(
            f"`source` {text!r} looks like a local path but does not exist. Pass an existing file or folder, or a "
            "Hub dataset id such as 'Anthropic/hh-rlhf'."
        )
    return False


def _find_split_files(root: Path, split: str, suffixes: tuple[str, ...]) -> list[Path]:
    if root.is_file():
        return [root]
    names = {f"{split}{suffix}" for suffix in suffixes}
    return sorted(path for path in root.rglob("*") if path.name in names and path.is_file())


def _read_json_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, record)` from a .jsonl, .jsonl.gz or .json (an array of objects) file."""
    try:
        yield from _decode_json_records(path)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
        expected = "gzip-compressed UTF-8 text" if path.name.endswith(".gz") else "UTF-8 text"
        raise ValueError(f"`{path}` must be {expected}, but could not be read as such: {error}.") from error


def _decode_json_records(path: Path) -> Iterator[tuple[int, dict]]:
    if path.name.endswith(".json"):
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"`{path}` must hold a JSON array of objects, but holds a {type(records).__name__}.")
        yield from enumerate(records, start=1)
        return

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"`{path}` line {number} is not valid JSON: {error}.") from error


def _require_string_fields(record: Any, fields: Iterable[str], where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object, but is a {type(record).__name__}.")
    for field in fields:
        if not isinstance(record.get(field), str):
            raise ValueError(
                f"{where} must have a string field {field!r}, but has {type(record.get(field)).__name__} "
                f"(fields: {sorted(record)}). Check that the file is in the expected format."
            )


# --------------------------------------------------------------------------- HH-RLHF


def _parse_dialogue(text: str) -> Messages | None:
    """Turn `"\\n\\nHuman: ...\\n\\nAssistant: ..."` into chat messages; `None` when it has text before any turn.

    Each turn's content is stripped of surrounding whitespace. Consecutive turns of the same role (a few HH-RLHF
    dialogues have two Assistant turns in a row) are merged into one message, joined by a blank line, so that the
    messages alternate as chat templates expect.
    """
    pieces = _TURN_PATTERN.split(text)
    if pieces[0].strip():
        return None

    messages: Messages = []
    for tag, content in zip(pieces[1::2], pieces[2::2]):
        role, content = _ROLE_OF_TAG[tag], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(part for part in (messages[-1]["content"], content) if part)
        else:
            messages.append({"role": role, "content": content})
    return messages


def split_hh_dialogues(chosen: str, rejected: str) -> tuple[Messages, str, str] | str:
    """Split one raw HH-RLHF pair into the shared prompt and the two final replies.

    Both dialogues are cut at their LAST `"\\n\\nAssistant:"`; what comes before is the prompt and must be identical
    in both, what comes after (stripped) is the reply.

    Args:
        chosen (`str`): The raw `chosen` dialogue.
        rejected (`str`): The raw `rejected` dialogue.

    Returns:
        `(prompt_messages, chosen_reply, rejected_reply)`, or, for a pair that cannot be used, a string naming why:
        `"without an Assistant turn"`, `"with different prompts"` (usually a reply that itself contains an
        `Assistant:` turn), `"with a Human turn inside a reply"`, `"with an empty reply"`, `"with identical replies"`
        or `"with a malformed prompt"` (text before the first turn, or a prompt that does not start and end with a
        Human turn).
    """
    chosen_cut, rejected_cut = chosen.rfind(ASSISTANT_TAG), rejected.rfind(ASSISTANT_TAG)
    if chosen_cut < 0 or rejected_cut < 0:
        return "without an Assistant turn"
    if chosen[:chosen_cut] != rejected[:rejected_cut]:
        return "with different prompts"

    chosen_reply = chosen[chosen_cut + len(ASSISTANT_TAG) :].strip()
    rejected_reply = rejected[rejected_cut + len(ASSISTANT_TAG) :].strip()
    if HUMAN_TAG in chosen_reply or HUMAN_TAG in rejected_reply:
        return "with a Human turn inside a reply"
    if not chosen_reply or not rejected_reply:
        return "with an empty reply"
    if chosen_reply == rejected_reply:
        return "with identical replies"

    prompt = _parse_dialogue(chosen[:chosen_cut])
    if not prompt or prompt[0]["role"] != "user" or prompt[-1]["role"] != "user":
        return "with a malformed prompt"
    return prompt, chosen_reply, rejected_reply


def _hh_records(source: str | os.PathLike, split: str, subsets: list[str] | None) -> Iterator[tuple[str, dict, str]]:
    """Yield `(subset, raw_record, where)` from a local folder/file or the Hub."""
    if _is_local(source):
        root = Path(source).expanduser()
        files = _find_split_files(root, split, _JSONL_SUFFIXES)
        if not files:
            raise ValueError(
                f"`source` {os.fspath(source)!r} has no `{split}.jsonl` or `{split}.jsonl.gz` file (searched "
                f"recursively for `split`={split!r}). Pass the right `split`, or the path of one .jsonl file."
            )
        available = sorted({path.parent.name for path in files})
        if subsets is not None:
            unknown = [subset for subset in subsets if subset not in available]
            if unknown:
                raise ValueError(
                    f"`subsets` {unknown} not found under `{root}` for split {split!r}; the available subsets "
                    f"(folder names) are {available}."
                )
            files = sorted(
                (path for path in files if path.parent.name in subsets), key=lambda p: subsets.index(p.parent.name)
            )
        for path in files:
            for number, record in _read_json_records(path):
                yield path.parent.name, record, f"`{path}` line {number}"
        return

    for subset in subsets if subsets is not None else [None]:
        hub_rows = datasets.load_dataset(os.fspath(source), data_dir=subset, split=split)
        for number, record in enumerate(hub_rows):
            yield subset or "", record, f"row {number} of {source!r} ({subset or 'all subsets'}, split {split!r})"


def read_hh_rlhf(
    source: str | os.PathLike,
    split: str = "test",
    subsets: list[str] | None = None,
) -> Dataset:
    """Read Anthropic HH-RLHF pairs into TRL's conversational preference layout (layout 2).

    Raw rows are `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`. Each pair is split at the
    LAST `"\\n\\nAssistant:"` (see `split_hh_dialogues`): the turns before it become the shared prompt, the two
    final replies become `chosen` and `rejected`. Pairs that cannot be split cleanly are dropped, with a warning
    that counts them by reason.

    Args:
        source (`str` or `os.PathLike`):
            A local folder, searched recursively for `<split>.jsonl` and `<split>.jsonl.gz` files (the layout of the
            Anthropic repository, `helpful-base/test.jsonl.gz`, ...), a single .jsonl(.gz) file, or a Hub dataset id
            (`"Anthropic/hh-rlhf"`), read with `datasets.load_dataset(source, data_dir=subset, split=split)`.
        split (`str`, defaults to `"test"`): The split (file stem) to read.
        subsets (`list[str]`, *optional*):
            Subset folder names, such as `["helpful-base", "harmless-base"]`; rows come in this order. `None` reads
            every file of `split` (locally) or the whole dataset (Hub).

    Returns:
        `datasets.Dataset` with columns `prompt` (chat messages, alternating, starting and ending with a user
        turn), `chosen` and `rejected` (one assistant message each), `conversation_id` (see `conversation_id`) and
        `subset` (the folder a row came from, or the Hub `data_dir`; `""` when none).

    Raises:
        TypeError: If `source` is not a string or path.
        FileNotFoundError: If `source` looks like a local path but does not exist.
        ValueError: If no file matches `split`, a subset is unknown, a row is not `{"chosen": str, "rejected": str}`,
            or no usable row remains.
    """
    if subsets is not None and (isinstance(subsets, str) or not all(isinstance(s, str) for s in subsets)):
        raise TypeError(f"`subsets` must be a list of folder names such as ['helpful-base'], but got {subsets!r}.")

    rows, dropped, total = [], Counter(), 0
    for subset, record, where in _hh_records(source, split, subsets):
        total += 1
        _require_string_fields(record, ("chosen", "rejected"), where)
        parsed = split_hh_dialogues(record["chosen"], record["rejected"])
        if isinstance(parsed, str):
            dropped[parsed] += 1
            continue

        prompt, chosen_reply, rejected_reply = parsed
        rows.append(
            {
                "prompt": prompt,
                "chosen": _assistant(chosen_reply),
                "rejected": _assistant(rejected_reply),
                "conversation_id": conversation_id(prompt),
                "subset": subset,
            }
        )

    _warn_dropped("read_hh_rlhf", dropped, total)
    if not rows:
        raise ValueError(f"`source` {os.fspath(source)!r} gave no usable HH-RLHF pair ({total} rows read).")
    return Dataset.from_list(rows, features=_HH_FEATURES)


# --------------------------------------------------------------------------- PKU-SafeRLHF


def _label(value: Any, column: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"{where}: `{column}` must be 0, 1 or null, but is {value!r}.")
    return int(value)


def _pku_records(source: str | os.PathLike, split: str, data_dir: str | None) -> Iterator[tuple[dict, str]]:
    if _is_local(source):
        root = Path(source).expanduser()
        files = _find_split_files(root, split, _JSON_SUFFIXES)
        if len(files) != 1:
            found = [str(path) for path in files]
            raise ValueError(
                f"`source` {os.fspath(source)!r} must name one .json/.jsonl/.jsonl.gz file, or a folder holding "
                f"exactly one `{split}.json`, `{split}.jsonl` or `{split}.jsonl.gz`, but {len(files)} were found: "
                f"{found}. Pass the path of the file to read."
            )
        for number, record in _read_json_records(files[0]):
            yield record, f"`{files[0]}` record {number}"
        return

    hub_rows = datasets.load_dataset(os.fspath(source), data_dir=data_dir, split=split)
    for number, record in enumerate(hub_rows):
        yield record, f"row {number} of {source!r} (split {split!r})"


def read_pku_saferlhf(source: str | os.PathLike, split: str = "train", data_dir: str | None = None) -> Dataset:
    """Read PKU-SafeRLHF pairs, each labelled for helpfulness and harmlessness, into layout 1.

    Raw rows have `prompt`, `response_0`, `response_1`, `better_response_id` (the more helpful response) and
    `safer_response_id` (the more harmless one). A missing or null label becomes `None` (that pair adds no loss to
    that objective). Pairs with an empty or duplicated response are dropped, with a warning.

    Args:
        source (`str` or `os.PathLike`):
            A local `.json` (array of objects), `.jsonl` or `.jsonl.gz` file, a folder holding exactly one
            `<split>.json`/`.jsonl`/`.jsonl.gz`, or a Hub dataset id (`"PKU-Alignment/PKU-SafeRLHF"`).
        split (`str`, defaults to `"train"`): The split to read (the file stem in a folder).
        data_dir (`str`, *optional*): The Hub `data_dir`, e.g. `"data/Alpaca-7B"`; ignored for local files.

    Returns:
        `datasets.Dataset` with columns `prompt` (one user message), `response_0` and `response_1` (one assistant
        message each), `better_response_id` and `safer_response_id` (0, 1 or `None`) and `conversation_id`.

    Raises:
        TypeError: If `source` is not a string or path.
        FileNotFoundError: If `source` looks like a local path but does not exist.
        ValueError: If no single file matches, a row lacks a text field, a label is not 0, 1 or null, or no usable
            row remains.
    """
    rows, dropped, total = [], Counter(), 0
    for record, where in _pku_records(source, split, data_dir):
        total += 1
        _require_string_fields(record, ("prompt", "response_0", "response_1"), where)
        labels = {column: _label(record.get(column), column, where) for column in PKU_LABEL_COLUMNS}
        prompt, first, second = (record[field].strip() for field in ("prompt", "response_0", "response_1"))
        if not prompt or not first or not second:
            dropped["with an empty prompt or response"] += 1
            continue
        if first == second:
            dropped["with identical responses"] += 1
            continue

        messages = [{"role": "user", "content": prompt}]
        rows.append(
            {
                "prompt": messages,
                "response_0": _assistant(first),
                "response_1": _assistant(second),
                **labels,
                "conversation_id": conversation_id(messages),
            }
        )

    _warn_dropped("read_pku_saferlhf", dropped, total)
    if not rows:
        raise ValueError(f"`source` {os.fspath(source)!r} gave no usable PKU-SafeRLHF pair ({total} rows read).")
    return Dataset.from_list(rows, features=_PKU_FEATURES)


# --------------------------------------------------------------------------- layouts and labellers


def pairs_to_layout1(dataset: Dataset, label_column: str, seed: int = 0) -> Dataset:
    """Turn a (`prompt`, `chosen`, `rejected`) dataset into layout 1 with the preference kept as a label column.

    Which reply becomes `response_0` is decided per row by a seeded hash of the row's content: the chosen reply is
    `response_0` when `sha256(json([seed, prompt, chosen, rejected]))`, read as a number in [0, 1), is below 0.5,
    and `response_1` otherwise. So about half the labels are 0 and half are 1, the same row always gets the same
    order whatever its position, and another `seed` gives another order.

    Args:
        dataset (`datasets.Dataset`): Has `prompt`, `chosen` and `rejected` (other columns are kept).
        label_column (`str`): Name of the new label column, e.g. `"helpful_response_id"`.
        seed (`int`, defaults to 0): Seed of the order.

    Returns:
        `datasets.Dataset` with `prompt`, `response_0`, `response_1`, `label_column` (the index of the chosen reply),
        then the other columns of `dataset`.

    Raises:
        TypeError: If `dataset` is not a `datasets.Dataset` or `label_column` not a string.
        ValueError: If a needed column is missing or `label_column` already exists.
    """
    check_columns(dataset, _PAIR_COLUMNS, "`pairs_to_layout1`")
    _check_label_column_name(dataset, label_column)

    def assign(row: dict) -> dict:
        chosen_first = _seeded_unit(seed, row["prompt"], row["chosen"], row["rejected"]) < 0.5
        first, second = (row["chosen"], row["rejected"]) if chosen_first else (row["rejected"], row["chosen"])
        return {"response_0": first, "response_1": second, label_column: 0 if chosen_first else 1}

    converted = dataset.map(assign, remove_columns=["chosen", "rejected"])
    others = [column for column in dataset.column_names if column not in _PAIR_COLUMNS]
    return converted.select_columns([*_LAYOUT1_COLUMNS, label_column, *others])


def layout1_to_pairs(dataset: Dataset, label_column: str) -> Dataset:
    """Turn a layout-1 dataset into (`prompt`, `chosen`, `rejected`) for the objective of `label_column`.

    `chosen` is `response_<label>`, `rejected` the other response. Rows whose label is `None` are dropped (the pair
    has no preference for this objective). Every `*_response_id` label column is removed, since the indices mean
    nothing once the responses are reordered; other columns are kept.

    Args:
        dataset (`datasets.Dataset`): Has `prompt`, `response_0`, `response_1` and `label_column`.
        label_column (`str`): The label column to follow, e.g. `"safer_response_id"`.

    Returns:
        `datasets.Dataset` with `prompt`, `chosen`, `rejected`, then the kept columns.

    Raises:
        TypeError: If `dataset` is not a `datasets.Dataset`.
        ValueError: If a needed column is missing, or a label is not 0, 1 or `None`.
    """
    check_columns(dataset, [*_LAYOUT1_COLUMNS, label_column], f"`layout1_to_pairs` (label {label_column!r})")
    labels = [_label(value, label_column, f"row {index}") for index, value in enumerate(dataset[label_column])]
    labelled = dataset.select([index for index, label in enumerate(labels) if label is not None])

    def orient(row: dict) -> dict:
        chosen_index = row[label_column]
        return {"chosen": row[f"response_{chosen_index}"], "rejected": row[f"response_{1 - chosen_index}"]}

    removed = [column for column in dataset.column_names if column.endswith(LABEL_SUFFIX)]
    removed += ["response_0", "response_1"]
    kept = [column for column in dataset.column_names if column not in removed and column != "prompt"]
    converted = labelled.map(orient, remove_columns=removed)
    return converted.select_columns([*_PAIR_COLUMNS, *kept])


def label_conciseness(
    dataset: Dataset,
    label_column: str = "concise_response_id",
    preference_column: str | None = None,
    seed: int = 0,
    drop_ties: bool = False,
) -> Dataset:
    """Label each pair for conciseness by rule: the reply with fewer characters is preferred.

    Length is `len(text.strip())`: Unicode characters of the final reply's content (the last message of a response,
    or the response itself when it is a plain string), surrounding whitespace ignored. This is a rule, not a human
    judgement; in HH-RLHF helpful-base the human-chosen reply is the longer one in most pairs, so conciseness and
    helpfulness conflict.

    A tie (equal lengths) gets the label `None`: the pair then adds no conciseness loss but keeps its other labels.
    `drop_ties=True` removes such rows instead.

    Works on both layouts:

    * layout 2 (`prompt`, `chosen`, `rejected`): first converted with `pairs_to_layout1(dataset, preference_column,
      seed)`, so the original preference is kept as the label column `preference_column`.
    * layout 1 (`prompt`, `response_0`, `response_1`, ...): the label column is added.

    Args:
        dataset (`datasets.Dataset`): A layout-1 or layout-2 dataset.
        label_column (`str`, defaults to `"concise_response_id"`): Name of the new label column.
        preference_column (`str`, *optional*):
            For a layout-2 dataset (required there), the name of the column that keeps the chosen/rejected
            preference, e.g. `"helpful_response_id"`. Must be `None` for a layout-1 dataset.
        seed (`int`, defaults to 0): Seed of the response order of `pairs_to_layout1`.
        drop_ties (`bool`, defaults to `False`): Remove tied rows instead of labelling them `None`.

    Returns:
        A layout-1 `datasets.Dataset` with the added `label_column` (0, 1 or `None`).

    Raises:
        TypeError: If `dataset` is not a `datasets.Dataset`.
        ValueError: If the dataset is in neither layout, `preference_column` is missing for layout 2 or given for
            layout 1, or a label column already exists.
    """
    _check_is_dataset(dataset)
    if set(_PAIR_COLUMNS) <= set(dataset.column_names):
        if preference_column is None:
            raise ValueError(
                "`preference_column` is required for a (`prompt`, `chosen`, `rejected`) dataset: it names the label "
                "column that keeps the original preference, e.g. `preference_column='helpful_response_id'`."
            )
        dataset = pairs_to_layout1(dataset, preference_column, seed=seed)
    elif preference_column is not None:
        raise ValueError(
            f"`preference_column` ({preference_column!r}) only applies to a (`prompt`, `chosen`, `rejected`) dataset, "
            f"but this one has {dataset.column_names}. Pass `preference_column=None`."
        )
    check_columns(dataset, _LAYOUT1_COLUMNS, "`label_conciseness`")
    _check_label_column_name(dataset, label_column)

    labels = []
    for first, second in zip(dataset["response_0"], dataset["response_1"]):
        first_length, second_length = len(_reply_text(first).strip()), len(_reply_text(second).strip())
        labels.append(None if first_length == second_length else int(second_length < first_length))

    labelled = dataset.add_column(label_column, labels, feature=Value("int64"))
    if drop_ties:
        labelled = labelled.select([index for index, label in enumerate(labels) if label is not None])
    return labelled


def split_by_conversation(dataset: Dataset, eval_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split a dataset into train and eval so that no conversation is on both sides.

    Rows are grouped by `conversation_id` (computed from `prompt` with `conversation_id` when the column is
    absent), so one prompt, or one conversation at several depths, never lands on both sides. A conversation goes to
    eval when a seeded hash of its id, read as a number in [0, 1), is below `eval_fraction`: the eval share is
    `eval_fraction` on average (not exactly), the split does not depend on row order, and a conversation lands on
    the same side in every dataset split with the same `seed`. Rows keep their order within each side.

    Args:
        dataset (`datasets.Dataset`): Has `conversation_id` or `prompt`.
        eval_fraction (`float`, defaults to 0.1): Expected share of conversations in eval, in (0, 1).
        seed (`int`, defaults to 0): Seed of the split.

    Returns:
        `(train, eval)` datasets with the columns of `dataset`.

    Raises:
        TypeError: If `dataset` is not a `datasets.Dataset`.
        ValueError: If `eval_fraction` is not in (0, 1), the dataset has neither `conversation_id` nor `prompt`, or a
            side would be empty.
    """
    _check_is_dataset(dataset)
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, int | float) or not 0 < eval_fraction < 1:
        raise ValueError(
            f"`eval_fraction` must be a number strictly between 0 and 1, but got {eval_fraction!r}; e.g. 0.1."
        )
    if "conversation_id" in dataset.column_names:
        ids = dataset["conversation_id"]
    else:
        check_columns(dataset, ["prompt"], "`split_by_conversation` (without a `conversation_id` column)")
        ids = [conversation_id(prompt) for prompt in dataset["prompt"]]

    in_eval = {key: _seeded_unit(seed, key) < eval_fraction for key in set(ids)}
    eval_rows = [index for index, key in enumerate(ids) if in_eval[key]]
    train_rows = [index for index, key in enumerate(ids) if not in_eval[key]]
    if not eval_rows or not train_rows:
        side = "eval" if not eval_rows else "train"
        raise ValueError(
            f"`split_by_conversation` would leave the {side} side empty: {len(in_eval)} conversation(s) with "
            f"`eval_fraction`={eval_fraction} and `seed`={seed}. Use more data, another `eval_fraction` or another "
            "`seed`."
        )
    return dataset.select(train_rows), dataset.select(eval_rows)
