"""Bad request parameters and the `param` each 400 must name (hardening checklist, "Parameters" row).

Shared by the unit test (validation alone) and the integration test (the live server, each bad
request followed by a good one). `param` None marks cases only the server can judge (they need the
vocabulary or the context length); the integration table gives their param.
"""

from __future__ import annotations

from typing import Any

_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def _deep_schema(levels: int) -> dict[str, Any]:
    """A schema nested deeper than the server allows (deep nesting also exhausts some checkers)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


BAD_CHAT_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("n_huge", {"n": 10**9}, "n"),
    ("n_zero", {"n": 0}, "n"),
    ("n_negative", {"n": -1}, "n"),
    ("max_tokens_negative", {"max_tokens": -1}, "max_tokens"),
    ("max_tokens_zero", {"max_tokens": 0}, "max_tokens"),
    ("max_completion_tokens_zero", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("max_tokens_string", {"max_tokens": "many"}, "max_tokens"),
    ("top_logprobs_over_20", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs_without_logprobs", {"top_logprobs": 3}, "top_logprobs"),
    ("top_logprobs_negative", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("logit_bias_word_key", {"logit_bias": {"hello": 1}}, "logit_bias"),
    ("logit_bias_negative_key", {"logit_bias": {"-5": 1}}, "logit_bias"),
    ("logit_bias_value_over_100", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("logit_bias_value_not_number", {"logit_bias": {"5": "up"}}, "logit_bias"),
    ("logit_bias_too_many", {"logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
    ("stop_10000_strings", {"stop": ["x"] * 10_000}, "stop"),
    ("stop_1mb_string", {"stop": "x" * 1_000_000}, "stop"),
    ("stop_empty_string", {"stop": [""]}, "stop"),
    ("temperature_nan", {"temperature": float("nan")}, "temperature"),
    ("top_p_zero", {"top_p": 0}, "top_p"),
    ("top_k_below_minus_one", {"top_k": -2}, "top_k"),
    ("min_p_over_one", {"min_p": 1.5}, "min_p"),
    ("presence_penalty_over_2", {"presence_penalty": 3}, "presence_penalty"),
    ("frequency_penalty_under_minus_2", {"frequency_penalty": -3}, "frequency_penalty"),
    ("repetition_penalty_zero", {"repetition_penalty": 0}, "repetition_penalty"),
    ("seed_over_int64", {"seed": 2**64}, "seed"),
    ("stream_options_without_stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("response_format_unknown_type", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("json_schema_without_json_schema", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        "json_schema_without_schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format.json_schema.schema",
    ),
    (
        "json_schema_malformed",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}},
        "response_format.json_schema.schema",
    ),
    (
        "json_schema_not_an_object",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "string"}}},
        "response_format.json_schema.schema",
    ),
    (
        "json_schema_too_deep",
        {"response_format": {"type": "json_schema", "json_schema": {"schema": _deep_schema(80)}}},
        "response_format.json_schema.schema",
    ),
    ("tools_empty", {"tools": []}, "tools"),
    ("tools_not_a_list", {"tools": {"name": "f"}}, "tools"),
    ("tool_without_function", {"tools": [{"type": "function"}]}, "tools[0].function"),
    ("tool_bad_name", {"tools": [{"type": "function", "function": {"name": "no spaces!"}}]}, "tools[0].function.name"),
    (
        "tool_parameters_malformed",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}]},
        "tools[0].function.parameters",
    ),
    (
        "tool_parameters_bad_type",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
        "tools[0].function.parameters",
    ),
    (
        "tool_parameters_not_an_object_schema",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools[0].function.parameters",
    ),
    (
        "tool_parameters_bad_regex",
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}},
                    },
                }
            ]
        },
        "tools[0].function.parameters",
    ),
    ("tool_names_repeated", {"tools": [_TOOL, _TOOL]}, "tools"),
    ("tool_choice_without_tools", {"tool_choice": "required"}, "tool_choice"),
    ("tool_choice_unknown_mode", {"tools": [_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    (
        "tool_choice_unknown_function",
        {"tools": [_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("unknown_field", {"max_token": 5}, "max_token"),
    ("vllm_only_field", {"chat_template": "{{ evil }}"}, "chat_template"),
    ("deprecated_functions", {"functions": [{"name": "f"}]}, "functions"),
]

# Judged by the server (vocabulary size, context length); (name, extra fields, param).
BAD_CHAT_FIELDS_SERVER_ONLY: list[tuple[str, dict[str, Any], str]] = [
    ("max_tokens_10_12", {"max_tokens": 10**12}, "max_tokens"),
    ("max_completion_tokens_over_context", {"max_completion_tokens": 8192}, "max_completion_tokens"),
    ("prompt_plus_max_tokens_over_context", {"max_tokens": 8190}, "messages"),
    ("logit_bias_out_of_vocabulary", {"logit_bias": {"999999999": 5}}, "logit_bias"),
    ("stop_token_ids_out_of_vocabulary", {"stop_token_ids": [10**8]}, "stop_token_ids"),
    ("min_tokens_over_max_tokens", {"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    (
        "response_format_with_required_tool",
        {"tools": [_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),
]

BAD_COMPLETION_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("prompt_empty_list", {"prompt": []}, "prompt"),
    ("prompt_negative_token", {"prompt": [1, -2]}, "prompt[1]"),
    ("prompt_batch_too_big", {"prompt": ["x"] * 100}, "prompt"),
    ("logprobs_over_20", {"logprobs": 21}, "logprobs"),
    ("best_of_not_n", {"best_of": 3}, "best_of"),
    ("suffix", {"suffix": "end"}, "suffix"),
    ("echo_not_bool", {"echo": "yes please"}, "echo"),
    ("unknown_field", {"promt": "typo"}, "promt"),
]
