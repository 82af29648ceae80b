"""Jinja chat templates of the built-in families, written for megasft after the official templates'
rendering (same output for the same messages; tests compare against transformers rendering the
originals in ../shared/chat_templates where one is there). Registered in megasft.data.chat.families.

Differences from the originals, all of the "the original cannot render this" kind:
- tool-call ``arguments`` arrive as objects (megasft's schema parses JSON strings), so DeepSeek's
  template renders them with ``tojson`` where the original concatenates a string;
- Phi-3 / Phi-4 refuse a role they do not render (the originals drop such turns silently);
- where a template tracks tool calls across messages (Mistral's role-alternation check, gpt-oss's tool
  reply header), it also reads ``replaced_tool_calls``: the mask compiler replaces an assistant turn by a
  plain sentinel and keeps its calls there, so the template's own text around the turn stays the same.
"""

# Llama 3.1 / 3.2 / 3.3: dated system header, JSON tool calls ({"name", "parameters"}), ipython replies.
LLAMA3_1 = r"""{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if tools_in_user_message is not defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if date_string is not defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if tools is not defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set tool_rules = 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n' %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\nToday Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." + tool_rules }}
    {%- for t in tools %}{{- t | tojson(indent=4) + "\n\n" }}{%- endfor %}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- if tools_in_user_message and tools is not none %}
    {%- if messages | length == 0 %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n" + tool_rules }}
    {%- for t in tools %}{{- t | tojson(indent=4) + "\n\n" }}{%- endfor %}
    {{- messages[0].content | trim + "<|eot_id|>" }}
    {%- set messages = messages[1:] %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role in ('ipython', 'tool') %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}{#- strings too: replies are JSON-quoted #}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- elif message.tool_calls %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}
        {%- if builtin_tools is defined and call.name in builtin_tools %}
            {{- "<|python_tag|>" + call.name + ".call(" }}
            {%- for name, value in call.arguments | items %}{{- name + '="' + value + '"' }}{%- if not loop.last %}{{- ", " }}{%- endif %}{%- endfor %}
            {{- ")" }}
        {%- else %}
            {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + "}" }}
        {%- endif %}
        {{- "<|eom_id|>" if builtin_tools is defined else "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>" + message.role + "<|end_header_id|>\n\n" + message.content | trim + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}{%- endif %}"""

_QWEN_TOOLS = r"""{{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}{{- "\n" + tool | tojson }}{%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}"""

_QWEN_TOOL_REPLY = r"""{%- if loop.first or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + CONTENT + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\n' }}{%- endif %}"""

# Qwen2.5: ChatML with a default system prompt, tools in the system turn, <tool_call> blocks.
QWEN2_5 = r"""{%- set default_system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}
{%- set system = messages[0].content if messages[0].role == 'system' else default_system %}
{%- if tools %}
    {{- '<|im_start|>system\n' + system + '\n\n' }}
    """ + _QWEN_TOOLS + r"""
{%- else %}
    {{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for call in message.tool_calls %}
            {%- set call = call.function if call.function is defined else call %}
            {{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' + call.arguments | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        """ + _QWEN_TOOL_REPLY.replace("CONTENT", "message.content") + r"""
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

# Qwen3: reasoning (<think>) rendered only for assistant turns after the last user query; the last turn
# always gets a <think> block (empty without reasoning: the non-thinking form); enable_thinking=false at
# the generation prompt adds the empty block.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    """ + _QWEN_TOOLS + r"""
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- if not loop.first or content %}{{- '\n' }}{%- endif %}
            {%- set call = call.function if call.function else call %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        """ + _QWEN_TOOL_REPLY.replace("CONTENT", "content") + r"""
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""

_MISTRAL_TOOLS = r"""{%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {{- '"' + key + '": ' + ('"' + val + '"' if val is string else val | tojson) }}
                    {%- if not loop.last %}{{- ", " }}{%- endif %}
                {%- endfor %}
                {{- "}}" + (", " if not loop.last else "]") }}
            {%- endfor %}"""


def _mistral(sep: str) -> str:
    """Mistral v3 (``sep`` " ": "[INST] x[/INST] y</s>") or Tekken / Nemo (``sep`` "": "[INST]x[/INST]y</s>")."""
    return (r"""{%- if messages[0].role == "system" %}
    {%- set system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if tools is not defined %}{%- set tools = none %}{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace(index=0) %}
{%- for message in loop_messages %}
    {%- if not (message.role in ("tool", "tool_results") or message.tool_calls is not none and message.tool_calls is defined or message.replaced_tool_calls is defined) %}
        {%- if (message.role == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message.role == "user" %}
        {%- if tools is not none and message == user_messages[-1] %}
            {{- "[AVAILABLE_TOOLS]SEP[" }}
            """ + _MISTRAL_TOOLS + r"""
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]SEP" + system_message + "\n\n" + message.content + "[/INST]" }}
        {%- else %}
            {{- "[INST]SEP" + message.content + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS]SEP[" }}
        {%- for call in message.tool_calls %}
            {%- if call.id is not defined or call.id | length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- (call.function | tojson)[:-1] + ', "id": "' + call.id + '"}' }}
            {{- ", " if not loop.last else "]" + eos_token }}
        {%- endfor %}
    {%- elif message.role == "assistant" %}
        {{- "SEP" + message.content | trim + eos_token }}
    {%- elif message.role in ("tool", "tool_results") %}
        {%- if message.tool_call_id is not defined or message.tool_call_id | length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '[TOOL_RESULTS]SEP{"content": ' + message.content | string + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}""").replace("SEP", sep)


MISTRAL = _mistral(" ")
MISTRAL_TEKKEN = _mistral("")

# Gemma / Gemma 2: no system role, "model" for the assistant, content trimmed.
GEMMA = r"""{{- bos_token }}
{%- if messages[0].role == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}
{%- for message in messages %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\n' + message.content | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"""

# Gemma 3: as Gemma 2, a system prompt is prefixed to the first user turn.
GEMMA3 = r"""{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set first_user_prefix = messages[0].content + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {{- '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\n' + (first_user_prefix if loop.first else "") + message.content | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"""

# Phi-3 / Phi-3.5: <|role|>\n ... <|end|>\n; the eos closes a conversation rendered for training.
PHI3 = r"""{%- for message in messages %}
    {%- if message.role in ('system', 'user', 'assistant') %}
        {{- '<|' + message.role + '|>\n' + message.content + '<|end|>\n' }}
    {%- else %}
        {{- raise_exception("Phi-3 renders system, user and assistant turns only (the original drops " + message.role + " turns silently)") }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"""

# Phi-4: ChatML with <|im_sep|> after the role and no newlines.
PHI4 = r"""{%- for message in messages %}
    {%- if message.role in ('system', 'user', 'assistant') %}
        {{- '<|im_start|>' + message.role + '<|im_sep|>' + message.content + '<|im_end|>' }}
    {%- else %}
        {{- raise_exception("Phi-4 renders system, user and assistant turns only (the original drops " + message.role + " turns silently)") }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"""

# DeepSeek-V3 / R1: system prompts first, fullwidth role tokens, tool calls as ```json blocks, reasoning
# inline before </think> cut from every assistant turn, "<think>\n" opens a generated turn.
DEEPSEEK_V3 = r"""{%- set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}
{%- for message in messages if message.role == 'system' %}
    {%- set ns.system_prompt = ns.system_prompt + ('' if ns.is_first_sp else '\n\n') + message.content %}
    {%- set ns.is_first_sp = false %}
{%- endfor %}
{{- bos_token + ns.system_prompt }}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.is_tool = false %}
        {{- '<｜User｜>' + message.content }}
    {%- elif message.role == 'assistant' and 'tool_calls' in message %}
        {%- set ns.is_tool = false %}
        {%- for tool in message.tool_calls %}
            {%- set args = tool.function.arguments if tool.function.arguments is string else tool.function.arguments | tojson %}
            {%- set call = '<｜tool▁call▁begin｜>' + tool.type + '<｜tool▁sep｜>' + tool.function.name + '\n```json\n' + args + '\n```<｜tool▁call▁end｜>' %}
            {%- if not ns.is_first %}
                {{- '<｜Assistant｜>' + (message.content if message.content is not none else '') + '<｜tool▁calls▁begin｜>' + call }}
                {%- set ns.is_first = true %}
            {%- else %}
                {{- '\n' + call }}
            {%- endif %}
        {%- endfor %}
        {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}
    {%- elif message.role == 'assistant' %}
        {%- if ns.is_tool %}
            {{- '<｜tool▁outputs▁end｜>' + message.content + '<｜end▁of▁sentence｜>' }}
            {%- set ns.is_tool = false %}
        {%- else %}
            {{- '<｜Assistant｜>' + message.content.split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}
        {%- endif %}
    {%- elif message.role == 'tool' %}
        {%- set ns.is_tool = true %}
        {{- ('<｜tool▁outputs▁begin｜>' if ns.is_output_first else '') + '<｜tool▁output▁begin｜>' + message.content + '<｜tool▁output▁end｜>' }}
        {%- set ns.is_output_first = false %}
    {%- endif %}
{%- endfor %}
{%- if ns.is_tool %}{{- '<｜tool▁outputs▁end｜>' }}{%- endif %}
{%- if add_generation_prompt and not ns.is_tool %}{{- '<｜Assistant｜><think>\n' }}{%- endif %}"""

# gpt-oss (harmony): system header with the date and reasoning effort, developer instructions and tool
# namespace, reasoning in the analysis channel (kept for the final turn and for tool-call turns after the
# last user message), tool calls to=functions.NAME in the commentary channel ending <|call|>, the last
# assistant message ending <|return|>.
GPT_OSS = r"""{%- macro ts_type(p) -%}
    {%- if p.type == 'string' and p.enum is defined -%}{{- p.enum | map('tojson') | join(' | ') -}}
    {%- elif p.type == 'string' -%}string{%- elif p.type in ('integer', 'number') -%}number
    {%- elif p.type == 'boolean' -%}boolean{%- elif p.type == 'array' -%}{{- ts_type(p['items']) if p['items'] is defined else 'any' -}}[]
    {%- else -%}any{%- endif -%}
{%- endmacro -%}
{%- macro tool_namespace(tools) -%}
    {{- "## functions\n\nnamespace functions {\n\n" }}
    {%- for tool in tools %}
        {%- set tool = tool.function if tool.function is defined else tool %}
        {{- "// " + tool.description + "\n" if tool.description else "" }}
        {{- "type " + tool.name + " = " }}
        {%- set params = tool.parameters if tool.parameters is defined else {} %}
        {%- if params.properties %}
            {{- "(_: {\n" }}
            {%- for name, p in params.properties | items %}
                {{- "// " + p.description + "\n" if p.description else "" }}
                {{- name + ("" if name in (params.required or []) else "?") + ": " + ts_type(p) + ",\n" }}
            {%- endfor %}
            {{- "}) => any;\n\n" }}
        {%- else %}
            {{- "() => any;\n\n" }}
        {%- endif %}
    {%- endfor %}
    {{- "} // namespace functions" }}
{%- endmacro -%}
{{- "<|start|>system<|message|>" + (model_identity if model_identity is defined else "You are ChatGPT, a large language model trained by OpenAI.") + "\n" }}
{{- "Knowledge cutoff: 2024-06\nCurrent date: " + strftime_now("%Y-%m-%d") + "\n\n" }}
{{- "Reasoning: " + (reasoning_effort if reasoning_effort is defined else "medium") + "\n\n" }}
{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
{{- "\nCalls to these tools must go to the commentary channel: 'functions'." if tools else "" }}
{{- "<|end|>" }}
{%- if messages[0].role in ("developer", "system") %}
    {%- set developer_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if developer_message or tools %}
    {{- "<|start|>developer<|message|>" }}
    {{- "# Instructions\n\n" + developer_message + "\n\n" if developer_message else "" }}
    {{- "# Tools\n\n" + tool_namespace(tools) if tools else "" }}
    {{- "<|end|>" }}
{%- endif %}
{%- set ns = namespace(last_user=-1, last_call=none) %}
{%- for message in loop_messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in loop_messages %}
    {%- if message.role == 'assistant' %}
        {%- set calls = message.tool_calls or message.replaced_tool_calls %}
        {%- if message.tool_calls %}
            {%- set call = message.tool_calls[0].function %}
            {%- if message.content and message.thinking %}
                {{- raise_exception("Cannot pass both content and thinking in an assistant message with tool calls! Put the analysis message in one or the other, but not both.") }}
            {%- elif (message.content or message.thinking) and loop.index0 > ns.last_user %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + (message.content or message.thinking) + "<|end|>" }}
            {%- endif %}
            {{- "<|start|>assistant to=functions." + call.name + "<|channel|>commentary json<|message|>" + call.arguments | tojson + "<|call|>" }}
        {%- elif loop.last and not add_generation_prompt %}
            {%- if message.thinking %}{{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}{%- endif %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}
        {%- else %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
        {%- endif %}
        {%- if calls %}{%- set ns.last_call = calls[0].function.name %}{%- endif %}
    {%- elif message.role == 'tool' %}
        {%- if ns.last_call is none %}
            {{- raise_exception("Message has tool role, but there was no previous assistant message with a tool call!") }}
        {%- endif %}
        {{- "<|start|>functions." + ns.last_call + " to=assistant<|channel|>commentary<|message|>" + message.content + "<|end|>" }}
    {%- elif message.role == 'user' %}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|start|>assistant" }}{%- endif %}"""
