"""Model selection per request (services/router/model_selection.py): the
rules in order, the committed classifier on constructed prompts, the
fallback without an embedding, and the pipeline sending a turn to the
chosen model. No sockets: the embedding is a fake callable."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import numpy as np
import pytest
import structlog

from meshgate import metrics, minilm
from meshgate.common.v1 import common_pb2
from meshgate.config import (
    ConfigError,
    ModelSettings,
    PriceSettings,
    RouterSettings,
    SelectionSettings,
    load_settings,
)
from meshgate.embedding import UNRECORDED_HEAD_EMBEDDER, Embedding, embedder_name
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from services.router import http_edge, model_selection
from services.router.admission import estimate_prompt_tokens
from services.router.auth import Tenant
from services.router.model_selection import Classifier, Selection, SelectionReason, Selector, features
from services.router.pipeline import Answer, Budget, CacheStatus, Completion, Pipeline
from tests.unit.test_cache_verifier import within_rounding
from tests.unit.test_router_pipeline import FakeCache, FakeContexts, FakeGenerator, events_of, user

# The training script and its data module, for the reproduction test.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))

RULES = SelectionSettings(fast="fast", strong="strong", strong_tiers=["premium"], fast_tiers=["free"])

EASY = ("What is the capital of France?", "Who wrote Hamlet?", "How many legs does a spider have?")
HARD = (
    "Write a Python function that merges k sorted lists in O(n log k) time, with tests, and explain "
    "why it is correct. It must not use heapq and should handle empty lists.",
    "I'm building a Flask app with SQLite and need to plan the next three sprints: first add user login, "
    "then transaction tracking, and finally monthly analytics. Can you break it into steps with deadlines "
    "and make sure each step has tests?\n```python\napp = Flask(__name__)\n```",
    "Prove that the square root of 2 is irrational, step by step, and then derive the general result "
    "for any prime p.",
)


class FakeEmbed:
    """``vector`` as made by ``embedder``: by default the one the committed
    classifier was trained on."""

    def __init__(self, vector=None, error: Exception | None = None, embedder: str | None = None) -> None:
        self.vector = vector
        self.embedder = Classifier.load().embedder if embedder is None else embedder
        self.error = error
        self.calls: list[tuple[str, tuple[str, ...], float]] = []

    async def __call__(self, text: str, aliases: tuple[str, ...], timeout_s: float) -> Embedding | None:
        self.calls.append((text, aliases, timeout_s))
        if self.error is not None:
            raise self.error
        return None if self.vector is None else Embedding(self.vector, self.embedder)


def messages(text: str) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="be brief"), user(text)]


async def select(text: str, tier: str = "", embed=None, rules=RULES, price=None, max_tokens=64):
    return await Selector(embed or FakeEmbed()).select(rules, tier, messages(text), max_tokens, price, 5.0)


def test_features_see_code_math_steps_and_constraints():
    plain = features("What is the capital of France?")
    loaded = features(HARD[0])
    names = model_selection.FEATURE_NAMES
    for name in ("code_markers", "math_markers", "task_verbs", "constraints", "log_words"):
        index = names.index(name)
        assert loaded[index] > plain[index], name
    assert plain[names.index("factoid_opener")] == 1.0
    assert loaded[names.index("factoid_opener")] == 0.0


@pytest.mark.parametrize("unit", ["a", "\n", "\t \n", "1 ", "a.b"])
def test_a_long_prompts_patterns_are_counted_in_its_first_characters_only(unit):
    """The patterns run on the router's event loop over text a caller sent:
    a run of 32k letters or newlines took 2.2 s and 16.6 s before the
    patterns were made linear, and a whole 256 KiB message is still read
    for its length only."""
    text = unit * (model_selection.FEATURE_SCAN_CHARS * 4 // len(unit))
    head = text[: model_selection.FEATURE_SCAN_CHARS]
    whole, first = features(text), features(head)
    length = model_selection.FEATURE_NAMES.index("log_chars")
    assert whole[length] > first[length]
    assert [x for i, x in enumerate(whole) if i != length] == [x for i, x in enumerate(first) if i != length]


def test_linear_patterns_still_count_list_items_after_blank_lines_and_method_calls():
    counted = features("Do this:\n\n\n  1. first\n\t- then\nCall obj.method() and x.y(2)")
    names = model_selection.FEATURE_NAMES
    assert counted[names.index("multi_step_markers")] >= math.log1p(2)
    assert counted[names.index("code_markers")] >= math.log1p(2)


def test_a_run_of_full_stops_before_a_letter_is_counted_in_time_linear_in_it():
    # Tried from every mark of a run of them, the sentence end scanned the
    # run again to the letter after it: 0.6 s of the router's event loop for
    # a prompt's first FEATURE_SCAN_CHARS. Timed against as many short runs:
    # a ratio, not a clock.
    one_run = "." * (model_selection.FEATURE_SCAN_CHARS - 1) + "x"
    short_runs = ".x" * (model_selection.FEATURE_SCAN_CHARS // 2)

    def fastest_of_three(text: str) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            features(text)
            times.append(time.perf_counter() - started)
        return min(times)

    assert fastest_of_three(one_run) < 4 * fastest_of_three(short_runs)
    sentences = model_selection.FEATURE_NAMES.index("sentences")
    assert features(one_run)[sentences] == 0.0
    assert features("Wait... what?! ok" + one_run[-100:])[sentences] == math.log1p(2)


@pytest.mark.parametrize("text", EASY)
async def test_an_easy_question_goes_to_the_fast_model(text):
    selection = await select(text)
    assert (selection.model, selection.reason) == ("fast", SelectionReason.COMPLEXITY_FEATURES_ONLY)
    assert selection.score < RULES.threshold


@pytest.mark.parametrize("text", HARD)
async def test_a_hard_prompt_goes_to_the_strong_model(text):
    selection = await select(text)
    assert selection.model == "strong"
    assert selection.score >= RULES.threshold


async def test_the_threshold_comes_from_the_rules():
    score = (await select(EASY[0])).score
    lower = SelectionSettings(fast="fast", strong="strong", threshold=score / 2)
    assert (await select(EASY[0], rules=lower)).model == "strong"


async def test_with_an_embedding_the_embedding_model_decides_and_says_so():
    vector = np.zeros(Classifier.load().dimensions, dtype=np.float32)
    embed = FakeEmbed(vector)
    selection = await select(EASY[0], embed=embed)
    assert selection.reason == SelectionReason.COMPLEXITY
    # The newest user message is what is embedded, by the choices' inference
    # services, within the rules' timeout.
    assert embed.calls == [(EASY[0], ("strong", "fast"), RULES.embedding_timeout_s)]


async def test_a_failing_embedding_falls_back_to_the_features_and_says_so():
    selection = await select(HARD[0], embed=FakeEmbed(error=RuntimeError("inference down")))
    assert (selection.model, selection.reason) == ("strong", SelectionReason.COMPLEXITY_FEATURES_ONLY)


async def test_a_vector_of_another_size_is_not_used():
    selection = await select(EASY[0], embed=FakeEmbed(np.zeros(7, dtype=np.float32)))
    assert selection.reason == SelectionReason.COMPLEXITY_FEATURES_ONLY


async def test_a_vector_of_another_embedder_is_not_used_and_is_warned_of_once():
    # The same model's next revision (meshgate/minilm.py, REVISION): a
    # vector of the classifier's size, whose coordinates its weights read
    # as noise. A vector that moves the score far from the features-only
    # one, so reading it would show.
    classifier = Classifier.load()
    revision = classifier.embedder.rpartition("@")[2]
    other = embedder_name("minilm", revision + "-next")
    loud = np.full(classifier.dimensions, 0.5, dtype=np.float32)
    read = await select(EASY[0], embed=FakeEmbed(loud))
    features_only = await select(EASY[0])
    assert read.reason == SelectionReason.COMPLEXITY and read.score != features_only.score
    selector = Selector(FakeEmbed(loud, embedder=other), classifier)
    with structlog.testing.capture_logs() as logged:
        for _ in range(2):
            selection = await selector.select(RULES, "", messages(EASY[0]), 64, None, 5.0)
            assert (selection.reason, selection.score) == (
                SelectionReason.COMPLEXITY_FEATURES_ONLY,
                features_only.score,
            )
    warned = [(w["selector_embedder"], w["vector_embedder"]) for w in logged if w["log_level"] == "warning"]
    assert warned == [(classifier.embedder, other)]


def test_a_selector_file_naming_no_embedder_is_the_one_before_the_name_was_recorded(tmp_path):
    # An operator's own file from before the field: read as trained on
    # minilm's revision 2 (meshgate.embedding.UNRECORDED_HEAD_EMBEDDER),
    # never as whatever revision runs now.
    model = json.loads(model_selection.MODEL_PATH.read_text())
    model.pop("embedder", None)
    path = tmp_path / "model_selector.json"
    path.write_text(json.dumps(model))
    assert Classifier.load(path).embedder == UNRECORDED_HEAD_EMBEDDER == "minilm@2"


def test_the_committed_selector_was_trained_on_the_running_embedder():
    # minilm.REVISION bumped (tests/unit/test_minilm_revision.py) without
    # retraining would leave routing on the features alone.
    import cache_data

    assert Classifier.load().embedder == cache_data.embedder() == embedder_name("minilm", minilm.REVISION)


def test_the_training_script_records_the_embedder_of_its_vectors(monkeypatch, tmp_path):
    import model_selection_data as data
    import train_model_selector as training

    prompts = [data.Prompt(text, False, "qqp", "train") for text in EASY * 4] + [
        data.Prompt(text, True, "beam", "train") for text in HARD * 4
    ]
    rng = np.random.default_rng(1)
    vectors = {p.text: rng.standard_normal(8).astype(np.float32) for p in prompts}
    monkeypatch.setattr(data, "load", lambda: prompts)
    monkeypatch.setattr(data, "embeddings", lambda texts: {t: vectors[t] for t in texts})
    model = training.build_model()
    assert model["embedder"] == {"model": "minilm", "revision": minilm.REVISION}
    path = tmp_path / "model_selector.json"
    path.write_text(json.dumps(model))
    assert Classifier.load(path).embedder == embedder_name("minilm", minilm.REVISION)


async def test_tiers_decide_before_the_classifier_without_embedding():

    embed = FakeEmbed()
    premium = await select(EASY[0], tier="premium", embed=embed)
    free = await select(HARD[0], tier="free", embed=embed)
    assert (premium.model, premium.reason, premium.score) == ("strong", SelectionReason.TIER, 0.0)
    assert (free.model, free.reason) == ("fast", SelectionReason.TIER)
    assert embed.calls == []  # no embedding spent when a rule decides
    other = await select(EASY[0], tier="gold", embed=embed)
    assert other.reason == SelectionReason.COMPLEXITY_FEATURES_ONLY


async def test_a_turn_over_the_cost_cap_goes_to_the_fast_model():
    price = PriceSettings(prompt_usd_per_million=10.0, completion_usd_per_million=1000.0)
    capped = SelectionSettings(fast="fast", strong="strong", max_strong_cost_usd=0.01)
    # 64 completion tokens at $1000/M = $0.064 > $0.01; the prompt adds ~$0.002.
    selection = await select(HARD[0], rules=capped, price=price, max_tokens=64)
    assert (selection.model, selection.reason) == ("fast", SelectionReason.COST_CAP)
    # Under the cap (or without prices) the classifier decides.
    assert (await select(HARD[0], rules=capped, price=price, max_tokens=1)).reason != SelectionReason.COST_CAP
    assert (await select(HARD[0], rules=capped, price=None)).model == "strong"


async def test_the_cost_cap_counts_the_strong_models_chat_template_as_admission_reserves_it():
    """The cap judged the content's bytes alone, while admission reserves
    (and inference bills) the rendered prompt: a turn just under the cap
    by its content could cost the strong model more than the cap."""
    price = PriceSettings(prompt_usd_per_million=1_000_000.0)  # a dollar a prompt byte
    prompt = messages("hi")
    content = estimate_prompt_tokens(prompt)
    capped = SelectionSettings(fast="fast", strong="strong", max_strong_cost_usd=content + 0.5)
    selector = Selector(FakeEmbed())
    content_only = await selector.select(capped, "", prompt, 0, price, 5.0)
    assert content_only.reason != SelectionReason.COST_CAP
    with_template = await selector.select(capped, "", prompt, 0, price, 5.0, strong_template_bytes=40)
    assert (with_template.model, with_template.reason) == ("fast", SelectionReason.COST_CAP)


def selecting_models() -> dict[str, ModelSettings]:
    """ "auto" selecting between "fast" and "strong" (RULES)."""
    return {
        "auto": ModelSettings(max_output_tokens=64, default_max_tokens=8, selection=RULES),
        "fast": ModelSettings(max_output_tokens=64, default_max_tokens=8),
        "strong": ModelSettings(max_output_tokens=256, default_max_tokens=16),
    }


async def test_the_pipeline_sends_the_turn_to_the_chosen_model_and_says_why():
    models = selecting_models()
    generator, cache = RecordingGenerator(), FakeCache()
    built = Pipeline(RouterSettings(), models, FakeContexts(), cache, generator)
    selections = metrics.router().model_selections
    to_fast_before = selections.labels("auto", "fast", "complexity_features_only")._value.get()
    tenant = Tenant("t1", frozenset({"auto"}))
    for text, expected in ((EASY[0], "fast"), (HARD[2], "strong")):
        request = pb.ChatRequest(model="auto", messages=[user(text)])
        events = await events_of(built.run(request, tenant, "", budget=_budget()))
        completion = events[-1]
        assert isinstance(completion, Completion)
        assert completion.model == expected
        assert completion.selection.reason == SelectionReason.COMPLEXITY_FEATURES_ONLY
        assert generator.aliases[-1] == expected
        # Cache entries are the chosen model's, not the selecting alias's.
        assert cache.stored
    # The share moved to the fast model is countable in production too.
    assert selections.labels("auto", "fast", "complexity_features_only")._value.get() == to_fast_before + 1
    premium = Tenant("t2", frozenset({"*"}), tier="premium")
    request = pb.ChatRequest(model="auto", messages=[user(EASY[0])])
    completion = (await events_of(built.run(request, premium, "", budget=_budget())))[-1]
    assert (completion.model, completion.selection.reason) == ("strong", SelectionReason.TIER)
    # An alias that selects nothing answers as itself, with no selection.
    plain = pb.ChatRequest(model="fast", messages=[user(HARD[0])])
    completion = (await events_of(built.run(plain, premium, "", budget=_budget())))[-1]
    assert (completion.model, completion.selection) == ("fast", None)


class ReportedCache(FakeCache):
    def __init__(self) -> None:
        super().__init__()
        self.reported: list[str] = []

    async def report_wrong(self, plan, messages, entry_id, budget) -> bool:
        self.reported.append(plan.model)
        return True


async def test_a_report_goes_to_the_model_the_hit_named_not_to_a_new_selection():
    """Selection is not repeatable: the prompt's embedding came in time for
    the turn (strong) and not for the report (fast, from the features), so
    the report named the fast model's entries and the wrong one stayed."""
    models = selecting_models()
    cache = ReportedCache()
    built = Pipeline(RouterSettings(), models, FakeContexts(), cache, FakeGenerator())
    tenant = Tenant("t1", frozenset({"*"}))
    easy = pb.ChatRequest(model="auto", messages=[user(EASY[0])])  # the features choose fast
    await built.report_wrong_hit(easy, tenant, "e1", _budget(), selected_model="strong")
    assert cache.reported == ["strong"]
    await built.report_wrong_hit(easy, tenant, "e1", _budget())  # not named: selected again
    assert cache.reported == ["strong", "fast"]
    # An alias that selects nothing is its own selected_model, as its completion says.
    plain = pb.ChatRequest(model="fast", messages=[user("hi")])
    await built.report_wrong_hit(plain, tenant, "e1", _budget(), selected_model="fast")
    assert cache.reported == ["strong", "fast", "fast"]
    for request, named in ((easy, "other"), (plain, "strong")):
        with pytest.raises(MeshgateError) as refused:
            await built.report_wrong_hit(request, tenant, "e1", _budget(), selected_model=named)
        assert refused.value.reason == Reason.INVALID_SELECTED_MODEL
    assert cache.reported == ["strong", "fast", "fast"]


class RecordingGenerator(FakeGenerator):
    def __init__(self) -> None:
        super().__init__()
        self.aliases: list[str] = []

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        self.aliases.append(alias)
        async for piece in super().generate(alias, prompt, parameters, budget, answer):
            yield piece


def _budget() -> Budget:
    return Budget.of(30.0)


def _load(tmp_path, text: str):
    path = tmp_path / "meshgate.toml"
    path.write_text(text)
    return load_settings(path, environ={})


def test_selection_is_configured_per_alias_and_checked(tmp_path):
    settings = _load(
        tmp_path,
        """
[models.fast]
[models.strong]
max_output_tokens = 1024
context_window_tokens = 2048
[models.auto]
max_output_tokens = 128
[models.auto.selection]
fast = "fast"
strong = "strong"
threshold = 0.6
strong_tiers = ["premium"]
max_strong_cost_usd = 0.5
[router.prices.strong]
prompt_usd_per_million = 1.0
[[router.tenants]]
id = "acme"
tier = "premium"
""",
    )
    rules = settings.models["auto"].selection
    assert (rules.fast, rules.strong, rules.threshold) == ("fast", "strong", 0.6)
    assert rules.strong_tiers == ["premium"]
    assert rules.max_strong_cost_usd == 0.5
    assert settings.router.tenants[0].tier == "premium"
    assert settings.models["strong"].selection is None


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ('[models.auto.selection]\nfast = "nope"\nstrong = "x"', "selection.fast"),
        (
            '[models.auto]\nmax_output_tokens = 512\n[models.auto.selection]\nfast = "x"\nstrong = "x"',
            "exceed",
        ),
        ("[models.auto.selection]\nthreshold = 1.5", "threshold"),
        ('[models.auto.selection]\nstrong_tiers = ["a"]\nfast_tiers = ["a"]', "both"),
        (
            '[models.a.selection]\nfast = "b"\nstrong = "x"\n[models.b.selection]\nfast = "x"',
            "selects nothing",
        ),
    ],
)
def test_bad_selection_settings_are_refused(tmp_path, body, complaint):
    with pytest.raises(ConfigError, match=complaint):
        _load(tmp_path, "[models.x]\n" + body)


SELECTING = """
[models.fast]
[models.strong]
max_output_tokens = 1024
context_window_tokens = 2048
[models.auto]
max_output_tokens = 128
[models.auto.selection]
fast = "fast"
strong = "strong"
"""


@pytest.mark.parametrize(
    "table",
    [
        "[router.model_limits.auto]\nrequests_per_minute = 1",
        "[router.prices.auto]\nprompt_usd_per_million = 1.0",
    ],
)
def test_limits_and_prices_of_a_selecting_alias_are_refused(tmp_path, table):
    # Admission and billing take the chosen alias: these loaded and never applied.
    with pytest.raises(ConfigError, match=r"\['auto'\].*fast and strong aliases"):
        _load(tmp_path, SELECTING + table)


def test_a_strong_cost_cap_needs_the_strong_models_prices(tmp_path):
    # Without them every turn cost 0 on the strong model: even a cap of 0.0
    # sent a 5,000-byte prompt there.
    capped = SELECTING + "max_strong_cost_usd = 0.0\n"
    with pytest.raises(ConfigError, match=r"max_strong_cost_usd needs router.prices.strong"):
        _load(tmp_path, capped)
    priced = _load(tmp_path, capped + "[router.prices.strong]\ncompletion_usd_per_million = 2.0\n")
    assert priced.models["auto"].selection.max_strong_cost_usd == 0.0


@pytest.mark.heavy
def test_the_committed_selector_is_what_the_training_script_makes():
    import model_selection_data as data
    import train_model_selector as training

    if not (data.available() and data.VECTORS_NPZ.exists()):
        pytest.skip("needs ../shared/data and the embeddings bench/model_selection_data.py caches")
    # Within the last of the six decimals kept, as the verifier's: retrained
    # on this machine's vectors, 34 of 412 weights came out 1e-6 apart.
    assert training.build_model() == within_rounding(json.loads(model_selection.MODEL_PATH.read_text()))


def test_the_http_edge_reports_the_choice_in_its_extension():
    chosen = Selection("strong", SelectionReason.TIER)
    completion = Completion(Answer(text="hi"), CacheStatus.MISS, 0.0, "", 0, "t" * 32, "strong", chosen)
    extension = http_edge._extension(completion)
    assert (extension["selected_model"], extension["selection_reason"], extension["selection_score"]) == (
        "strong",
        "tier",
        0.0,
    )
    plain = http_edge._extension(Completion(Answer(), CacheStatus.MISS, 0.0, "", 0, "t" * 32, "fast"))
    assert (plain["selected_model"], plain["selection_reason"]) == ("fast", "")


async def test_prompt_embedders_of_replaced_deployments_are_not_kept_for_good():
    """Each reload that replaces the deployments' stubs made one more
    embedder (holding its stub and channel) that stayed for good."""
    from services.router import app

    class Stub:
        async def Embed(self, request, timeout):  # noqa: N802 (the gRPC method's name)
            import grpc

            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "down")

    class Deployments:
        stub = None

        def embedding_stub(self, aliases):
            return self.stub

    deployments = Deployments()
    embeddings = app._PromptEmbeddings(deployments)
    for _ in range(3 * app._MAX_EMBEDDERS):
        deployments.stub = Stub()  # what a reload does: new stubs
        assert await embeddings("hello", ("strong",), 0.1) is None
    assert len(embeddings._embedders) <= app._MAX_EMBEDDERS
    # The stub in use is served by its own embedder.
    assert embeddings._embedders[deployments.stub]._stub is deployments.stub
