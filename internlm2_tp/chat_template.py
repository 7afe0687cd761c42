"""Chat templates: the built-in InternLM2 one, or a Jinja template (the checkpoint's
`chat_template` in tokenizer_config.json, or a file named by `data.chat_template`).

A checkpoint's template is code from the checkpoint, so it runs only inside Jinja2's
ImmutableSandboxedEnvironment (as transformers does), with the same names transformers gives a
template: `messages`, `add_generation_prompt`, `tools`/`documents` (None here), the special
tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`, `additional_special_tokens`), and the
helpers `raise_exception`, `strftime_now` and the `tojson` filter. Any reach for Python internals
is refused: statically when the template is compiled (an attribute or key starting with `_`), and
at render time by the sandbox, which here raises instead of rendering an empty string. Either way
the error is a ChatTemplateError (exit 2) naming the template's file.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from internlm2_tp.errors import ChatTemplateError

AUTO, BUILTIN = "auto", "builtin"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def check_messages(messages: Any) -> list[Mapping]:
    """messages: a non-empty list of {'role': non-empty str, 'content': str} (ValueError naming
    the message otherwise; the caller names the row)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for idx, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{idx}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{idx}] is missing key {key!r}")
            if not isinstance(m[key], str):
                raise ValueError(f"messages[{idx}][{key!r}] must be a str, got {type(m[key]).__name__}")
        if not m["role"]:
            raise ValueError(f"messages[{idx}]['role'] must not be empty")
    return list(messages)


def render_builtin(messages: list[Mapping], bos_token: str, add_generation_prompt: bool) -> str:
    """The InternLM2 chat format: bos, '<|im_start|>{role}\\n{content}<|im_end|>\\n' per message,
    then '<|im_start|>assistant\\n' when a reply is asked for."""
    parts = [bos_token] + [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, strict: an unsafe attribute raises at once (Jinja's default renders
    it as an empty Undefined and only fails if the template goes on using it)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe")


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` without underscore names, so a template cannot store dunders on it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a namespace attribute may not start with '_' (got {name!r})")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which a prompt must not get.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       dict=lambda *a, **k: dict(*a, **k),   # the builtin, not the type
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def _private_reach(tree: nodes.Template) -> str | None:
    """The first attribute or constant key starting with '_' in the template, if any."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        else:   # attr('__x__') / map(attribute='__x__')
            consts = [a.value for a in node.args if isinstance(a, nodes.Const)]
            consts += [k.value.value for k in node.kwargs if isinstance(k.value, nodes.Const)]
            name = next((c for c in consts if isinstance(c, str) and c.startswith("_")), None)
        if isinstance(name, str) and name.startswith("_"):
            return name
    return None


@dataclass
class ChatTemplate:
    """A chat template ready to render; `source` names where it came from (a file, or
    'builtin')."""
    source: str
    text: str | None = None               # the Jinja source; None: the built-in template
    _compiled: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.text is None:
            return
        env = _environment()
        try:
            tree = env.parse(self.text)
            bad = _private_reach(tree)
            if bad is not None:
                raise SecurityError(f"it reaches for {bad!r} (Python internals)")
            self._compiled = env.from_string(tree)
        except TemplateError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise ChatTemplateError(f"chat template {self.source}{line}: refused: {e}") from None

    @property
    def is_builtin(self) -> bool:
        return self.text is None

    def render(self, messages: Any, special: Mapping[str, Any], add_generation_prompt: bool = True) -> str:
        """The prompt text. A bad conversation (or the template's own raise_exception) is a
        ValueError for that row; a sandbox violation is a ChatTemplateError for the job."""
        msgs = check_messages(messages)
        if self._compiled is None:
            return render_builtin(msgs, special["bos_token"], add_generation_prompt)
        try:
            return self._compiled.render(messages=[dict(m) for m in msgs], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **special)
        except SecurityError as e:
            raise ChatTemplateError(f"chat template {self.source}: refused: {e}") from None
        except TemplateError as e:
            raise ValueError(f"chat template {self.source}: {e}") from None


def load_chat_template(setting: str, config_template: Any, config_source: str) -> ChatTemplate:
    """`data.chat_template`: auto (the checkpoint's `chat_template`, read from `config_source`,
    else the built-in), builtin, or the path of a file holding a Jinja template."""
    if setting == BUILTIN or (setting == AUTO and config_template is None):
        return ChatTemplate(BUILTIN)
    if setting == AUTO:
        if isinstance(config_template, list):   # named templates: transformers' "default"
            named = {t.get("name"): t.get("template") for t in config_template if isinstance(t, Mapping)}
            config_template = named.get("default")
        if not isinstance(config_template, str) or not config_template.strip():
            raise ChatTemplateError(f"{config_source}: chat_template must be a non-empty string (or a "
                                    "list with a template named 'default'); set data.chat_template="
                                    "builtin to use the built-in InternLM2 template")
        return ChatTemplate(f"{config_source} (chat_template)", config_template)
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ChatTemplateError(f"data.chat_template={setting!r}: no such file (auto, builtin, or "
                                "the path of a Jinja template file)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"data.chat_template: cannot read {path}: {e}") from None
    return ChatTemplate(str(path), text)
