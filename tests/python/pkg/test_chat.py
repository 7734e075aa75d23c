"""Model.chat and moas.chat: a conversation written by the chat template and continued
by Model.generate; the answer ends where the model begins the next turn; a
conversation that is not one, or a character outside the vocabulary, names the
message at fault. (The server's /v1/chat/completions, on the same template, is tested
in test_server.py.)"""
import os

import pytest

from conftest import ROOT
import moas
from moas.chat import ChatMessageError, ChatTemplate, conversation

MODEL = os.path.join(ROOT, "tests", "data", "tiny-pooled-bias.gguf")
CHAT = [{"role": "system", "content": "Speak."}, {"role": "user", "content": "And God"}]
# what the template writes for CHAT, by hand; the tiny model's context is 64 characters
PROMPT = "system: Speak.\nuser: And God\nassistant: "
STOP = ["\nassistant:", "\nsystem:", "\nuser:"]


@pytest.fixture(scope="module")
def model():
    with moas.Model(MODEL) as m:
        yield m


def test_chat_continues_the_written_conversation(model):
    # no limit: the rest of the context (64 - 40 characters)
    assert model.chat(CHAT, seed=12, mode="routed") == model.generate(
        PROMPT, 24, seed=12, mode="routed", stop=STOP)
    # a limit, sampling settings, text parts and a stop string of the caller's
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "And "},
                                                   {"type": "text", "text": "God"}]}]
    want = model.generate(PROMPT, 12, seed=3, temperature=0.7, top_k=5, stop=STOP)
    assert model.chat(parts, 12, seed=3, temperature=0.7, top_k=5) == want
    cut = want[3:5]
    assert model.chat(CHAT, 12, seed=3, temperature=0.7, top_k=5, stop=cut) == \
        want[:want.index(cut)]
    text, routes = model.chat(CHAT, 6, seed=4, mode="routed", routes=True)
    assert (text, routes) == model.generate(PROMPT, 6, seed=4, mode="routed", stop=STOP,
                                            routes=True)


def test_chat_ends_where_the_model_begins_the_next_turn(model):
    # only the characters of "\nuser:" allowed, hot: seed 8663 writes "\nuser:" at
    # character 10 (as in test_server.py), where the answer ends, for the reason "stop"
    bias = {t: float("-inf") for t, c in enumerate(model.vocab) if c not in "\nuser:"}
    free = model.generate(PROMPT, 24, seed=8663, mode="routed", temperature=2.0,
                          logit_bias=bias)
    assert free.index("\nuser:") == 10, free
    pieces = model.chat(CHAT, seed=8663, mode="routed", temperature=2.0, logit_bias=bias,
                        stream=True)
    assert "".join(pieces) == free[:10] and pieces.finish_reason == "stop"


def test_template_and_conversation():
    t = ChatTemplate()
    assert t.render(conversation(CHAT)) == PROMPT
    assert t.render(conversation([{"role": "developer", "content": "A"},
                                  {"role": "assistant", "content": "B", "name": "x"},
                                  {"role": "user", "content": []}])) == \
        "system: A\nassistant: B\nuser: \nassistant: "
    # other fields at null are absent (a client's copy of an answer, model_dump()ed)
    assert conversation([{"role": "assistant", "content": "B", "refusal": None,
                          "tool_calls": None, "function_call": None, "audio": None}]) == \
        [{"role": "assistant", "content": "B"}]
    assert sorted(t.stop) == STOP
    assert t.missing(list("abc")) == sorted(set("system: user: assistant: \n") - set("abc"))
    assert t.unavailable(list("system: user: assistant: \n")) is None
    assert t.unavailable([c for c in "system: user: assistant: \n" if c not in ":\n"]) == \
        "this model's vocabulary has no \"\\n\", \":\", which the chat template writes"


def test_a_model_that_cannot_write_the_template_says_so(model, monkeypatch):
    # the sentence of ChatTemplate.unavailable, which the server gives too (adding where
    # to go instead)
    monkeypatch.setattr(ChatTemplate, "missing", lambda self, vocab: ["\x01"])
    with pytest.raises(moas.MoasValueError) as info:
        model.chat(CHAT, 4)
    assert info.value.message == \
        "this model's vocabulary has no \"\\u0001\", which the chat template writes"


def test_a_conversation_that_is_not_one_names_the_message(model):
    user = {"role": "user", "content": "And"}
    for messages, code, message in [
            ([], "invalid_type", "'messages' must be a non-empty list"),
            ("user: And", "invalid_type", "'messages' must be a non-empty list"),
            ([user, "And"], "invalid_type", "messages[1] must be an object"),
            ([{"role": "tool", "content": "x"}], "invalid_value", "(there are no tools)"),
            ([user, {"role": "User", "content": "x"}], "invalid_value",
             "messages[1].role must be one of assistant, developer, system, user"),
            ([{"role": ["user"], "content": "x"}], "invalid_value",
             "messages[0].role must be one of"),
            ([{"role": {"user": 1}, "content": "x"}], "invalid_value",
             "messages[0].role must be one of"),
            ([user, dict(user, tool_calls=[])], "unsupported",
             "messages[1].tool_calls is not supported"),
            ([dict(user, name=1)], "invalid_type", "messages[0].name must be a string"),
            ([{"role": "user", "content": None}], "invalid_type",
             "messages[0].content must be a string or a list of text parts"),
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
             "invalid_value", "messages[0].content[0] must be a text part"),
            ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
             "invalid_value", "messages[0].content[0] must be a text part")]:
        with pytest.raises(ChatMessageError) as info:
            model.chat(messages, 4)
        e = info.value
        assert isinstance(e, moas.MoasValueError) and isinstance(e, ValueError)
        assert e.status == moas.Status.ERR_INVALID_ARG and e.code == code
        assert message in e.message, e.message
        assert 'not "text"' not in e.message, e.message   # a text part of a wrong shape
    # the library's refusals of a message's text, said of that message
    with pytest.raises(moas.MoasValueError) as info:
        model.chat([user, {"role": "user", "content": "And Xerxes"}], 4)
    assert info.value.status == moas.Status.ERR_UNKNOWN_CHAR
    assert info.value.message.startswith("messages[1].content: ")
    assert "byte offset 4" in info.value.message
    with pytest.raises(moas.MoasValueError) as info:
        model.chat([{"role": "user", "content": "a\ud800"}], 4)
    assert info.value.status == moas.Status.ERR_INVALID_UTF8
    assert info.value.message.startswith("messages[0].content: ")
    # a conversation that fills the context, with no limit: no room for an answer
    with pytest.raises(moas.MoasValueError) as info:
        model.chat([{"role": "user", "content": ("And God " * 6)[:46]}])
    assert "none is left for the answer" in info.value.message
    # with unknown="drop" the same text is taken, as generate takes it
    assert model.chat([{"role": "user", "content": "AndX"}], 4, seed=2, unknown="drop") == \
        model.generate("user: And\nassistant: ", 4, seed=2, stop=STOP)


def test_chat_batch_answers_each_conversation_as_chat_alone(model):
    # conversations of different lengths (so different default limits), n = 2, and one
    # with its own settings (per_prompt) whose answer ends at the next turn's label
    convs = [CHAT, [{"role": "user", "content": "And"}], CHAT]
    bias = {t: float("-inf") for t, c in enumerate(model.vocab) if c not in "\nuser:"}
    outs = model.chat_batch(convs, seed=5, mode="routed", n=2,
                            per_prompt=[None, {"temperature": 0.5},
                                        {"seed": 8663, "temperature": 2.0,
                                         "logit_bias": bias, "n": 1}])
    assert [len(o.choices) for o in outs] == [2, 2, 1]
    for i in range(2):
        assert outs[0].choices[i].text == model.chat(CHAT, seed=5 + i, mode="routed")
        assert outs[1].choices[i].text == model.chat(convs[1], seed=5 + i, mode="routed",
                                                     temperature=0.5)
    assert outs[0].choices[0].n_tokens == 24   # the rest of the 64-character context
    assert outs[1].choices[0].n_tokens == 64 - len("user: And\nassistant: ")
    stopped = outs[2].choices[0]
    assert (stopped.text, stopped.finish_reason) == (
        model.chat(CHAT, seed=8663, mode="routed", temperature=2.0, logit_bias=bias),
        "stop")
    assert len(stopped.text) == 10
    # a limit for all, and a stop string of the caller's beside the template's
    want = model.chat(CHAT, 12, seed=3, stop="d")
    assert model.chat_batch([CHAT], 12, seed=3, stop="d")[0].text == want
    # errors name the conversation, before anything runs
    with pytest.raises(ChatMessageError) as info:
        model.chat_batch([CHAT, [{"role": "tool", "content": "x"}]], 4)
    assert info.value.message.startswith("conversation 1: messages[0].role")
    with pytest.raises(moas.MoasValueError) as info:
        model.chat_batch([CHAT, CHAT, [{"role": "user", "content": "X"}]], 4)
    assert info.value.message.startswith("conversation 2: messages[0].content: ")
    with pytest.raises(moas.MoasValueError, match="per_prompt has 1 entries for 2"):
        model.chat_batch([CHAT, CHAT], 4, per_prompt=[None])
