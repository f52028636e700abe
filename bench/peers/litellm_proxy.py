"""The LiteLLM proxy, offline, in front of Triton: run by the peer venv's Python.

    <peer venv>/bin/python bench/peers/litellm_proxy.py TEMPLATE_FILE --config CONFIG --port PORT

Started by bench/peers_bench.py. LiteLLM's `triton` provider renders the chat
with `prompt_factory`, which for a model it does not know fetches the
tokenizer config (and its chat template) from the Hugging Face hub, and on any
failure silently falls back to a generic prompt. Seeding its tokenizer-config
cache with the served model's own template (TEMPLATE_FILE, what meshgate's
inference service renders) keeps it offline and sends Triton the same prompt
on both paths; the benchmark checks that the two renderings match.
"""

import os
import sys

# Before litellm is imported: the cost map is otherwise fetched from GitHub at import.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm  # noqa: E402


def seed_chat_template(model: str, template: str) -> None:
    litellm.known_tokenizer_config[model] = {
        "status": "success",
        "tokenizer": {"chat_template": template, "bos_token": None, "eos_token": None},
    }


def render(model: str, messages: list[dict]) -> str:
    """The prompt LiteLLM's triton provider sends for `messages`."""
    from litellm.litellm_core_utils.prompt_templates.factory import prompt_factory

    return prompt_factory(model=model, messages=messages)


def main() -> None:
    template_file = sys.argv.pop(1)
    with open(template_file, encoding="utf-8") as file:
        template = file.read()
    model = os.environ.get("PEER_TRITON_MODEL", "tiny_gpt")
    seed_chat_template(model, template)
    if sys.argv[1:2] == ["--render"]:
        # `--render PROMPT...`: print the rendered prompts as JSON, for the benchmark's check.
        import json

        prompts = sys.argv[2:]
        print(json.dumps([render(model, [{"role": "user", "content": p}]) for p in prompts]))
        return
    from litellm.proxy.proxy_cli import run_server

    run_server()  # click: reads --config, --port, ... from sys.argv


if __name__ == "__main__":
    main()
