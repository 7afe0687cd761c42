"""chat_template.py: the checkpoint's Jinja chat template, rendered in a sandbox, against the
built-in InternLM2 one; data.chat_template=auto|builtin|PATH; templates that reach for Python
internals or do not parse are refused naming their file (exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from internlm2_tp.chat_template import ChatTemplate, load_chat_template
from internlm2_tp.engine.params import SamplingParams
from internlm2_tp.errors import EXIT_BAD_INPUT, ChatTemplateError
from internlm2_tp.runtime.data.input_types import InputRow
from internlm2_tp.runtime.data.output import OutputRow
from internlm2_tp.runtime.data.rows import to_request
from internlm2_tp.testing.tokenizer_files import CHAT_TEMPLATE, write_tokenizer_files
from internlm2_tp.tokenizer import Tokenizer

# The `chat_template` of internlm/internlm2-chat-7b's tokenizer_config.json as published on the
# Hugging Face Hub (https://huggingface.co/internlm/internlm2-chat-7b/blob/main/tokenizer_config.json;
# the same string appears in the InternLM2 tokenizer_config.json quoted by conversion tooling in
# the public code index). Kept byte for byte, the JSON "\n" escapes as real newlines.
PUBLISHED = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' "
             "+ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = {
    "single turn": [{"role": "user", "content": "Where is the Louvre?"}],
    "system prompt": [{"role": "system", "content": "You are InternLM (书生·浦语), be brief."},
                      {"role": "user", "content": "请用一句话介绍上海。"}],
    "multi turn": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi 🙂"},
                   {"role": "assistant", "content": "hello\n"}, {"role": "user", "content": " again"}],
}


def test_tiny_checkpoints_carry_the_published_template():
    assert CHAT_TEMPLATE == PUBLISHED


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real tokenizer when present, else the stand-in, with a checkpoint's config."""
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return d


def with_template(src: Path, dst: Path, template) -> Path:
    """A copy of the tokenizer directory whose tokenizer_config.json carries `template`."""
    dst.mkdir()
    (dst / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_published_template_renders_as_the_builtin(tok_dir, tmp_path, case, generation_prompt):
    ckpt = with_template(tok_dir, tmp_path / "published", PUBLISHED)
    published = Tokenizer.from_dir(ckpt)                      # auto: the checkpoint's
    builtin = Tokenizer.from_dir(ckpt, chat_template="builtin")
    assert not published.chat_template.is_builtin and builtin.chat_template.is_builtin
    msgs = CONVERSATIONS[case]
    text = published.render_chat(msgs, generation_prompt)
    assert text == builtin.render_chat(msgs, generation_prompt)
    assert text.startswith("<s><|im_start|>") and text.endswith(
        "<|im_start|>assistant\n" if generation_prompt else "<|im_end|>\n")
    ids = published.apply_chat_template(msgs, generation_prompt)
    assert ids == builtin.apply_chat_template(msgs, generation_prompt)
    assert ids[0] == builtin.bos_id and ids.count(builtin.special_tokens["<|im_start|>"]) == \
        len(msgs) + generation_prompt


def test_matches_transformers_rendering(tok_dir):
    """Our sandbox gives a template what transformers gives it (whitespace control, the special
    tokens, loop controls, namespace, tojson, raise_exception)."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    tricky = ("{%- set ns = namespace(n=0) -%}\n{% for m in messages %}\n  {% if m.role == 'system' %}"
              "{% continue %}{% endif %}\n  {% set ns.n = ns.n + 1 %}\n{{ bos_token ~ ns.n ~ ':' ~ "
              "m.content | tojson }}\n{% endfor %}{{ eos_token }}{{ pad_token }}{{ unk_token }}"
              "{% if add_generation_prompt %}>{% endif %}")
    special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
                   additional_special_tokens=["<|im_start|>"])
    for template in (PUBLISHED, tricky):
        for msgs in CONVERSATIONS.values():
            theirs = utils.render_jinja_template([msgs], chat_template=template,
                                                 add_generation_prompt=True, **special)[0][0]
            assert ChatTemplate("t", template).render(msgs, special) == theirs


def test_checkpoint_builtin_and_file_settings(tok_dir, tmp_path):
    ckpt = with_template(tok_dir, tmp_path / "ft", "{{ bos_token }}FT:{{ messages[-1]['content'] }}")
    msgs = [{"role": "user", "content": "q"}]
    assert Tokenizer.from_dir(ckpt).render_chat(msgs) == "<s>FT:q"            # a fine-tune's own
    assert Tokenizer.from_dir(ckpt, "builtin").render_chat(msgs) == \
        "<s><|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    f = tmp_path / "mine.jinja"
    f.write_text("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert Tokenizer.from_dir(ckpt, str(f)).render_chat(msgs) == "<s>[user]q"
    named = with_template(tok_dir, tmp_path / "named", [{"name": "tool_use", "template": "T"},
                                                         {"name": "default", "template": "D"}])
    assert Tokenizer.from_dir(named).render_chat(msgs) == "D"
    nothing = with_template(tok_dir, tmp_path / "none", None)
    assert Tokenizer.from_dir(nothing).chat_template.is_builtin              # auto without one
    with pytest.raises(ChatTemplateError, match="nope.jinja'.*no such file"):
        Tokenizer.from_dir(ckpt, str(tmp_path / "nope.jinja"))


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''['__class__'] }}",
    "{{ ''|attr('__class__') }}",
    "{% for m in messages %}{{ m.__class__ }}{% endfor %}",
    "{{ (messages|map(attribute='__class__')|list) }}",
]
# Built at render time, out of the static check's sight: the sandbox itself must refuse.
DYNAMIC = ["{{ ''[('_' * 2) ~ 'class' ~ ('_' * 2)] }}",
           "{{ joiner|attr('_' ~ '_init_' ~ '_') }}",
           "{% set ns = namespace() %}{% set ns['_' ~ 'x'] = 1 %}{{ ns }}"]


@pytest.mark.parametrize("template", ESCAPES + DYNAMIC)
@pytest.mark.parametrize("where", ["file", "checkpoint"])
def test_reaching_python_internals_is_refused_naming_the_file(tok_dir, tmp_path, template, where):
    msgs = [{"role": "user", "content": "hi"}]
    if where == "file":
        f = tmp_path / "evil.jinja"
        f.write_text(template)
        args, needle = (tok_dir, str(f)), "evil.jinja"
    else:
        args, needle = (with_template(tok_dir, tmp_path / "evil", template),), "tokenizer_config.json"
    with pytest.raises(ChatTemplateError, match=needle) as err:   # at load, or at the first render
        Tokenizer.from_dir(*args).render_chat(msgs)
    assert err.value.exit_code == EXIT_BAD_INPUT and "refused" in str(err.value)
    if template in ESCAPES:   # the static check: before any row is read
        with pytest.raises(ChatTemplateError, match=needle):
            Tokenizer.from_dir(*args)


def test_syntax_error_names_the_file_and_line(tok_dir, tmp_path):
    f = tmp_path / "broken.jinja"
    f.write_text("{{ bos_token }}\n{% for m in messages %}{{ m.content }}")   # no endfor
    with pytest.raises(ChatTemplateError, match=r"broken\.jinja \(line \d+\)"):
        Tokenizer.from_dir(tok_dir, str(f))
    with pytest.raises(ChatTemplateError, match="chat_template must be a non-empty string"):
        Tokenizer.from_dir(with_template(tok_dir, tmp_path / "num", 42))


def test_template_raise_exception_fails_only_that_row(tok_dir, tmp_path):
    ckpt = with_template(tok_dir, tmp_path / "strict", "{% if messages[0].role != 'user' %}"
                         "{{ raise_exception('the first message must be the user\\'s') }}{% endif %}"
                         "{{ bos_token }}{{ messages[0].content }}")
    tok = Tokenizer.from_dir(ckpt)
    base = SamplingParams(max_new_tokens=4)
    bad = to_request(InputRow(7, None, [{"role": "system", "content": "x"}], None, {}, None), tok,
                     base, tok.vocab_size)
    assert isinstance(bad, list) and len(bad) == 1      # one error row per sample (n=1)
    bad = bad[0]
    assert isinstance(bad, OutputRow) and bad.finish_reason == "error"
    assert "row id 7" in bad.error and "the first message must be the user's" in bad.error
    good = to_request(InputRow(8, None, [{"role": "user", "content": "x"}], None, {}, None), tok,
                      base, tok.vocab_size)
    assert good.prompt_ids == tok.encode("<s>x", add_bos=False)


def test_load_chat_template_builtin_when_asked():
    assert load_chat_template("builtin", "{{ oops", "cfg.json").is_builtin   # not even compiled


@pytest.mark.slow   # runs the job in-process (one CPU rank)
def test_job_refuses_a_bad_template_before_work_and_records_the_setting(make_ckpt, tmp_path, capsys):
    from _job import job_args, read_out, run_job, write_prompts

    ckpt = make_ckpt(dtype="float32")
    data = write_prompts(tmp_path / "in.parquet", 6)
    out = tmp_path / "out"
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ cycler.__init__.__globals__ }}")
    rc, err = run_job(job_args(ckpt, data, out, f"data.chat_template={evil}"), capsys)
    assert rc == EXIT_BAD_INPUT and "evil.jinja" in err and "refused" in err, err
    assert not out.exists()                                  # before the output dir, before ranks
    rc, err = run_job(job_args(ckpt, data, out, "data.chat_template=builtin"), capsys)
    assert rc == 0 and len(read_out(out)) == 6, err
    mine = tmp_path / "mine.jinja"
    mine.write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    rc, err = run_job(job_args(ckpt, data, out, f"data.chat_template={mine}"), capsys)
    assert rc == EXIT_BAD_INPUT and "chat_template" in err, err   # other prompts: not a resume
