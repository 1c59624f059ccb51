"""segppo.data: loading, layouts, chat formatting, truncation and response-aligned collation."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset, DatasetDict
from tiny import CHATML_TEMPLATE, tiny_tokenizer
from transformers import GenerationConfig

from segppo.data import (
    DEFAULT_CHAT_TEMPLATE,
    ChatFormat,
    EncodedPair,
    LayoutOptions,
    PreferenceBatch,
    PreferenceExample,
    PromptExample,
    collate_preferences,
    collate_prompts,
    default_stop_token_ids,
    detect_preference_layout,
    detect_prompt_layout,
    encode_preferences,
    encode_prompts,
    load_rows,
    load_splits,
    split_train_eval,
    to_preference_examples,
    to_prompt_examples,
)

IM_END = 3  # tiny_tokenizer(): <|im_end|>, the EOS of the templated tokenizer
ENDOFTEXT = 1  # tiny_tokenizer(): <|endoftext|>, the EOS of the base tokenizer


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# Made-up rows in the shapes of the real datasets' layouts.
CONVERSATION_ROWS = [  # preference_700K
    {
        "chosen": [user("How many legs does a spider have?"), assistant("Eight legs.")],
        "rejected": [user("How many legs does a spider have?"), assistant("Six legs.")],
        "chosen_score": 9.0,
        "rejected_score": 2.0,
    },
    {
        "chosen": [user("Name a bakery."), assistant("Rise."), user("Shorter?"), assistant("Crumb.")],
        "rejected": [user("Name a bakery."), assistant("Rise."), user("Shorter?"), assistant("No.")],
        "chosen_score": 7.5,
        "rejected_score": 3.0,
    },
]
ULTRAFEEDBACK_ROWS = [
    {
        "source": "evol",
        "prompt": "Why is the sky blue?",
        "chosen": [user("Why is the sky blue?"), assistant("Air scatters blue light.")],
        "chosen-rating": 5.0,
        "rejected": [user("Why is the sky blue?"), assistant("It reflects the sea.")],
        "rejected-rating": 1.5,
    }
]
PROMPT_RESPONSE_ROWS = [
    {"prompt": "Name a prime number greater than 10.", "chosen": "11 is prime.", "rejected": "12 is prime."},
    {
        "prompt": [system("Be brief."), user("Translate thank you.")],
        "chosen": "Gracias.",
        "rejected": "Merci.",
    },
]
HH_ROWS = [
    {
        "chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
        "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Lyon.",
    },
    {
        "chosen": "\n\nHuman: Boil an egg?\n\nAssistant: Nine minutes.\n\nHuman: Then?\n\nAssistant: Cool.",
        "rejected": "\n\nHuman: Boil an egg?\n\nAssistant: Nine minutes.\n\nHuman: Then?\n\nAssistant: Eat.",
    },
]
PROMPT_ROWS = [
    {"prompt": "Suggest a name for a turtle."},
    {"prompt": [system("You are concise."), user("List three primary colors.")]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat(tokenizer):
    return ChatFormat(tokenizer)


def text(tokenizer, ids):
    return tokenizer.decode(ids)


# ------------------------------------------------------------------------------------------------
# Layouts


def test_conversation_layout_splits_multi_turn_and_takes_margin():
    assert detect_preference_layout(CONVERSATION_ROWS) == "conversation"
    examples, report = to_preference_examples(CONVERSATION_ROWS)
    assert report.layout == "conversation" and report.kept == 2 and report.skipped == 0
    single, multi = examples
    assert single.prompt == [user("How many legs does a spider have?")]
    assert (single.chosen, single.rejected, single.margin) == ("Eight legs.", "Six legs.", 7.0)
    assert multi.prompt == [user("Name a bakery."), assistant("Rise."), user("Shorter?")]
    assert (multi.chosen, multi.rejected, multi.margin) == ("Crumb.", "No.", 4.5)


def test_ultrafeedback_uses_the_conversation_and_the_rating_margin():
    assert detect_preference_layout(ULTRAFEEDBACK_ROWS) == "conversation"
    [example], _ = to_preference_examples(ULTRAFEEDBACK_ROWS)
    assert example == PreferenceExample(
        [user("Why is the sky blue?")], "Air scatters blue light.", "It reflects the sea.", 3.5, row=0
    )


def test_prompt_response_layout_with_string_and_message_prompts():
    rows = [*PROMPT_RESPONSE_ROWS, {"prompt": "Hi?", "chosen": [assistant("Hello.")], "rejected": "Go."}]
    assert detect_preference_layout(rows) == "prompt_response"
    examples, report = to_preference_examples(rows)
    assert report.skipped == 0
    assert examples[0].prompt == [user("Name a prime number greater than 10.")]
    assert examples[0].margin is None
    assert examples[1].prompt == [system("Be brief."), user("Translate thank you.")]
    assert (examples[2].chosen, examples[2].rejected) == ("Hello.", "Go.")


def test_hh_layout_turns_become_messages():
    assert detect_preference_layout(HH_ROWS) == "hh"
    examples, _ = to_preference_examples(HH_ROWS)
    assert examples[0].prompt == [user("What is the capital of France?")]
    assert (examples[0].chosen, examples[0].rejected) == ("Paris.", "Lyon.")
    assert examples[1].prompt == [user("Boil an egg?"), assistant("Nine minutes."), user("Then?")]
    assert (examples[1].chosen, examples[1].rejected) == ("Cool.", "Eat.")


def test_key_overrides():
    rows = [{"question": "Two plus two?", "good": "Four.", "bad": "Five.", "s_good": 1, "s_bad": 0.25}]
    options = LayoutOptions(
        prompt_key="question",
        chosen_key="good",
        rejected_key="bad",
        chosen_score_key="s_good",
        rejected_score_key="s_bad",
    )
    [example], report = to_preference_examples(rows, options)
    assert report.layout == "prompt_response"
    assert example == PreferenceExample([user("Two plus two?")], "Four.", "Five.", 0.75, row=0)
    # A conversation column under another name, and an explicit layout.
    rows = [{"win": CONVERSATION_ROWS[0]["chosen"], "lose": CONVERSATION_ROWS[0]["rejected"]}]
    options = LayoutOptions(chosen_key="win", rejected_key="lose", layout="conversation")
    [example], _ = to_preference_examples(rows, options)
    assert (example.chosen, example.rejected) == ("Eight legs.", "Six legs.")


def test_malformed_rows_are_skipped_with_reasons():
    good = CONVERSATION_ROWS[0]
    rows = [
        good,
        {**good, "rejected": None},
        {**good, "chosen": [user("How many legs does a spider have?"), assistant("  ")]},
        {**good, "chosen": [user("How many legs does a spider have?"), assistant(8)]},
        {**good, "chosen": [assistant("Hi."), user("Q?"), assistant("A.")]},
        {**good, "rejected": [user("Another prompt?"), assistant("Six legs.")]},
        {**good, "chosen_score": "high"},
        good,
    ]
    examples, report = to_preference_examples(rows)
    assert len(examples) == 2 and [e.row for e in examples] == [0, 7]
    assert (report.total, report.kept, report.skipped) == (8, 2, 6)
    assert len(report.reasons) == report.max_reasons == 5
    assert report.reasons[0] == "row 1: missing 'rejected'"
    assert report.reasons[1].startswith("row 2:") and "empty" in report.reasons[1]
    assert report.reasons[2].startswith("row 3:") and "non-string content" in report.reasons[2]
    assert report.reasons[3].startswith("row 4:") and "role order" in report.reasons[3]
    assert report.reasons[4].startswith("row 5:") and "different prompts" in report.reasons[4]
    assert "skipped 6" in str(report)


def test_an_empty_last_user_turn_is_an_empty_prompt_in_every_layout():
    """A string prompt of whitespace was skipped as empty, but the same prompt as a message list
    (or a conversation's last user turn) was kept, and PPO generated answers to an empty turn."""
    rows = [
        {"prompt": "  "},
        {"prompt": [user(" \n")]},
        {"prompt": [{"role": "system", "content": "Be brief."}, user("")]},
        {"prompt": [user("Hi."), assistant("Hello!"), user("")]},
        {"prompt": [user(""), assistant("Hello!"), user("Name a city.")]},  # an empty earlier turn: kept
    ]
    examples, report = to_prompt_examples(rows)
    assert [e.row for e in examples] == [4]
    assert all("empty" in reason for reason in report.reasons), report.reasons
    pairs, report = to_preference_examples(
        [
            {"chosen": [user(" "), assistant("A.")], "rejected": [user(" "), assistant("B.")]},
            CONVERSATION_ROWS[0],
        ]
    )
    assert [e.row for e in pairs] == [1] and "empty" in report.reasons[0]


def test_all_malformed_rows_raise_naming_the_keys():
    with pytest.raises(ValueError, match=r"keys \['answer', 'question'\].*conversation.*hh"):
        to_preference_examples([{"question": "Q?", "answer": "A."}])
    rows = [{"prompt": "Q?", "chosen": "", "rejected": "No."}]
    with pytest.raises(
        ValueError, match=r"all 1 rows are malformed.*keys \['chosen', 'prompt', 'rejected'\]"
    ):
        to_preference_examples(rows)
    with pytest.raises(ValueError, match="no usable prompt rows"):
        to_prompt_examples([{"text": "hello"}])


def test_prompt_layouts():
    assert detect_prompt_layout(PROMPT_ROWS) == "prompt"
    examples, _ = to_prompt_examples(PROMPT_ROWS)
    assert [e.prompt for e in examples] == [
        [user("Suggest a name for a turtle.")],
        [system("You are concise."), user("List three primary colors.")],
    ]
    chosen_only = [{"chosen": row["chosen"]} for row in CONVERSATION_ROWS]
    assert detect_prompt_layout(chosen_only) == "conversation"
    examples, _ = to_prompt_examples(chosen_only)
    assert examples[1].prompt == [user("Name a bakery."), assistant("Rise."), user("Shorter?")]
    examples, report = to_prompt_examples(HH_ROWS)
    assert report.layout == "hh" and examples[1].prompt[-1] == user("Then?")
    # A prompt that ends with the assistant is skipped.
    examples, report = to_prompt_examples([*PROMPT_ROWS, {"prompt": [user("Q?"), assistant("A.")]}])
    assert report.skipped == 1 and "row 2" in report.reasons[0]


# ------------------------------------------------------------------------------------------------
# Chat formatting


def test_prefix_property_and_response_ends_at_end_of_turn(tokenizer, chat):
    prompt = [system("Be brief."), user("Name a bakery."), assistant("Rise."), user("Shorter?")]
    prompt_ids = chat.prompt_ids(prompt)
    response_ids, has_eos = chat.response_ids(prompt, "Crumb.")
    full_ids = tokenizer.apply_chat_template([*prompt, assistant("Crumb.")], tokenize=True, return_dict=False)
    # Prompt + response == the whole templated conversation up to and including the end of turn.
    end = full_ids.index(IM_END, len(prompt_ids)) + 1
    assert prompt_ids + response_ids == full_ids[:end]
    assert has_eos and response_ids[-1] == IM_END
    # The template's trailing "\n" after <|im_end|> is dropped.
    assert full_ids[end:] == tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert text(tokenizer, prompt_ids).endswith(
        "<|im_start|>user\nShorter?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text(tokenizer, response_ids) == "Crumb.<|im_end|>"


def test_eos_appended_when_the_template_adds_none(tokenizer):
    no_end = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    chat = ChatFormat(tokenizer, chat_template=no_end)
    pair = chat.encode_pair(PreferenceExample([user("Q?")], "Yes.", "No."))
    assert pair.chosen_ids[-1] == IM_END and pair.rejected_ids[-1] == IM_END
    assert pair.chosen_has_eos and pair.rejected_has_eos
    assert text(tokenizer, pair.chosen_ids) == " Yes.\n<|im_end|>"
    # For a generated response, nothing is appended.
    ids, has_eos = chat.response_ids([user("Q?")], "Yes.", add_eos=False)
    assert not has_eos and IM_END not in ids


def test_base_tokenizer_gets_the_default_template():
    base = tiny_tokenizer(chat_template=False)
    chat = ChatFormat(base)
    assert chat.template == DEFAULT_CHAT_TEMPLATE and chat.end_of_turn_id == ENDOFTEXT
    prompt = [system("Be brief."), user("Hi."), assistant("Hello."), user("Bye?")]
    prompt_ids = chat.prompt_ids(prompt)
    response_ids, has_eos = chat.response_ids(prompt, "Bye.")
    assert (
        text(base, prompt_ids)
        == "Be brief.\n\nUser: Hi.\n\nAssistant: Hello.<|endoftext|>\n\nUser: Bye?\n\nAssistant:"
    )
    assert text(base, response_ids) == " Bye.<|endoftext|>" and has_eos
    full_ids = base.apply_chat_template(
        [*prompt, assistant("Bye.")], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=True, return_dict=False
    )
    assert full_ids[: len(prompt_ids) + len(response_ids)] == prompt_ids + response_ids


def test_chat_template_file_overrides(tokenizer, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(DEFAULT_CHAT_TEMPLATE)
    chat = ChatFormat(tokenizer, chat_template=path)  # overrides the tokenizer's ChatML template
    assert text(tokenizer, chat.prompt_ids([user("Hi.")])) == "User: Hi.\n\nAssistant:"
    assert text(tokenizer, chat.response_ids([user("Hi.")], "Yo.")[0]) == " Yo.<|im_end|>"
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        ChatFormat(tokenizer, chat_template=str(tmp_path / "missing.jinja"))


def test_instruct_template_on_a_base_tokenizer_stops_at_its_end_of_turn():
    base = tiny_tokenizer(chat_template=False)  # EOS <|endoftext|>; ChatML ends turns with <|im_end|>
    chat = ChatFormat(base, chat_template=CHATML_TEMPLATE)
    assert chat.end_of_turn_id == IM_END and chat.stop_token_ids == [ENDOFTEXT, IM_END]
    ids, has_eos = chat.response_ids([user("Hi.")], "Yo.")
    assert text(base, ids) == "Yo.<|im_end|>" and has_eos


def test_stop_token_ids_from_a_list_and_a_generation_config(tokenizer):
    assert default_stop_token_ids(tokenizer, GenerationConfig(eos_token_id=[IM_END, 2])) == [IM_END, 2]
    assert default_stop_token_ids(tokenizer, GenerationConfig(eos_token_id=ENDOFTEXT)) == [IM_END, ENDOFTEXT]
    # Any id of the list ends a response; the one the template emits is the end-of-turn token.
    chat = ChatFormat(tokenizer, stop_token_ids=[ENDOFTEXT, IM_END])
    ids, has_eos = chat.response_ids([user("Hi.")], "Yo.")
    assert has_eos and ids[-1] == IM_END and chat.end_of_turn_id == IM_END
    # A generation is ended the same way: after its first stop token, padding dropped.
    assert chat.cut_at_stop([40, 41, IM_END, 0, 0]) == ([40, 41, IM_END], True)
    assert chat.cut_at_stop([40, 41, 42]) == ([40, 41, 42], False)
    assert chat.pad_token_id == tokenizer.pad_token_id == 0


def test_templates_that_break_the_prefix_property_fall_back(tokenizer):
    # Text prefix holds but tokens do not: the prompt's trailing space merges with the response.
    trailing_space = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    chat = ChatFormat(tokenizer, chat_template=trailing_space)
    prompt_ids = chat.prompt_ids([user("Hi.")])
    full_ids = tokenizer.apply_chat_template(
        [user("Hi."), assistant("water")], chat_template=trailing_space, tokenize=True, return_dict=False
    )
    assert full_ids[: len(prompt_ids)] != prompt_ids  # " water" is one token
    ids, has_eos = chat.response_ids([user("Hi.")], "water")
    assert ids == tokenizer("water", add_special_tokens=False)["input_ids"] + [IM_END] and has_eos
    # Not even a text prefix: the response content alone, plus the end-of-turn token.
    renamed = (
        "{% for m in messages %}"
        "{{ ('bot' if m['role'] == 'assistant' else m['role']) + ': ' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    chat = ChatFormat(tokenizer, chat_template=renamed)
    ids, has_eos = chat.response_ids([user("Hi.")], "Yes.")
    assert ids == tokenizer("Yes.", add_special_tokens=False)["input_ids"] + [IM_END] and has_eos


def test_truncation_cuts_the_prompt_first_then_the_response(tokenizer, chat):
    prompt = [user("The quick brown fox jumps over the lazy dog.")]
    example = PreferenceExample(prompt, "A spider has eight legs.", "Paris.", 1.0)
    full = chat.encode_pair(example)
    prompt_len, chosen_len, rejected_len = len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids)
    assert chosen_len > rejected_len and not full.prompt_truncated

    # Prompt only: its oldest content goes (the template's tokens stay); the responses stay whole.
    pair = chat.encode_pair(example, max_prompt_len=prompt_len - 5)
    kept = text(tokenizer, pair.prompt_ids)
    assert len(pair.prompt_ids) <= prompt_len - 5 and pair.prompt_truncated
    assert kept.startswith("<|im_start|>user\n") and kept.endswith(
        "lazy dog.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert pair.chosen_ids == full.chosen_ids and pair.chosen_has_eos
    short_prompt = pair.prompt_ids

    # Then the longer response is cut from the right and loses its EOS; the shorter one fits.
    max_len = len(short_prompt) + rejected_len
    pair = chat.encode_pair(example, max_len=max_len, max_prompt_len=prompt_len - 5)
    assert pair.prompt_ids == short_prompt
    assert pair.chosen_ids == full.chosen_ids[:rejected_len] and not pair.chosen_has_eos
    assert pair.rejected_ids == full.rejected_ids and pair.rejected_has_eos
    assert pair.margin == 1.0

    # Without max_prompt_len the prompt still leaves room for a response token under max_len.
    template_only = len(chat.prompt_ids([user("")]))
    pair = chat.encode_pair(example, max_len=template_only + 2)
    assert len(pair.prompt_ids) == template_only + 1 and len(pair.chosen_ids) == 1 and not pair.chosen_has_eos
    assert text(tokenizer, pair.prompt_ids) == "<|im_start|>user\n.<|im_end|>\n<|im_start|>assistant\n"
    # no room for a token of the question (it was emptied, and the pair trained on with nothing
    # asked), or for the template itself; the options to raise, as rm train, ppo train and eval name them
    for max_len in (template_only + 1, template_only):
        with pytest.raises(ValueError, match=r"chat template alone.*raise --max-prompt-len \(or --max-len\)"):
            chat.encode_pair(example, max_len=max_len)
    with pytest.raises(ValueError, match="max_len"):
        chat.encode_pair(example, max_len=1)


def test_encode_preferences_reports_skips_and_truncation(tokenizer):
    rows = [*CONVERSATION_ROWS, {**CONVERSATION_ROWS[0], "chosen": None}]
    pairs, report = encode_preferences(rows, tokenizer, max_len=30, max_prompt_len=20)
    assert len(pairs) == 2 and report.skipped == 1
    assert all(len(p.prompt_ids) <= 20 and len(p.prompt_ids) + len(p.chosen_ids) <= 30 for p in pairs)
    assert report.truncated_prompts == sum(p.prompt_truncated for p in pairs) > 0
    assert pairs[0].margin == 7.0


def test_encode_prompts_truncates_or_raises_naming_the_row(tokenizer):
    rows = [{"prompt": "Hi."}, {"prompt": "The quick brown fox jumps over the lazy dog."}]
    short, long = (ChatFormat(tokenizer).prompt_ids([user(row["prompt"])]) for row in rows)
    prompts, report = encode_prompts(rows, tokenizer, max_prompt_len=len(short))
    assert prompts[0].prompt_ids == short and not prompts[0].truncated
    assert len(prompts[1].prompt_ids) <= len(short) and prompts[1].truncated and report.truncated_prompts == 1
    assert prompts[1].prompt_ids[:3] == short[:3] and prompts[1].prompt_ids[-5:] == long[-5:]  # template kept
    assert prompts[1].messages == [user(rows[1]["prompt"])] and prompts[1].row == 1
    # What ppo train and eval print: the options to change, not this function's parameters.
    with pytest.raises(
        ValueError,
        match=rf"row 1 has {len(long)} prompt tokens, more than --max-prompt-len {len(short)} .*; "
        "raise --max-prompt-len or pass --long-prompts truncate",
    ):
        encode_prompts(rows, tokenizer, max_prompt_len=len(short), on_long_prompt="error")
    with pytest.raises(ValueError, match="on_long_prompt"):
        ChatFormat(tokenizer).encode_prompt(PromptExample([user("Hi.")]), on_long_prompt="drop")


# ------------------------------------------------------------------------------------------------
# Collation


def test_collate_preferences_aligns_responses():
    pairs = [
        EncodedPair([11, 12, 13], [21, 22, IM_END], True, [31, IM_END], True, margin=2.0),
        EncodedPair([14], [41, 42, 43, 44, 45], False, [51], False, margin=None),
    ]
    batch = collate_preferences(pairs, pad_token_id=0)
    assert isinstance(batch, PreferenceBatch) and batch.num_pairs == 2
    P, T = 3, 5
    assert batch.prompt_len == P and batch.input_ids.shape == (4, P + T)
    # Rows: chosen of both pairs, then rejected; prompts left-padded, responses right-padded.
    assert batch.input_ids.tolist() == [
        [11, 12, 13, 21, 22, IM_END, 0, 0],
        [0, 0, 14, 41, 42, 43, 44, 45],
        [11, 12, 13, 31, IM_END, 0, 0, 0],
        [0, 0, 14, 51, 0, 0, 0, 0],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
    ]
    assert batch.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5, 5, 5],
        [0, 0, 0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 4, 4, 4],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ]
    assert batch.response_mask.dtype == torch.bool and batch.response_mask.shape == (4, T)
    assert batch.response_mask.sum(1).tolist() == [3, 5, 2, 1]
    assert batch.has_eos.tolist() == [True, False, True, False]
    assert batch.margin.dtype == torch.float32 and batch.margin.tolist() == [2.0, 0.0]
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    assert batch.input_ids[:, P:][batch.response_mask].tolist() == sum(responses, [])
    assert torch.equal(batch.response_ids, batch.input_ids[:, P:])
    moved = batch.to("cpu")
    assert (
        isinstance(moved, PreferenceBatch)
        and moved.prompt_len == P
        and torch.equal(moved.margin, batch.margin)
    )


def test_collate_encoded_pairs_end_to_end(tokenizer):
    pairs, _ = encode_preferences(CONVERSATION_ROWS, tokenizer)
    batch = collate_preferences(pairs, tokenizer.pad_token_id)
    P = batch.prompt_len
    for row, (prompt, response) in enumerate(
        [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    ):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        assert ids == prompt + response
        assert batch.input_ids[row, P : P + len(response)].tolist() == response
        assert batch.input_ids[row, P + len(response) - 1].item() == IM_END


def test_collate_prompts_left_pads():
    batch = collate_prompts([[5, 6, 7], [8]], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


# ------------------------------------------------------------------------------------------------
# Loading and eval splits


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_load_rows_from_local_files(tmp_path, suffix):
    path = tmp_path / f"prefs{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, PROMPT_RESPONSE_ROWS[:1] * 3)
    elif suffix == ".json":
        path.write_text(json.dumps(PROMPT_RESPONSE_ROWS[:1] * 3))
    else:
        Dataset.from_list(PROMPT_RESPONSE_ROWS[:1] * 3).to_parquet(str(path))
    rows = load_rows(path, cache_dir=str(tmp_path / "cache"))
    assert len(rows) == 3 and rows[0] == PROMPT_RESPONSE_ROWS[0]
    assert len(load_rows(str(path), max_samples=2, cache_dir=str(tmp_path / "cache"))) == 2
    with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train'\]"):
        load_rows(path, split="test", cache_dir=str(tmp_path / "cache"))


def test_mixed_string_and_message_prompts_load_from_jsonl(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, PROMPT_ROWS)
    prompts, report = encode_prompts(load_rows(path, cache_dir=str(tmp_path / "cache")), tokenizer)
    assert report.kept == 2
    assert text(tokenizer, prompts[1].prompt_ids).startswith("<|im_start|>system\nYou are concise.<|im_end|>")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_rows("./no/such/folder")
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"rows.csv: unsupported file type '.csv'"):
        load_rows(tmp_path / "rows.csv")
    with pytest.raises(FileNotFoundError, match=r"holds no .*found \['rows.csv'\]"):
        load_rows(tmp_path)


def test_folder_splits_and_the_datasets_own_eval_split(tmp_path):
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"id": i, **PROMPT_RESPONSE_ROWS[0]} for i in range(6)])
    write_jsonl(folder / "test.jsonl", [{"id": 100 + i, **PROMPT_RESPONSE_ROWS[0]} for i in range(2)])
    splits = load_splits(folder, cache_dir=str(tmp_path / "cache"))
    train, held_out = split_train_eval(splits)
    assert train["id"] == list(range(6)) and held_out["id"] == [100, 101]
    assert len(load_rows(folder, split="test", cache_dir=str(tmp_path / "cache"))) == 2
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['test', 'train'\]"):
        load_rows(folder, split="validation", cache_dir=str(tmp_path / "cache"))
    # A split family keeps its suffix (UltraFeedback's train_prefs / test_prefs).
    family = DatasetDict(
        {
            name: Dataset.from_dict({"id": [i]})
            for i, name in enumerate(["test_sft", "train_prefs", "test_prefs"])
        }
    )
    assert split_train_eval(family, train_split="train_prefs")[1]["id"] == [2]


def test_folder_whose_splits_have_different_columns(tmp_path):
    # UltraFeedback-style test rows beside preference_700K-style train rows: datasets reads a folder
    # with one schema and fails; each split is read on its own instead.
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(
        folder / "train.jsonl", [{**PROMPT_RESPONSE_ROWS[0], "chosen_score": 9.0, "rejected_score": 2.0}]
    )
    write_jsonl(folder / "test.jsonl", [{**PROMPT_RESPONSE_ROWS[0], "source": "sharegpt"} for _ in range(2)])
    splits = load_splits(folder, cache_dir=str(tmp_path / "cache"))
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 1, "test": 2}
    assert "chosen_score" in splits["train"].column_names and "source" in splits["test"].column_names
    # Two files of one split that differ cannot be one table: one line naming the split.
    write_jsonl(folder / "test-extra.jsonl", [{"prompt": "Q?", "chosen": 1, "rejected": 2}])
    with pytest.raises(ValueError, match=r"prefs: the files of split 'test' cannot be read as one table"):
        load_splits(folder, cache_dir=str(tmp_path / "cache2"))


def test_row_numbers_stay_out_of_the_layout_and_its_errors():
    # Rows picked out of a split carry their numbers in a column of segppo's own, never shown.
    rows = Dataset.from_list([{"question": "q", "answer": "a"}] * 10)
    train, _ = split_train_eval(rows, eval_fraction=0.2)
    with pytest.raises(ValueError, match=r"The first row has keys \['answer', 'question'\];"):
        to_preference_examples(train)


def test_no_rows_at_all_is_said_so():
    # An empty file or split: not "no column ['chosen', 'rejected']. The first row has keys []".
    for convert, kind in ((to_preference_examples, "preference"), (to_prompt_examples, "prompt")):
        with pytest.raises(ValueError, match=f"^no usable {kind} rows: there are no rows at all"):
            convert(Dataset.from_list([]))


def test_held_out_rows_are_disjoint_from_training_rows():
    dataset = Dataset.from_dict({"id": list(range(200))})
    train, held_out = split_train_eval(dataset, eval_fraction=0.05, seed=3)
    assert len(held_out) == 10 and len(train) == 190
    assert set(train["id"]).isdisjoint(held_out["id"])
    assert set(train["id"]) | set(held_out["id"]) == set(range(200))
    assert split_train_eval(dataset, eval_fraction=0.05, seed=3)[1]["id"] == held_out["id"]
    assert split_train_eval(dataset, eval_fraction=0.05, seed=4)[1]["id"] != held_out["id"]
    # At least one row is held out, and a dataset without an eval split falls back to holding out.
    assert len(split_train_eval(Dataset.from_dict({"id": [1, 2, 3]}))[1]) == 1
    train, held_out = split_train_eval(DatasetDict({"train": dataset}), eval_fraction=0.01)
    assert len(held_out) == 2 and set(train["id"]).isdisjoint(held_out["id"])
    with pytest.raises(ValueError, match="no split 'dev'"):
        split_train_eval(DatasetDict({"train": dataset}), eval_split="dev")


# --- Fuzz: every row is used or counted in the skip report, with its reason and row ---------------

_GOOD_ROWS = {
    "prompt_response": {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
    "conversation": {
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}],
    },
    "hh": {"chosen": "\n\nHuman: Q?\n\nAssistant: yes", "rejected": "\n\nHuman: Q?\n\nAssistant: no"},
}
_MISSING = object()
_BAD_VALUES = [
    _MISSING, None, "", 0, 1.5, True, float("nan"), [], {}, [None], ["text"], [{"role": None}],
    [{"role": "user"}], [{"content": "x"}], [{"role": "user", "content": 5}],
    {"role": "user", "content": "x"},
]  # fmt: skip


@pytest.mark.parametrize("layout", sorted(_GOOD_ROWS))
@pytest.mark.parametrize("position", [0, 2])
def test_fuzz_malformed_rows_are_used_or_reported(layout, position):
    from segppo.data.layouts import to_preference_examples, to_prompt_examples

    good = _GOOD_ROWS[layout]
    for key in good:
        for value in _BAD_VALUES:
            bad = {k: v for k, v in good.items() if k != key}
            if value is not _MISSING:
                bad[key] = value
            rows = [dict(good) for _ in range(4)]
            rows.insert(position, bad)
            for convert in (to_preference_examples, to_prompt_examples):
                if convert is to_prompt_examples and layout == "prompt_response" and key != "prompt":
                    continue  # a prompt dataset reads only the prompt column
                examples, report = convert(rows)
                used = [e.row for e in examples]
                case = (layout, key, repr(value)[:40], convert.__name__)
                assert report.total == 5 and len(used) + report.skipped == 5, case
                assert used == [i for i in range(5) if i != position] or used == list(range(5)), case
                if position not in used:
                    assert report.reasons[0].startswith(f"row {position}: "), case


def test_fuzz_a_10_mb_response_is_used():
    from segppo.data.layouts import to_preference_examples

    big = {"prompt": "Q?", "chosen": "yes " * 2_500_000, "rejected": "no"}
    examples, report = to_preference_examples([_GOOD_ROWS["prompt_response"], big])
    assert [e.row for e in examples] == [0, 1] and report.skipped == 0


def _write_bad_jsonl(path) -> None:
    good = json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    lines = [
        good.encode(),
        b'{"prompt": "Q?", "chosen": "\xff\xfe", "rejected": "no"}',  # not UTF-8
        good.encode(),
        b"[1, 2]",  # not an object
        json.dumps({"prompt": "Q?", "chosen": ["not", "text"], "rejected": "no"}).encode(),  # odd type
        json.dumps({"prompt": "Q?", "chosen": "big " * 2_500_000, "rejected": "no"}).encode(),  # 10 MB
        good.encode()[:25],  # the last line, cut off by a kill
    ]
    path.write_bytes(b"\n".join(lines))


def test_fuzz_unreadable_jsonl_lines_are_counted_with_their_line(tmp_path):
    from segppo.data import load_splits
    from segppo.data.layouts import to_preference_examples

    _write_bad_jsonl(tmp_path / "bad.jsonl")
    rows = load_splits(tmp_path / "bad.jsonl")["train"]
    examples, report = to_preference_examples(rows)
    assert [e.row for e in examples] == [0, 2, 5]
    assert report.total == 7 and report.skipped == 4
    assert report.reasons == [
        "row 1: line 2: not UTF-8",
        "row 3: line 4: a JSON list, not an object",
        "row 4: line 5: column 'chosen' holds list, not str",
        "row 6: line 7: not JSON (Expecting ':' delimiter; the last line is cut off)",
    ]


def test_strict_turns_the_first_skip_into_an_error_naming_the_row(tmp_path):
    from segppo.data import load_splits
    from segppo.data.layouts import to_preference_examples

    _write_bad_jsonl(tmp_path / "bad.jsonl")
    rows = load_splits(tmp_path / "bad.jsonl")["train"]
    with pytest.raises(ValueError, match=r"^--strict: row 1 is malformed: line 2: not UTF-8$"):
        to_preference_examples(rows, LayoutOptions(strict=True))


def test_a_parquet_with_other_column_names_is_a_clear_error(tmp_path):
    from segppo.data import load_splits
    from segppo.data.layouts import to_preference_examples

    Dataset.from_list([{"question": "q", "good": "a", "bad": "b"}] * 3).to_parquet(tmp_path / "other.parquet")
    rows = load_splits(tmp_path / "other.parquet")["train"]
    with pytest.raises(ValueError, match=r"no column \['chosen', 'rejected'\].*chosen_key"):
        to_preference_examples(rows)
    examples, report = to_preference_examples(
        rows, LayoutOptions(prompt_key="question", chosen_key="good", rejected_key="bad")
    )
    assert len(examples) == 3 and report.skipped == 0
