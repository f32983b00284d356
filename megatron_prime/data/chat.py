"""Turn a prompt (chat messages or a plain string) into the text the policy continues."""

from __future__ import annotations

from typing import Any

_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, prompt: list[dict[str, str]] | str) -> str:
    """The tokenizer's own chat template with the generation prompt appended, when it has one.
    Without a template: a plain string is used as is (the toy task), and chat messages become
    "Role: content" paragraphs followed by "Assistant:"."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, str):
        return prompt
    parts = [f"{_ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in prompt]
    return "\n\n".join(parts + ["Assistant:"])
