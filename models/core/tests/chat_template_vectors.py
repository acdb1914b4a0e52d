"""Writes data/chat_template_vectors.json: chat templates of the shapes real checkpoints ship,
rendered by transformers' own `render_jinja_template` (Jinja2 with trim_blocks, lstrip_blocks,
loopcontrols, its tojson/raise_exception/strftime_now) with the named special tokens as
variables, exactly as `tokenizer.apply_chat_template(..., tokenize=False)` calls it.

Run with transformers installed (bench/pytorch/run.sh's venv has it):
    target/bench-venv/bin/python models/core/tests/chat_template_vectors.py
The test chat_template.rs renders the same cases with kedit and compares the strings.
"""
import json
import pathlib

import jinja2
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

HERE = pathlib.Path(__file__).parent

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Llama 3.1's layout: a default date, tools as indented JSON, `| trim`, namespace-free.
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Block tags on their own lines: trim_blocks / lstrip_blocks decide the whitespace.
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}
"""

# DeepSeek-style: a namespace, split/startswith, break/continue, items(), tojson of a message.
NAMESPACED = """{% set ns = namespace(system='', count=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% set ns.system = message.content %}{% continue %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- if ns.count > 3 %}{% break %}{% endif %}
    {{- '<' ~ message.role|upper ~ '>' }}{{ message.content.split('\\n')[0] }}
    {%- if message.content.startswith('Why') %} (question){% endif %}
    {{- ' ' ~ (message | tojson) }}
    {%- for k, v in message.items() %}[{{ k }}={{ v|length }}]{% endfor %}
{% endfor %}
{{- 'system: ' ~ ns.system ~ ' | ' ~ add_generation_prompt ~ ' | ' ~ none ~ ' | ' ~ (unk_token is defined) }}
{{- {'a': [1, 2.5, none, true], 'é': 'x"y'} | tojson(separators=(',', ':'), sort_keys=true) }}
"""

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CHATGLM3 = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n "
    "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The two real templates: SmolLM2's (its GGUF's tokenizer.chat_template) and Qwen2.5's (as
# recorded in the shared fixture).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN25 = json.loads((HERE / "../../../../shared/fixtures/qwen2.5-coder-0.5b/expected.json").read_text())[
    "chat"]["chat_template"]

TEMPLATES = {
    "smollm2": SMOLLM2,
    "qwen25": QWEN25,
    "llama2": LLAMA2,
    "llama31": LLAMA31,
    "gemma": GEMMA,
    "zephyr": ZEPHYR,
    "namespaced": NAMESPACED,
    "phi3": PHI3,
    "chatglm3": CHATGLM3,
}

TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "multi": [
        {"role": "user", "content": "  Why is the sky blue?\nExplain briefly. "},
        {"role": "assistant", "content": "Rayleigh scattering: short wavelengths scatter more. "},
        {"role": "user", "content": "And sunsets — why red? \"quoted\"\ttab"},
    ],
    "system": [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
        {"role": "user", "content": "Ok"},
    ],
}


def main():
    cases = []
    for name, template in TEMPLATES.items():
        for conv_name, messages in CONVERSATIONS.items():
            for gen in (True, False):
                case = {"template": name, "conversation": conv_name, "add_generation_prompt": gen}
                try:
                    rendered, _ = render_jinja_template(
                        conversations=[messages], chat_template=template,
                        add_generation_prompt=gen, **TOKENS)
                    case["rendered"] = rendered[0]
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                cases.append(case)
    out = {
        "generator": "models/core/tests/chat_template_vectors.py",
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "special_tokens": TOKENS,
        "templates": TEMPLATES,
        "conversations": CONVERSATIONS,
        "cases": cases,
    }
    path = HERE / "data" / "chat_template_vectors.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases -> {path}")


if __name__ == "__main__":
    main()
