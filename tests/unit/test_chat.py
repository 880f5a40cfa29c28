"""Chat templates: mer renders and tokenizes exactly as transformers' apply_chat_template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mer.chat import ChatTemplateError, render_template
from mer.errors import MerError, ModelFormatError
from mer.tokenizer import Tokenizer
from tests.support.tokenizers import write_tokenizer

transformers = pytest.importorskip("transformers")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

STYLES = ("chatml", "llama")
USER = {"role": "user", "content": "What is the weather like today?"}
ASSISTANT = {"role": "assistant", "content": "It is sunny and warm. 😀"}
CONVERSATIONS = {
    "single": [USER],
    "system": [{"role": "system", "content": "You answer briefly."}, USER],
    "multi": [USER, ASSISTANT, {"role": "user", "content": "And tomorrow?\nTell me <s> more."}],
    "ends_assistant": [USER, ASSISTANT],
    "none_content": [USER, {"role": "assistant", "content": "ok", "tool_calls": None}],
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    for style in STYLES:
        write_tokenizer(root / style, style)
    return {style: root / style for style in STYLES}


@pytest.fixture(scope="module")
def pairs(dirs) -> dict[str, tuple[Tokenizer, object]]:
    auto = transformers.AutoTokenizer
    return {s: (Tokenizer.from_hf_dir(d), auto.from_pretrained(str(d))) for s, d in dirs.items()}


def _ref_ids(ref: object, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = ref.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(out if isinstance(out, list) else out["input_ids"])


# The Mixtral template rejects system messages (tested below), so llama skips that one.
CASES = [(s, n) for s in STYLES for n in sorted(CONVERSATIONS) if (s, n) != ("llama", "system")]


@pytest.mark.parametrize(("style", "name"), CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_and_encode_match_transformers(pairs, style, name, add_generation_prompt) -> None:
    ours, ref = pairs[style]
    messages = CONVERSATIONS[name]
    text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt)
    expected = ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    assert ours.encode_chat(messages, add_generation_prompt) == _ref_ids(
        ref, messages, add_generation_prompt
    )


def test_chatml_default_system_message(pairs) -> None:
    text = pairs["chatml"][0].render_chat([USER])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert pairs["llama"][0].encode_chat([USER])[0] == 1  # the template's <s>, once


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([USER, USER], "Conversation roles must alternate user/assistant/user/assistant/..."),
        ([ASSISTANT], "Conversation roles must alternate user/assistant/user/assistant/..."),
        ([{"role": "system", "content": "x"}], "Conversation roles must alternate"),
    ],
)
def test_llama_template_rejects_non_alternating_roles(pairs, messages, message) -> None:
    ours, ref = pairs["llama"]
    with pytest.raises(ChatTemplateError) as err:
        ours.render_chat(messages)
    assert isinstance(err.value, MerError)
    assert str(err.value).startswith(message)
    with pytest.raises(Exception) as ref_err:  # transformers raises jinja's TemplateError
        ref.apply_chat_template(messages, tokenize=False)
    assert str(err.value) == str(ref_err.value)


def test_missing_chat_template(dirs, tmp_path: Path) -> None:
    shutil.copytree(dirs["chatml"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(ModelFormatError, match="no chat template"):
        tok.render_chat([USER])
    with pytest.raises(ModelFormatError, match="no chat template"):
        tok.encode_chat([USER])


def test_template_list_and_jinja_file(dirs, tmp_path: Path) -> None:
    shutil.copytree(dirs["chatml"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "T{{ messages[0].content }}"},
        {"name": "default", "template": "D{{ messages[0].content }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_hf_dir(tmp_path).render_chat([USER]) == "D" + USER["content"]
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    expected = ref.apply_chat_template([USER], tokenize=False)
    assert Tokenizer.from_hf_dir(tmp_path).render_chat([USER]) == expected == "J" + USER["content"]


# Exercises the environment: trim/lstrip blocks, loop controls, tojson (no HTML escaping, kwargs),
# namespace, dict(), {% generation %}, extra variables, undefined tokens rendering as "".
ENV_TEMPLATE = """\
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
  [{{ ns.n }}] {{ m | tojson }} {{ m.content | tojson(indent=2) }}
    {% if m.role == 'assistant' %}{% generation %}<gen>{{ m.content }}</gen>{% endgeneration %}
    {% endif %}
    {% if loop.index == 3 %}{% break %}{% endif %}
{% endfor %}
{{ dict(a=1) | tojson(sort_keys=true) }} {{ tools }} {{ pad_token }}|{{ unk_token }}|{{ bos_token }}
{% if add_generation_prompt %}>>{% endif %}
"""
ENV_MESSAGES = [
    {"role": "user", "content": '<b>&"é"</b>'},
    {"role": "skip", "content": "x"},
    {"role": "assistant", "content": "a\nb", "reasoning": "hmm"},
    {"role": "user", "content": "last"},
    {"role": "user", "content": "never"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_environment_matches_transformers(add_generation_prompt: bool) -> None:
    ours = render_template(
        ENV_TEMPLATE,
        ENV_MESSAGES,
        bos_token=None,
        eos_token="</s>",
        add_generation_prompt=add_generation_prompt,
        pad_token="<pad>",
    )
    ref, _ = render_jinja_template(
        [ENV_MESSAGES],
        chat_template=ENV_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
        eos_token="</s>",
        pad_token="<pad>",
    )
    assert ours == ref[0]
    assert '"<b>&\\"é\\"</b>"' in ours and "<gen>a\nb</gen>" in ours


def test_strftime_now_and_raise_exception() -> None:
    out = render_template(
        "{{ strftime_now('%Y') }}",
        [USER],
        bos_token=None,
        eos_token=None,
        add_generation_prompt=False,
    )
    assert out.isdigit() and len(out) == 4
    with pytest.raises(ChatTemplateError, match=r"^custom failure: 42$"):
        render_template(
            "{{ raise_exception('custom failure: ' ~ 42) }}",
            [USER],
            bos_token=None,
            eos_token=None,
            add_generation_prompt=False,
        )


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content }",  # syntax error
        "{{ messages[0].content + 1 }}",  # TypeError inside the template
        "{% set ns = namespace(_x=1) %}",  # underscore attribute on a namespace
        "{{ messages.__class__.__mro__ }}",  # sandbox escape attempt
        "{{ messages.append(1) }}",  # immutable sandbox
    ],
)
def test_template_errors_are_one_line(template: str) -> None:
    with pytest.raises(ChatTemplateError) as err:
        render_template(
            template, [USER], bos_token=None, eos_token=None, add_generation_prompt=True
        )
    assert "\n" not in str(err.value) and str(err.value)


def test_messages_are_not_modified() -> None:
    messages = [{"role": "user", "content": "x", "reasoning_content": "r", "extra": None}]
    snapshot = json.dumps(messages)
    render_template(
        "{{ messages[0].thinking }}",
        messages,
        bos_token=None,
        eos_token=None,
        add_generation_prompt=True,
    )
    assert json.dumps(messages) == snapshot


def test_none_values_are_dropped_like_transformers(pairs) -> None:
    # OpenAI clients send content=None with tool calls; templates test for a missing key.
    template = (
        "{% for m in messages %}{{ m.content if m.content is defined else '-' }};{% endfor %}"
    )
    messages = [USER, {"role": "assistant", "content": None}]
    ours = render_template(
        template, messages, bos_token=None, eos_token=None, add_generation_prompt=False
    )
    ref = pairs["chatml"][1].apply_chat_template(messages, chat_template=template, tokenize=False)
    assert ours == ref == USER["content"] + ";-;"


# How Qwen3's templates treat their thinking flag (the part of them that reads it): the
# generation prompt gets an empty think block when thinking is off.
THINKING_TEMPLATE = """\
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{%- if enable_thinking is defined and enable_thinking is false %}
<think>

</think>

{%- endif %}
{% endif %}"""


@pytest.mark.parametrize("kwargs", [None, {"enable_thinking": False}, {"enable_thinking": True}])
def test_template_kwargs_such_as_qwen3s_thinking_flag(dirs, tmp_path: Path, kwargs) -> None:
    shutil.copytree(dirs["chatml"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_hf_dir(tmp_path)
    expected = ref.apply_chat_template(
        [USER], tokenize=False, add_generation_prompt=True, **(kwargs or {})
    )
    text = ours.render_chat([USER], template_kwargs=kwargs)
    assert text == expected
    assert ("<think>" in text) == (kwargs == {"enable_thinking": False})
    assert ours.encode_chat([USER], template_kwargs=kwargs) == ours.encode(expected, False)


# Conversations for the templates models ship, in the shapes their templates read: a system
# message, earlier turns with reasoning (Qwen3's reasoning_content, gpt-oss's thinking)
SHIPPED = [
    {"role": "system", "content": "You answer briefly."},
    USER,
    {
        "role": "assistant",
        "content": "Sunny.",
        "reasoning_content": "Look it up.",
        "thinking": "Look it up.",
    },
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.mark.parametrize(
    "name,kwargs,needles",
    [
        ("Qwen-Qwen3-0.6B", {}, ["<|im_start|>assistant\n"]),
        ("Qwen-Qwen3-0.6B", {"enable_thinking": False}, ["<think>\n\n</think>\n\n"]),
        ("openai-gpt-oss-120b", {}, ["<|start|>assistant", "Reasoning: medium"]),
        ("openai-gpt-oss-120b", {"reasoning_effort": "high"}, ["Reasoning: high"]),
    ],
)
def test_templates_models_ship(pairs, request, name, kwargs, needles) -> None:
    """Qwen3's template with its thinking flag and gpt-oss's harmony template (as their
    repositories ship them; llama.cpp's sources keep copies) render as transformers renders
    them, through the template variables a request passes."""
    from tests.support import llamacpp

    cache = Path(request.config.cache.mkdir("llama-cpp-src"))
    template = llamacpp.chat_template(cache, name)
    ours, ref = pairs["chatml"]
    for messages in ([USER], SHIPPED):
        text = render_template(
            template,
            messages,
            bos_token=None,
            eos_token=None,
            add_generation_prompt=True,
            **kwargs,
        )
        expected = ref.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs
        )
        assert text == expected
        assert all(n in text for n in needles), text
