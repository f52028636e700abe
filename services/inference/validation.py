"""Checks on what the inference service forwards to Triton.

The models check their input too, but a bad value that reaches a batching
model can fail its neighbours (a NaN temperature sampled a token outside the
vocabulary mid-batch), and a model's refusal costs a Triton round trip. So
every value is checked here, where it enters, with the reasons the router
uses for the same mistakes (meshgate.sampling).
"""

from __future__ import annotations

from meshgate.common.v1 import common_pb2
from meshgate.config import InferenceSettings, ServedModelSettings
from meshgate.embedding_input import check_texts
from meshgate.errors import invalid_argument
from meshgate.reasons import Reason
from meshgate.sampling import check_sampling
from meshgate.tokenization import ROLE_NAMES


def check_generation(
    parameters: common_pb2.GenerationParameters,
    served: ServedModelSettings,
    default_max_tokens: int,
) -> int:
    """Validates sampling parameters; returns the max_tokens to ask for."""
    # At least one prompt token shares the window.
    largest = served.context_window_tokens - 1
    max_tokens = min(default_max_tokens, largest)
    if parameters.HasField("max_tokens"):
        max_tokens = parameters.max_tokens
        if max_tokens <= 0:
            raise invalid_argument(Reason.INVALID_MAX_TOKENS, "max_tokens must be positive")
        if max_tokens > largest:
            raise invalid_argument(
                Reason.MAX_TOKENS_TOO_LARGE, f"max_tokens may be at most {largest}", limit=str(largest)
            )
    check_sampling(parameters)
    return max_tokens


def check_messages(messages, served: ServedModelSettings) -> None:
    """Some messages, no more than can fit the model's window, and every
    one says who speaks: a role the chat template does not know would be
    rendered as some other one (the router refuses it too).

    Every message takes a token of its template at least, so more messages
    than the window has tokens cannot fit it: refused before any is
    rendered. Rendering runs on the event loop, and a Generate of 500,000
    empty messages (2 MB, well inside the mesh's 32 MiB message bound) held
    every other call for 1.8 s before check_prompt refused it (smollm2's
    template; about 30 s at 32 MiB)."""
    if not messages:
        raise invalid_argument(Reason.EMPTY_MESSAGES, "messages must not be empty")
    window = served.context_window_tokens
    if len(messages) > window:
        raise invalid_argument(
            Reason.TOO_MANY_MESSAGES,
            f"{len(messages)} messages cannot fit the model's window of {window} tokens",
            limit=str(window),
        )
    for index, message in enumerate(messages):
        if message.role not in ROLE_NAMES:
            raise invalid_argument(Reason.INVALID_ROLE, f"messages[{index}] has no valid role")


def check_contents(messages, settings: InferenceSettings) -> None:
    """The messages' own text already past ``max_prompt_bytes``: refused
    before rendering, as check_prompt would refuse the rendered prompt
    after it. Rendering runs on the event loop, and a template renders every
    content whole plus its frames (a special token's text gains a break
    character), so a prompt can only be larger than its contents; one
    message of 30 MB of special-token text took 2.3 s to render before
    check_prompt refused it, every other stream of the process stalled
    behind it (a review, 2026-12-06). A template that drops messages could
    render smaller: such a prompt, over the bound in its messages alone, is
    refused all the same."""
    limit = settings.max_prompt_bytes
    characters = sum(len(message.content) for message in messages)
    # len(str) <= UTF-8 length: the cheap sum settles most oversize contents.
    if characters > limit or (
        4 * characters > limit and sum(len(message.content.encode()) for message in messages) > limit
    ):
        raise invalid_argument(
            Reason.PROMPT_TOO_LARGE,
            f"the messages' contents alone are larger than the prompt's bound of {limit} bytes",
            limit=str(limit),
        )


def check_prompt(prompt: str, settings: InferenceSettings) -> None:
    limit = settings.max_prompt_bytes
    # len(str) <= UTF-8 length, so the cheap test settles most oversize prompts.
    if len(prompt) > limit or len(prompt.encode()) > limit:
        raise invalid_argument(
            Reason.PROMPT_TOO_LARGE, f"the rendered prompt is larger than {limit} bytes", limit=str(limit)
        )


def check_embed_texts(texts, settings: InferenceSettings) -> None:
    check_texts(texts, settings.max_embed_texts, settings.max_embed_text_bytes)
