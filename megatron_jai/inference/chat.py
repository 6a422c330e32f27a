"""Chat prompts: the tokenizer's chat template (``tokenizer_config.json`` ``chat_template`` or
``chat_template.jinja``, rendered with jinja2 as ``transformers`` does), Phi-3's when it has none,
and encoding that turns the special-token strings of the rendered text into their ids."""
from __future__ import annotations

import json
import os
import re
from typing import List, Sequence

from megatron_jai.cli import UserError
from megatron_jai.data.hf_tokenizer import PHI3_CHAT_TEMPLATE

def _tokenizer_dir(tokenizer) -> str:
    path = tokenizer.path
    return path if os.path.isdir(path) else os.path.dirname(path)


def chat_template(tokenizer) -> str:
    """The chat template stored with the tokenizer, else Phi-3's."""
    directory = _tokenizer_dir(tokenizer)
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    config = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return PHI3_CHAT_TEMPLATE


def _token_name(tokenizer, which: str, default: str) -> str:
    config = os.path.join(_tokenizer_dir(tokenizer), "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            value = json.load(f).get(which)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return default


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise UserError("chat messages must be {'role': str, 'content': str} objects")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        template = env.from_string(chat_template(tokenizer))
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=_token_name(tokenizer, "bos_token", "<s>"),
                               eos_token=_token_name(tokenizer, "eos_token", "<|endoftext|>"))
    except jinja2.TemplateError as err:
        raise UserError(f"the chat template of {tokenizer.path} fails: {err}") from None


def encode_with_specials(tokenizer, text: str) -> List[int]:
    """Encode ``text`` with every special-token string in it as its id (tokenizers that keep them as
    text, like the Phi-3 sentencepiece layout, otherwise split them into pieces)."""
    specials = {t: i for t, i in tokenizer.special_tokens.items() if t}
    if not specials:
        return tokenizer.encode(text)
    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")
    ids: List[int] = []
    for part in pattern.split(text):
        if part in specials:
            ids.append(int(specials[part]))
        elif part:
            ids.extend(tokenizer.encode(part))
    return ids


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> List[int]:
    """Token ids of the conversation with the assistant's turn opened."""
    return encode_with_specials(tokenizer, render_chat(tokenizer, messages))
