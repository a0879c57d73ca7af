"""The chat templates a merge config may name (`chat_template = "chatml"`), as mergekit 0.1.5 offers them.

Each is written here for mergebot: the prompt format its model family uses, with whitespace control on every tag so
the text comes out the same whether or not the renderer trims blocks (transformers does).
"""

ALPACA = r"""
{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}
{%- set headings = {'user': 'Instruction', 'user_context': 'Input', 'assistant': 'Response'} -%}
{%- set text = namespace(value=system[-1].content | trim if system else '') -%}
{%- for message in messages if message.role in headings -%}
    {%- set section = '### ' ~ headings[message.role] ~ ':\n' ~ message.content | trim -%}
    {%- set text.value = text.value ~ ('\n\n' if text.value else '') ~ section -%}
{%- endfor -%}
{%- if add_generation_prompt and messages and messages[-1].role != 'assistant' -%}
    {%- set text.value = text.value ~ ('\n\n' if text.value else '') ~ '### Response:\n' -%}
{%- endif -%}
{{- text.value -}}
"""

CHATML = r"""
{%- for message in messages -%}
    {{- '<|im_start|>' ~ message.role ~ '\n' ~ message.content ~ '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

EXAONE = r"""
{%- if messages and messages[0].role != 'system' -%}
    {{- '[|system|][|endofturn|]\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {{- '[|' ~ message.role ~ '|]' ~ message.content -}}
    {{- '\n' if message.role == 'user' else '[|endofturn|]\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '[|assistant|]' -}}
{%- endif -%}
"""

LLAMA3 = r"""
{%- for message in messages -%}
    {{- bos_token if loop.first else '' -}}
    {{- '<|start_header_id|>' ~ message.role ~ '<|end_header_id|>\n\n' ~ message.content | trim ~ '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

MISTRAL = r"""
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- set turns = messages[1:] if has_system else messages -%}
{{- bos_token -}}
{%- for message in turns -%}
    {%- if message.role != ('user' if loop.index0 is even else 'assistant') -%}
        {{- raise_exception('mistral: after an optional system message, roles must alternate user, assistant, ...') -}}
    {%- endif -%}
    {%- if message.role == 'user' -%}
        {%- set prefix = messages[0].content ~ '\n\n' if loop.first and has_system else '' -%}
        {{- ' [INST] ' ~ prefix ~ message.content ~ ' [/INST]' -}}
    {%- else -%}
        {{- ' ' ~ message.content ~ eos_token -}}
    {%- endif -%}
{%- endfor -%}
"""

CHAT_TEMPLATES = {
    "alpaca": ALPACA.strip(),
    "chatml": CHATML.strip(),
    "exaone": EXAONE.strip(),
    "llama3": LLAMA3.strip(),
    "mistral": MISTRAL.strip(),
}
"""Name → Jinja text, for the names mergekit knows."""
