"""The tokenizer shipped in a checkpoint folder, with Mixtral-Instruct's chat template when it has none.

The demo repo copies the Mixtral-Instruct tokenizer files (the upstream ``mistralai/...`` repo is gated);
a checkpoint converted from a base Mixtral or an older tokenizer may carry no ``chat_template``. A chat
then still works: a Mixtral checkpoint without a template gets Mixtral-Instruct's own (the same text the
embedded model ships in ``chat_template.jinja``), and says so once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Mixtral-8x7B-Instruct-v0.1's template: [INST] user [/INST] answer</s>, roles alternating.
MIXTRAL_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class NoChatTemplateError(ValueError):
    """The tokenizer has no chat template (a base model's, or one converted without it): a chat cannot be
    formatted; plain-text continuation (``generate --raw``) still works."""


def load_tokenizer(path: str | os.PathLike, local_files_only: bool = False):
    """``AutoTokenizer`` from the checkpoint folder; a Mixtral one without a chat template gets Mixtral-Instruct's.

    A folder with no tokenizer file is refused (``FileNotFoundError`` naming it): transformers 5 would build
    an empty one-token tokenizer there, and the model would answer garbage."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy them from the model this checkpoint "
            "was converted from (convert copies them when the source has them)"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
    if not getattr(tok, "chat_template", None) and _model_type(path) == "mixtral":
        print(f"tokenizer: {path.name} has no chat template; using Mixtral-Instruct's [INST] template", file=sys.stderr)
        tok.chat_template = MIXTRAL_INSTRUCT_TEMPLATE
    return tok


def require_chat_template(tokenizer) -> None:
    """``NoChatTemplateError`` (one line, saying what still works) when the tokenizer cannot format a chat."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            "this model's tokenizer has no chat template (a base model, or converted without one), so a chat "
            "cannot be formatted; plain-text continuation works (python -m colab_helpers generate --raw), or set "
            "tokenizer.chat_template"
        )
