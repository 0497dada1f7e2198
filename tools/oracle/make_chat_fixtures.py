#!/usr/bin/env python3
"""Chat-template fixtures: conversations with tools and tool calls, rendered by transformers'
`apply_chat_template` with the chat template of the models `tandem init-model` writes.

`worker/tests/tokenizer.rs` renders the same conversations with Tandem's template engine
(minijinja, set up as transformers sets up Jinja2) and requires the same text. Only
transformers' tokenizer side is used: torch is not needed.

    cargo run --release -p tandem -- init-model --preset tiny --out /tmp/tandem-tiny
    tools/oracle/.venv/bin/python tools/oracle/make_chat_fixtures.py /tmp/tandem-tiny

writes `fixtures/chat_tools.json`: the template it rendered with, and for each case its
`messages` (OpenAI's shape; tool-call arguments as objects, as transformers expects them),
`tools`, `add_generation_prompt` and the rendered `text`.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import AutoTokenizer  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Le temps qu'il fait — in one city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}

CASES = [
    {
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER, ADD],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo and 2+3?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}},
                    {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": -3}"},
            {"role": "tool", "tool_call_id": "call_2", "content": "5"},
        ],
        "tools": [WEATHER, ADD],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "user", "content": "Add 1 and 1."},
            {
                "role": "assistant",
                "content": "Calling add.",
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}],
            },
        ],
        "tools": [ADD],
        "add_generation_prompt": False,
    },
    {
        "messages": [{"role": "system", "content": "No tools here."}, {"role": "user", "content": "Hi"}],
        "tools": None,
        "add_generation_prompt": True,
    },
]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    cases = []
    for case in CASES:
        text = tokenizer.apply_chat_template(
            case["messages"], tools=case["tools"], add_generation_prompt=case["add_generation_prompt"], tokenize=False
        )
        cases.append({**case, "text": text})
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "chat_tools.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"template": tokenizer.chat_template, "cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
