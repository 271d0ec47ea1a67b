"""Chat templates and tokenizers shipped inside an artifact (copied from the checkpoint folder, or Qwen3's
own for presets: tokenizer_files.py).

The template is the checkpoint's own Jinja text (tokenizer_config.json "chat_template" or
chat_template.jinja), rendered in a sandbox with the globals transformers provides.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .artifact import Artifact
from .errors import ArtifactError, InputError


def load_tokenizer(artifact: Artifact):
    if not artifact.has("tokenizer.json"):
        raise InputError(f"artifact {artifact.path.name} has no tokenizer.json (its vocabulary is not Qwen3's and "
                         "its checkpoint had none): use --prompt-ids, or build from a checkpoint folder with a "
                         "tokenizer")
    return Tokenizer.from_file(str(artifact.file("tokenizer.json")))


def chat_template(artifact: Artifact) -> str:
    if artifact.has("chat_template.jinja"):
        return artifact.file("chat_template.jinja").read_text()
    if artifact.has("tokenizer_config.json"):
        template = json.loads(artifact.file("tokenizer_config.json").read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    raise InputError(f"artifact {artifact.path.name} has no chat template (tokenizer_config.json "
                     "'chat_template' or chat_template.jinja): use --prompt-ids")


def render_chat(artifact: Artifact, messages: list[dict[str, Any]], enable_thinking: bool) -> str:
    def raise_exception(message: str):
        raise InputError(f"chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                  ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(chat_template(artifact))
        return template.render(messages=messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    except jinja2.TemplateError as e:
        raise ArtifactError(f"the artifact's chat template cannot be rendered ({e}); rebuild from a checkpoint "
                            "with a valid template") from None
